"""Training runs, checkpoints atomically, resumes where it stopped, and exports loadable weights."""

import json

import pytest
import torch

from diffquant.models import load_builtin
from diffquant.train import checkpoint_progress, export_weights, train


def test_features_train_resume_export(fake_fashion_dir, tmp_path):
    out = tmp_path / "run"
    ckpt = train("features", out, steps=2, data_dir=fake_fashion_dir, log=lambda s: None)
    assert checkpoint_progress(ckpt, 2) == (2, 2)
    ckpt = train("features", out, steps=3, data_dir=fake_fashion_dir, log=lambda s: None)
    assert checkpoint_progress(ckpt, 3) == (3, 3)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 3]
    assert not list(out.glob("*.tmp"))
    dest = export_weights(ckpt, tmp_path / "features.safetensors")
    net = load_builtin("fashion-features", weights=dest)
    assert net(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.parametrize("kind", ["features", "dit"])
def test_a_resumed_run_equals_one_straight_run(fake_fashion_dir, tmp_path, kind):
    """Stopped after step 1 (``max_minutes=0``) and resumed: the same weights, EMA and optimizer state
    as three steps in one go, so the data order, the RNG and the optimizer really are resumed."""
    straight = torch.load(train(kind, tmp_path / "a", steps=3, data_dir=fake_fashion_dir, log=lambda s: None),
                          weights_only=False)  # fmt: skip
    first = train(kind, tmp_path / "b", steps=3, max_minutes=0, data_dir=fake_fashion_dir, log=lambda s: None)
    assert checkpoint_progress(first, 3) == (1, 3)
    resumed = torch.load(train(kind, tmp_path / "b", steps=3, data_dir=fake_fashion_dir, log=lambda s: None),
                         weights_only=False)  # fmt: skip
    for key in ("model", "ema") if kind == "dit" else ("model",):
        assert straight[key].keys() == resumed[key].keys()
        assert all(torch.equal(straight[key][k], resumed[key][k]) for k in straight[key]), key
    moments = [(a["exp_avg"], b["exp_avg"]) for a, b in zip(straight["opt"]["state"].values(),
                                                             resumed["opt"]["state"].values(), strict=True)]  # fmt: skip
    assert moments and all(torch.equal(a, b) for a, b in moments)


def test_diffusion_training_step_and_ema_export(fake_fashion_dir, tmp_path):
    ckpt = train("dit", tmp_path / "dit", steps=2, data_dir=fake_fashion_dir, log=lambda s: None)
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 2 and "ema" in state
    # the EMA weights are what gets exported
    dest = export_weights(ckpt, tmp_path / "dit.safetensors")
    model = load_builtin("fashion-dit", weights=dest)
    name = "dit.proj_out_2.weight"
    assert torch.allclose(model.state_dict()[name], state["ema"][name].half().float())


def test_warm_start_from_exported_weights(fake_fashion_dir, tmp_path):
    ckpt = train("features", tmp_path / "a", steps=2, data_dir=fake_fashion_dir, log=lambda s: None)
    exported = export_weights(ckpt, tmp_path / "f.safetensors")
    ckpt = train("features", tmp_path / "b", steps=3, data_dir=fake_fashion_dir, warm_start=exported, log=print)
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 3 and state["restart_step"] == 2


def test_lr_schedule_warmup_stable_decay():
    from diffquant.train import _lr_factor

    # warm-up from 1/warmup to 1, then constant, then linear to zero over the last `decay` steps
    assert _lr_factor(0, 10, 100, cosine=False, decay=20) == pytest.approx(0.1)
    assert _lr_factor(9, 10, 100, cosine=False, decay=20) == 1.0
    assert _lr_factor(80, 10, 100, cosine=False, decay=20) == 1.0
    assert _lr_factor(90, 10, 100, cosine=False, decay=20) == pytest.approx(0.5)
    assert _lr_factor(99, 10, 100, cosine=False, decay=20) == pytest.approx(0.05)
    assert _lr_factor(50, 10, 100, cosine=False) == 1.0  # no decay configured: constant
    assert _lr_factor(55, 10, 100, cosine=True) == pytest.approx(0.5)  # cosine: half-way is 1/2
