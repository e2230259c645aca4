import pytest
import torch

from diffquant.models import BUILTIN_MODELS, DENOISERS, UnknownModelError, WeightsError, load_builtin, weights_path
from diffquant.models.builtin import load_weights_into
from tests.conftest import tiny_model


@pytest.mark.parametrize("name", DENOISERS)
def test_builtin_denoiser_loads_and_predicts_noise(name):
    model = load_builtin(name)
    x = torch.randn(2, *model.sample_shape)
    eps = model(x, torch.tensor([999, 10]), torch.tensor([0, 10]))
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    assert not any(p.requires_grad for p in model.parameters())


def test_builtin_features_classify():
    net = load_builtin("fashion-features")
    logits = net(torch.zeros(3, 1, 28, 28))
    assert logits.shape == (3, 10)
    assert net.features(torch.zeros(3, 1, 28, 28)).shape == (3, net.feature_dim)


def test_shipped_weights_exist():
    for name in BUILTIN_MODELS:
        assert weights_path(name).is_file(), name


def test_unknown_model():
    with pytest.raises(UnknownModelError, match="fashion-unet"):
        load_builtin("stable-diffusion")


def test_corrupt_weight_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="corrupt"):
        load_builtin("fashion-dit", weights=bad)


def test_truncated_weight_file(tmp_path):
    good = weights_path("fashion-dit").read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(WeightsError):
        load_builtin("fashion-dit", weights=bad)


def test_weights_of_another_model(tmp_path):
    with pytest.raises(WeightsError, match="does not fit"):
        load_builtin("fashion-dit", weights=weights_path("fashion-features"))


def test_missing_weight_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_weights_into(tiny_model("dit"), tmp_path / "none.safetensors")
