"""Temporal Dynamic Quantization: generator fit, frozen tables, per-step lookup, zero overhead."""

import pytest
import torch

from diffquant import CalibrationConfig, get_recipe, load_quantized, quantize, save_quantized
from diffquant import primitives as P
from diffquant.methods.tdq import TDQGenerator, fit_generators
from diffquant.nn import ActQuantizer
from diffquant.qtypes import int8
from diffquant.sampling import sample
from diffquant.timestep import current_step, denoising_step
from tests.conftest import tiny_model

CAL = CalibrationConfig(selection="all", n_samples=4, steps=8, batch_size=4)


def test_generator_fits_smooth_per_step_ranges():
    torch.manual_seed(0)
    ts = torch.arange(999, -1, -20)
    # a range that shrinks 30x from noise to data, with a bump in the middle
    hi = 0.1 + 3.0 * (ts / 1000.0) ** 2 + 0.5 * torch.exp(-(((ts - 500) / 80.0) ** 2))
    lo = 0.2 * hi
    gens = [TDQGenerator(), TDQGenerator()]
    errors = fit_generators(gens, [ts, ts], [torch.stack([lo, hi], 1), torch.stack([hi, hi], 1)], iters=1500)
    assert max(errors) < 0.05  # RMS error of log-ranges: within ~5 %
    pred_lo, pred_hi = gens[0].ranges(ts)
    assert torch.allclose(pred_hi, hi, rtol=0.15) and torch.allclose(-pred_lo, lo, rtol=0.15)


def _tdq_model(kind="unet"):
    return quantize(tiny_model(kind), "w8a6-tdq", CAL, progress=False)


def test_frozen_table_equals_generator_output():
    model = _tdq_model()
    quants = [m for m in model.modules() if isinstance(m, ActQuantizer) and m.mode == "tdq"]
    assert quants
    t = torch.tensor([0, 1, 37, 500, 998, 999])
    for q in quants:
        lo, hi = q.generator.ranges(t)
        scale, zp = P.scale_from_range(lo, hi, q.qtype, q.symmetric)
        assert torch.allclose(q.scale[t], scale) and torch.equal(q.zero_point[t], zp)


def test_step_k_uses_table_entry_of_its_timestep():
    q = ActQuantizer(int8, "tdq", num_timesteps=1000)
    q.scale.copy_(torch.linspace(0.001, 1.0, 1000))
    q.zero_point.zero_()
    q.mark_calibrated()
    x = torch.tensor([10.0])  # on the grid of scale[t], clipped at 255 * scale[t]
    for t in (0, 321, 999):
        s = q.scale[t].item()
        with denoising_step(5, t, 50):
            assert q(x).item() == pytest.approx(min(round(10.0 / s), 255) * s, rel=1e-6)


def test_frozen_model_never_calls_the_generator():
    model = _tdq_model("dit")

    def boom(*a, **k):
        raise AssertionError("generator called on the hot path")

    for m in model.modules():
        if isinstance(m, ActQuantizer) and m.generator is not None:
            m.generator.forward = boom
    images, _ = sample(model, n=2, steps=3, progress=False)
    assert torch.isfinite(images).all()


def test_generations_are_independent_and_reset():
    model = _tdq_model("dit")
    a, _ = sample(model, n=2, steps=4, progress=False)
    assert current_step() is None
    b, _ = sample(model, n=2, steps=4, progress=False)
    assert torch.equal(a, b)


def test_tdq_beats_static_at_low_bits_on_a_step_dependent_layer():
    # activations whose range shrinks 50x over the trajectory: one static scale wastes the grid
    torch.manual_seed(1)
    steps = torch.arange(999, -1, -50)
    data = {int(t): torch.randn(4096) * (0.05 + 2.5 * t / 1000) for t in steps}
    errs = {}
    for mode in ("static", "tdq"):
        q = ActQuantizer("int4", mode, symmetric=True, num_timesteps=1000)
        from diffquant.observers import MseObserver

        q.observer, q.observing = MseObserver(p=2.0), True
        for t, x in data.items():
            with denoising_step(0, t, len(steps)):
                q(x)
        q.observing = False
        if mode == "tdq":
            ts, ext = q.tdq_targets()
            fit_generators([q.generator], [ts], [ext], iters=800)
            q.write_tdq_table()
        else:
            q.finalize()
        err = 0.0
        for t, x in data.items():
            with denoising_step(0, t, len(steps)):
                err += ((q(x) - x) ** 2).mean().item() / (x**2).mean().item()
        errs[mode] = err
    assert errs["tdq"] < 0.5 * errs["static"]


def test_learnable_mode_passes_gradients_to_the_generator():
    q = ActQuantizer(int8, "tdq", num_timesteps=1000)
    q.learnable = True
    x = torch.randn(64) * 3
    with denoising_step(0, 400, 10):
        loss = (q(x) - x).pow(2).sum()
    loss.backward()
    grads = [p.grad for p in q.generator.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_tdq_save_load_identical(tmp_path):
    model = _tdq_model()
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([640, 640]), torch.tensor([1, 2])
    out = model(x, t, y)
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q", model=tiny_model("unet"))
    assert torch.equal(loaded(x, t, y), out)


def test_the_saved_tdq_model_is_its_tables_and_a_loaded_one_has_no_generator(tmp_path):
    from safetensors import safe_open

    model = _tdq_model()
    save_quantized(model, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert any(k.endswith(".scale") for k in keys)
    assert not [k for k in keys if ".generator." in k or k.endswith(".bucket_of_t")]
    loaded = load_quantized(tmp_path / "q", model=lambda: tiny_model("unet"))
    quants = [m for m in loaded.modules() if isinstance(m, ActQuantizer) and m.mode == "tdq"]
    assert quants and all(q.generator is None for q in quants)
    assert all(torch.equal(q.step_table(), torch.arange(1000)) for q in quants) and not hasattr(
        quants[0], "bucket_of_t"
    )


def test_a_version_1_directory_with_generators_and_step_maps_still_loads(tmp_path):
    """Format 1 saved every generator and every quantizer's ``bucket_of_t``: skipped at load, unread."""
    import json

    from safetensors.torch import save_file

    model = _tdq_model()
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([1, 2])
    steps = [torch.full((2,), t) for t in (640, 3)]  # two entries of every table
    with torch.no_grad():
        out = [model(x, t, y) for t in steps]
    save_quantized(model, tmp_path / "q")
    old = {k: v.contiguous() for k, v in model.state_dict().items()}  # generators included
    for name, m in model.named_modules():
        if isinstance(m, ActQuantizer):
            old[f"{name}.bucket_of_t"] = m.step_table().clone()
    assert any(".generator." in k for k in old)
    save_file(old, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "diffquant", "version": "1"})
    meta = json.loads((tmp_path / "q" / "meta.json").read_text())
    (tmp_path / "q" / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    loaded = load_quantized(tmp_path / "q", model=lambda: tiny_model("unet"))
    with torch.no_grad():
        assert all(torch.equal(loaded(x, t, y), o) for t, o in zip(steps, out, strict=True))


def test_interval_plot_shows_table_and_per_step_optimum(tmp_path):
    from diffquant.report.plots import plot_tdq_intervals

    model = _tdq_model()
    quantizers = [q for q in model.modules() if isinstance(q, ActQuantizer) and q.mode == "tdq"]
    assert quantizers and all(q.fit_targets is not None for q in quantizers)
    ts, ext = quantizers[0].fit_targets
    assert len(ts) == CAL.steps and ext.shape == (CAL.steps, 2)
    out = plot_tdq_intervals(quantizers, tmp_path / "intervals.png", k=4)
    assert out.stat().st_size > 10_000
    save_quantized(model, tmp_path / "q")  # the optima are not saved: a loaded model cannot draw it
    loaded = load_quantized(tmp_path / "q", model=tiny_model("unet"))
    with pytest.raises(ValueError, match=r"right after diffquant\.quantize"):
        plot_tdq_intervals([q for q in loaded.modules() if isinstance(q, ActQuantizer)], tmp_path / "x.png")


def _tables(model):
    return [(q.scale.clone(), q.zero_point.clone()) for q in model.modules() if isinstance(q, ActQuantizer)]


class _Mixer(torch.nn.Module):
    """``y = 0.01 x_0 + 10 x_1``: a wide, unimportant channel beside a narrow, important one."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.mix.weight.copy_(torch.tensor([[0.01, 10.0]]))

    def forward(self, x, t, cond=None):
        return self.mix(x)


def _mixer_sampler(model):
    gen = torch.Generator().manual_seed(0)
    steps = [900, 500, 100]
    for i, t in enumerate(steps):
        for _ in range(2):  # two calls per step
            x = torch.cat([torch.rand(64, 1, generator=gen) * 16 - 8, 0.1 * torch.randn(64, 1, generator=gen)], 1)
            with denoising_step(i, t, len(steps)):
                model(x * (1 + t / 1000), torch.full((64,), t))


def test_output_fit_finds_the_range_the_output_needs_where_the_layers_own_range_is_wrong():
    """The per-step range that is best for the layer's input covers the wide channel and rounds the
    important narrow one to zero at int4; the output fit clips the wide channel instead."""
    recipe = get_recipe("w8a4-tdq").replace(
        exclude=(), weight_only=(), attention=False, tdq_fit="range", tdq_fit_iters=300
    )
    ranged = quantize(_Mixer(), recipe, _mixer_sampler, progress=False)
    model = quantize(_Mixer(), recipe.replace(tdq_fit="output"), _mixer_sampler, progress=False)
    fit = model.diffquant_report["tdq_output_fit"]
    assert fit["kept"] and fit["loss_after"] < 0.5 * fit["loss_before"] and fit["steps_improved"] == 3
    q, q0 = model.mix.input_quantizer, ranged.mix.input_quantizer
    assert (q.scale[[100, 500, 900]] < 0.5 * q0.scale[[100, 500, 900]]).all()
    # the frozen table is the refitted generator's output
    t = torch.tensor([0, 100, 500, 999])
    lo, hi = q.generator.ranges(t)
    torch.testing.assert_close(q.scale[t], P.scale_from_range(lo, hi, q.qtype, q.symmetric)[0])
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.rand(256, 1, generator=gen) * 16 - 8, 0.1 * torch.randn(256, 1, generator=gen)], 1) * 1.5
    errs = {}
    for key, m in (("range", ranged), ("output", model)):
        with torch.no_grad(), denoising_step(1, 500, 3):
            errs[key] = (m(x, torch.full((256,), 500)) - _Mixer()(x, None)).pow(2).mean().item()
    assert errs["output"] < 0.5 * errs["range"]


def test_output_fit_that_does_not_help_keeps_the_range_fit():
    torch.manual_seed(0)
    ranged = quantize(tiny_model("unet"), get_recipe("w8a4-tdq").replace(tdq_fit="range"), CAL, progress=False)
    torch.manual_seed(0)
    recipe = get_recipe("w8a4-tdq").replace(tdq_fit="output", tdq_fit_iters=0)  # no step: no lower error
    model = quantize(tiny_model("unet"), recipe, CAL, progress=False)
    assert not model.diffquant_report["tdq_output_fit"]["kept"]
    for a, b in zip(_tables(model), _tables(ranged), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_take_rows_cuts_batch_tensors_only():
    from diffquant.denoiser import take_rows

    rows = torch.tensor([2, 0])
    args = (torch.arange(4.0), torch.tensor(7), {"cond": torch.ones(4, 3), "ctx": torch.ones(2, 5)}, "x")
    x, t, kw, s = take_rows(args, rows, 4)
    assert torch.equal(x, torch.tensor([2.0, 0.0])) and t.item() == 7 and s == "x"
    assert kw["cond"].shape == (2, 3) and kw["ctx"].shape == (2, 5)


def test_tdq_fit_must_be_range_or_output():
    with pytest.raises(ValueError, match="tdq_fit must be"):
        get_recipe("w8a4-tdq").replace(tdq_fit="loss")
    with pytest.raises(ValueError, match="needs act_mode='tdq'"):
        get_recipe("w8a4").replace(tdq_fit="output")


def test_tdq_tables_do_not_depend_on_what_the_process_drew_before():
    """The generators start from a seeded initialisation, so a TDQ recipe gives the same tables whatever
    random numbers were drawn before ``quantize`` (they differed by 7 % median between two code paths
    recording the same trajectory when the MLP took PyTorch's global generator)."""
    tables = []
    for draws in (0, 5):
        m = tiny_model("unet")  # seeded
        torch.rand(draws)  # another code path: other random draws before the model is prepared
        q = quantize(m, get_recipe("w8a8-tdq"), CalibrationConfig(n_samples=4, steps=4, batch_size=4), progress=False)
        tables.append({n: b.clone() for n, b in q.state_dict().items() if n.endswith("quantizer.scale")})
    assert tables[0].keys() == tables[1].keys() and len(tables[0]) > 3
    assert all(torch.equal(tables[0][k], tables[1][k]) for k in tables[0])
    a, b = TDQGenerator(seed=1), TDQGenerator(seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(TDQGenerator(seed=2).mlp[0].weight, a.mlp[0].weight)
