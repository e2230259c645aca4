"""SmoothQuant: float equivalence, alpha search, bounded statistics, save/load."""

import pytest
import torch

from diffquant import CalibrationConfig, get_recipe, load_quantized, quantize, save_quantized
from diffquant.methods.smoothquant import SmoothStats, layer_error, search_alpha, smoothing_factors
from diffquant.modes import full_precision
from diffquant.nn import QuantLinear
from diffquant.qtypes import int8
from diffquant.quantize import prepare
from tests.conftest import tiny_model

CAL = CalibrationConfig(n_samples=4, steps=6, every=2, batch_size=4)


def test_smoothing_preserves_the_float_output():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    qlin = QuantLinear.from_float(lin, None, None, None)
    qlin.enable_smoothing()
    qlin.smooth.copy_(torch.rand(16) * 10 + 0.1)
    xin = torch.randn(5, 16)
    torch.testing.assert_close(qlin(xin), lin(xin), rtol=1e-5, atol=1e-6)
    # the whole model: smoothing factors everywhere, quantization off -> the float model
    model = tiny_model("dit")
    x, t, y = torch.randn(2, 1, 28, 28), torch.full((2,), 700), torch.tensor([0, 5])
    ref = model(x, t, y)
    prepare(model, "w8a8-smoothquant")
    smoothed = [m for m in model.modules() if getattr(m, "smooth", None) is not None]
    assert smoothed
    for m in smoothed:
        m.smooth.copy_(torch.rand_like(m.smooth) * 10 + 0.1)
    with full_precision(model):
        torch.testing.assert_close(model(x, t, y), ref, rtol=1e-5, atol=1e-5)


def test_searched_alpha_beats_fixed_alpha_and_no_smoothing_on_outlier_channels():
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    x[:, :3] *= 60  # activation outlier channels, as in transformers
    w = torch.randn(32, 64) * 0.05
    stats = SmoothStats()
    stats.update(x)
    alpha, _, errors = search_alpha(stats, w, int8, int8, None, symmetric=False)
    none = layer_error(x, w, torch.ones(64), int8, int8, None, False)
    fixed = layer_error(x, w, smoothing_factors(stats.absmax, w, 0.8), int8, int8, None, False)
    assert errors[alpha] <= fixed and errors[alpha] < 0.5 * none
    assert errors[alpha] == min(errors.values())


def test_smooth_stats_memory_is_bounded_and_absmax_exact():
    stats = SmoothStats(max_rows=100)
    data = [torch.randn(300, 8) * (i + 1) for i in range(5)]
    for d in data:
        stats.update(d)
    assert stats.rows.shape == (100, 8) and stats.seen == 1500
    assert torch.equal(stats.absmax, torch.cat(data).abs().amax(0))


def test_smoothquant_save_load_identical(tmp_path):
    q = quantize(tiny_model("dit"), "w8a8-smoothquant", CAL, progress=False)
    x, t, y = torch.randn(2, 1, 28, 28), torch.full((2,), 300), torch.tensor([1, 2])
    out = q(x, t, y)
    save_quantized(q, tmp_path / "q")
    assert torch.equal(load_quantized(tmp_path / "q", model=tiny_model("dit"))(x, t, y), out)


def test_fixed_alpha_is_used():
    q = quantize(tiny_model("dit"), get_recipe("w8a8-smoothquant").replace(smoothquant_alpha=0.8), CAL, progress=False)
    assert set(q.diffquant_report["smoothquant"]["alphas"].values()) == {0.8}
    with pytest.raises(ValueError, match="smoothquant_alpha"):
        get_recipe("w8a8").replace(smoothquant_alpha=1.5)


def test_search_has_no_smoothing_as_a_candidate_and_smooths_outliers_under_the_recipes_observer():
    from diffquant.observers import observed_range
    from diffquant.recipe import get_recipe

    act_range = observed_range(get_recipe("w8a8"), int8, False)
    # every channel alike: all alphas give s = 1, a tie, which goes to "no smoothing"
    x = torch.randint(0, 2, (512, 64)).float() * 2 - 1
    w = torch.randint(0, 2, (32, 64)).float() * 2 - 1
    stats = SmoothStats()
    stats.update(x)
    alpha, s, errors = search_alpha(stats, w, int8, int8, None, False, act_range=act_range)
    assert alpha is None and torch.equal(s, torch.ones(64)) and len(set(errors.values())) == 1
    # outlier channels: smoothing wins by a wide margin under the same (clipping) observer
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    x[:, :3] *= 60
    w = torch.randn(32, 64) * 0.05
    stats = SmoothStats()
    stats.update(x)
    alpha, _, errors = search_alpha(stats, w, int8, int8, None, False, act_range=act_range)
    assert alpha is not None and errors[alpha] == min(errors.values()) and errors[alpha] < 0.5 * errors[None]
    assert search_alpha(stats, w, int8, int8, None, False, allow_off=False)[0] is not None
