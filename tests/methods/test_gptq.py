"""GPTQ and the clipping search: output error, exact storage, Hessians of convolutions, the pipeline."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from diffquant import CalibrationConfig, get_recipe, load_quantized, quantize, save_quantized
from diffquant import primitives as P
from diffquant.methods.gptq import HessianCollector, gptq_quantize, round_weights
from diffquant.nn import QuantConv2d, QuantLinear
from diffquant.qtypes import get_qtype
from diffquant.quantize import prepare
from tests.conftest import tiny_model

INT4 = get_qtype("int4")
CAL = CalibrationConfig(n_samples=4, steps=6, every=2, batch_size=4)


def correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    scales = torch.logspace(-1, 1, k)
    return (torch.randn(n, k, generator=g) * scales) @ mix


@pytest.mark.parametrize("group", [None, 16, 64])
def test_gptq_lowers_output_error_and_its_weights_are_exactly_storable(group):
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    x = correlated_inputs(2048, 64)
    h = x.T @ x / x.shape[0]
    q, scale = gptq_quantize(w, h, INT4, group)
    rtn = P.fake_quant_weight(w, INT4, group)
    err_gptq = (x @ (w - q).T).pow(2).mean()
    err_rtn = (x @ (w - rtn).T).pow(2).mean()
    assert err_gptq < 0.6 * err_rtn  # typically ~0.3 on correlated inputs
    stored = P.quantize_weight(q, INT4, group, scale)
    torch.testing.assert_close(stored.dequantize(), q, rtol=0, atol=1e-6)
    codes = P.unpack_int4(stored.qdata)
    assert codes.min() >= INT4.qmin and codes.max() <= INT4.qmax


def plain_gptq(w: torch.Tensor, h: torch.Tensor, qtype, group, damp: float = 0.01) -> torch.Tensor:
    """GPTQ column by column with no lazy blocks: each column's error goes to every later column at
    once, and a group's scale is searched on its columns as updated so far (float64)."""
    w, h = w.double().clone(), h.double().clone()
    k = w.shape[1]
    g = k if group is None else group
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i in range(k):
        if i % g == 0:
            s = P.search_weight_scale(w[:, i : i + g].float(), qtype, None)[:, 0].double()
        q[:, i] = torch.clamp(torch.round(w[:, i] / s), qtype.qmin, qtype.qmax) * s
        e = (w[:, i] - q[:, i]) / u[i, i]
        w[:, i:] -= e.unsqueeze(1) * u[i, i:].unsqueeze(0)
    return q


@pytest.mark.parametrize("group, k", [(None, 200), (8, 200), (16, 200), (32, 96), (48, 192), (24, 168)])
def test_blocked_gptq_equals_gptq_column_by_column(group, k):
    """The two levels of lazy-update blocks (and a group spanning inner blocks) change only the order
    of float sums: the same integer codes as the plain loop."""
    torch.manual_seed(1)
    w = torch.randn(24, k)
    x = correlated_inputs(4096, k, seed=2)
    h = x.T @ x / x.shape[0]
    q, _ = gptq_quantize(w, h, INT4, group, block=64)
    torch.testing.assert_close(q, plain_gptq(w, h, INT4, group).float(), rtol=0, atol=1e-5)


def test_searched_scales_never_have_more_rounding_error_than_absmax():
    torch.manual_seed(1)
    w = torch.randn(16, 128) * torch.rand(16, 1) + torch.randn(16, 128).pow(3) * 0.1  # heavy tails
    for group in (None, 32):
        searched = P.search_weight_scale(w, INT4, group)
        e_search = (P.fake_quant_weight(w, INT4, group, scale=searched) - w).pow(2).sum(-1)
        e_absmax = (P.fake_quant_weight(w, INT4, group) - w).pow(2).sum(-1)
        assert (e_search <= e_absmax + 1e-7).all()
        assert (e_search < e_absmax).any()


def test_conv_hessian_matches_the_convolution_output_error():
    """tr(dW H dW^T) from the unfolded patches equals the conv's own output error: the column order is right."""
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1)
    qconv = QuantConv2d.from_float(conv, "int4", 8, None)
    collector = HessianCollector(qconv)
    collector.observing = True
    x = torch.randn(2, 3, 9, 9)
    qconv(x)
    collector.remove()
    delta = torch.randn_like(conv.weight) * 0.01
    direct = F.conv2d(x, delta, None, 2, 1).pow(2).sum()
    d = delta.reshape(5, -1)
    via_h = ((d @ collector.hessian) * d).sum()
    torch.testing.assert_close(via_h, direct, rtol=1e-4, atol=1e-6)
    assert collector.rows == 2 * 5 * 5


def test_collector_counts_only_while_observing():
    lin = QuantLinear.from_float(torch.nn.Linear(4, 3), "int4", None, None)
    c = HessianCollector(lin)
    lin(torch.randn(7, 4))
    assert c.hessian is None
    c.observing = True
    lin(torch.randn(7, 4))
    assert c.rows == 7


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_gptq_recipe_end_to_end_beats_round_to_nearest_and_saves_exactly(kind, tmp_path):
    from diffquant.trajectory import record_builtin

    # denoiser inputs on the FP trajectory at the steps GPTQ's Hessians come from (every 5th step):
    # on a random tiny model that is what GPTQ can promise; other samplers are measured on the
    # trained models by the PTQ table
    config = replace(CAL, selection="uniform", every=5)
    inputs = [c.args for c in record_builtin(tiny_model(kind), config, outputs=False, progress=False)]
    with torch.no_grad():
        refs = [tiny_model(kind)(x, t, y) for x, t, y in inputs]
    errors = {}
    for method in ("rtn", "gptq", "gptq-seq"):
        recipe = get_recipe("w4a16").replace(weight_method=method)
        model = quantize(tiny_model(kind), recipe, CAL, progress=False)
        with torch.no_grad():
            errors[method] = sum((model(*i) - r).pow(2).mean().item() for i, r in zip(inputs, refs, strict=True))
        if method != "rtn":
            ratios = model.diffquant_report["gptq"]["error_ratios"]
            assert ratios and sum(ratios.values()) / len(ratios) < 0.9
    assert errors["gptq"] < errors["rtn"] and errors["gptq-seq"] < errors["rtn"]
    x, t, y = inputs[0]
    save_quantized(model, tmp_path / "q")  # the gptq-seq model
    loaded = load_quantized(tmp_path / "q", tiny_model(kind))
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))


class _Chain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.first = torch.nn.Linear(16, 24)
        self.second = torch.nn.Linear(24, 8)

    def forward(self, x, t, cond=None):
        return self.second(torch.relu(self.first(x)))


def test_sequential_gptq_rounds_each_layer_from_its_inputs_in_the_partly_quantized_model():
    """``gptq-seq``: the second layer's Hessian comes from the first layer's *rounded* output, replayed
    from the recorded calls (the user's own loop); independent GPTQ would use the float output."""
    gen = torch.Generator().manual_seed(0)
    xs = [correlated_inputs(8, 16, seed=i) + 0.1 * torch.randn(8, 16, generator=gen) for i in range(3)]

    def my_sampler(model):  # t rises from call to call: three one-step runs of 8 samples each
        for i, x in enumerate(xs):
            model(x, torch.full((8,), 100 * i))

    model = quantize(_Chain(), get_recipe("w4a16").replace(weight_method="gptq-seq"), my_sampler, progress=False)
    fp = _Chain()
    h1 = sum(x.T @ x for x in xs) / 24
    q1, _ = gptq_quantize(fp.first.weight.detach(), h1, INT4, 32)
    torch.testing.assert_close(model.first.quantized_weight(), q1, rtol=0, atol=1e-6)
    with torch.no_grad():
        seq_in = [torch.relu(F.linear(x, q1, fp.first.bias)) for x in xs]
        fp_in = [torch.relu(fp.first(x)) for x in xs]
    q2, _ = gptq_quantize(fp.second.weight.detach(), sum(a.T @ a for a in seq_in) / 24, INT4, 32)
    q2_fp_inputs, _ = gptq_quantize(fp.second.weight.detach(), sum(a.T @ a for a in fp_in) / 24, INT4, 32)
    assert not torch.allclose(q2, q2_fp_inputs)  # the two modes differ on this model
    torch.testing.assert_close(model.second.quantized_weight(), q2, rtol=0, atol=1e-6)


def test_round_weights_rejects_unknown_methods_and_recipe_validates():
    with pytest.raises(ValueError, match="weight_method"):
        get_recipe("w4a8").replace(weight_method="adaround")
    model = prepare(tiny_model("dit"), "w4a16")
    with pytest.raises(ValueError, match="weight_method must be one of"):
        round_weights(model, "adaround")


def test_embedding_tables_stay_int8_in_int4_recipes_unless_overridden():
    from diffquant.nn.modules import QuantEmbedding
    from diffquant.recipe import Override

    model = prepare(tiny_model("dit"), "w4a8")
    tables = [m for m in model.modules() if isinstance(m, QuantEmbedding)]
    assert tables and all(m.weight_qtype.name == "int8" and m.group_size is None for m in tables)
    forced = get_recipe("w4a8").replace(overrides=(Override("*class_embedder*", weights="int4"),))
    model = prepare(tiny_model("dit"), forced)
    assert all(m.weight_qtype.name == "int4" for m in model.modules() if isinstance(m, QuantEmbedding))


def test_gptq_on_smoothed_layers_stores_exactly_what_the_fake_quant_path_computes():
    recipe = get_recipe("w8a8-smoothquant").replace(weights="int4", weight_group_size=16, weight_method="gptq")
    model = prepare(tiny_model("dit"), recipe)
    from diffquant.calibrate import calibrate
    from diffquant.methods.gptq import gptq_calibration
    from diffquant.trajectory import record_builtin

    trajectory = record_builtin(tiny_model("dit"), CAL, [CAL, gptq_calibration(CAL)], progress=False)
    calibrate(model, recipe, trajectory)
    ratios = round_weights(model, "gptq", trajectory, CAL, progress=False)["error_ratios"]
    smoothed = [m for m in model.modules() if isinstance(m, QuantLinear) and m.smooth is not None]
    assert smoothed and any(not torch.all(m.smooth == 1) for m in smoothed)
    assert ratios and all(r < 1.0 for r in ratios.values())
    for m in smoothed:
        before = m.quantized_weight().detach().clone()  # fake quant of W * s with the GPTQ scales
        m.freeze()
        torch.testing.assert_close(m.quantized_weight(), before, rtol=0, atol=1e-6)


def test_gptq_on_a_model_without_a_sampler_says_what_to_pass():
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x, t):
            return self.lin(x)

    with pytest.raises(TypeError, match="weight_method='rtn'"):
        quantize(Bare(), "w4a16", progress=False)
    q = quantize(Bare(), get_recipe("w4a16").replace(weight_method="rtn"), progress=False)  # data-free works
    assert q.lin.frozen


def test_sequential_gptq_without_observed_calls_says_what_to_do():
    def my_sampler(model):  # a loop that never calls the model
        return None

    with pytest.raises(ValueError, match="made no call of the model"):
        quantize(_Chain(), get_recipe("w4a16").replace(weight_method="gptq-seq"), my_sampler, progress=False)


def test_gptq_rounds_fp8_weights_onto_the_e4m3_grid_with_less_output_error_than_nearest():
    fp8 = get_qtype("fp8_e4m3")
    torch.manual_seed(0)
    x = correlated_inputs(512, 64, seed=0)
    w = torch.randn(32, 64)
    h = x.T @ x / x.shape[0]
    q, scale = gptq_quantize(w, h, fp8, None)
    codes = q / scale  # per output channel
    assert torch.equal(codes.to(torch.float8_e4m3fn).float(), codes.float())  # on the E4M3 grid
    rtn = P.fake_quant_weight(w, fp8, None)
    err = lambda d: torch.trace(d @ h @ d.T).item()  # noqa: E731
    assert err(w - q) < 0.7 * err(w - rtn)
    stored = P.quantize_weight(q, fp8, None, scale=scale)
    torch.testing.assert_close(stored.dequantize(), q, rtol=0, atol=0)


def test_fp8_recipe_with_gptq_weights_saves_and_loads_exactly(tmp_path):
    recipe = get_recipe("fp8").replace(weight_method="gptq")
    model = quantize(tiny_model("dit"), recipe, CAL, progress=False)
    assert model.diffquant_report["gptq"]["error_ratios"]
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([300, 300]), torch.tensor([1, 2])
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q", tiny_model("dit"))
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))


@pytest.mark.parametrize("error_rows", [64, 5])  # one block of output rows, or five blocks (the last short)
def test_gptq_in_the_hessians_own_storage_equals_the_copying_path_and_scores_from_the_factor(monkeypatch, error_rows):
    """The float32 path of large layers: factorised in place (no k x k copy), errors from the factor."""
    import diffquant.methods.gptq as G

    monkeypatch.setattr(G, "ERROR_ROWS", error_rows)
    torch.manual_seed(5)
    w = torch.randn(24, 96)
    x = correlated_inputs(4096, 96, seed=5)
    h = x.T @ x / x.shape[0]
    h[:, 7] = h[7, :] = 0.0  # a dead input column
    ref_q, ref_scale = gptq_quantize(w, h, INT4, 32, dtype=torch.float32)
    own = h.clone()
    q, scale, error = gptq_quantize(w, own, INT4, 32, dtype=torch.float32, overwrite=True)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)
    assert not torch.equal(own, h)  # its storage was used
    for d in (w - q, w - P.fake_quant_weight(w, INT4, 32)):
        exact = torch.trace(d.double() @ h.double() @ d.double().T).item()
        assert error(d) == pytest.approx(exact, rel=1e-3)


@pytest.mark.parametrize("in_place", [False, True])
def test_hessian_sums_over_calls_in_place_or_not(monkeypatch, in_place):
    """Large Hessians accumulate with ``addmm_`` (no k x k temporary); the sum is the same."""
    import diffquant.methods.gptq as G

    if in_place:
        monkeypatch.setattr(G, "LARGE_HESSIAN_BYTES", 0)
    lin = QuantLinear.from_float(torch.nn.Linear(6, 3), "int4", None, None)
    c = HessianCollector(lin)
    c.observing = True
    xs = [torch.randn(5, 6) for _ in range(3)]
    for x in xs:
        lin(x)
    exact = sum(x.double().T @ x.double() for x in xs)
    torch.testing.assert_close(c.hessian.double(), exact, rtol=1e-5, atol=1e-5)
    assert c.rows == 15
