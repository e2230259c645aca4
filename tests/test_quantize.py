"""End to end on tiny models: prepare, calibrate on the trajectory, freeze, save, load."""

import dataclasses
import subprocess
import sys

import pytest
import torch
from torch import nn

import diffquant
from diffquant import CalibrationConfig, get_recipe, load_quantized, quantize, save_quantized
from diffquant.eval.metrics import sqnr
from diffquant.modes import act_quantizers, full_precision
from diffquant.nn import ActQuantizer, CalibrationError, QuantConv2d
from diffquant.quantize import UnsupportedModelError, prepare
from diffquant.recipe import Recipe
from diffquant.serialization import QuantizedDirError
from diffquant.trajectory import selected_rows, step_buckets
from tests.conftest import tiny_model

CAL = CalibrationConfig(
    n_samples=4, steps=6, every=2, batch_size=4, sampler="ddpm"
)  # DDPM clips x0: the random tiny UNet's DDIM trajectories diverge
RECIPES = {
    "w8a8": get_recipe("w8a8"),
    "w4a8": get_recipe("w4a8"),
    "fp8": get_recipe("fp8"),
    "fp8-attn": get_recipe("fp8-attn"),
    "w8a16": get_recipe("w8a16"),
    "w8a4": get_recipe("w8a4"),
    "w4a4": get_recipe("w4a4"),
    "w4a16": get_recipe("w4a16"),
    "w4a16-mse": get_recipe("w4a16").replace(weight_method="mse", name="w4a16-mse"),
    "w4a8-tdq": get_recipe("w4a8-tdq"),
    "w4a4-tdq": get_recipe("w4a4-tdq"),
    "w8a8-dynamic": get_recipe("w8a8-dynamic"),
    "w4a4-group": get_recipe("w4a4").replace(
        act_mode="dynamic", act_granularity="group", act_group_size=8, name="w4a4-g8"
    ),
    "bucketed": get_recipe("w8a6").replace(act_mode="bucketed", buckets=3, name="w8a6-b3"),
    "minmax-single": get_recipe("w8a8").replace(observer="minmax", calibration={"selection": "single"}),
    "percentile-ndtc": get_recipe("w8a8").replace(observer="percentile", calibration={"selection": "ndtc"}),
    "trt-percentile": get_recipe("w8a8-percentile"),
}
# SQNR (dB) of each recipe's output against the FP output on the test's own input, measured on
# torch 2.13.0 (tiny random models, seed 0); the floors sit 6 dB under, so a real regression fails.
MEASURED_SQNR = {
    "unet": {
        "w8a8": 32.6, "w4a8": 19.1, "fp8": 22.5, "fp8-attn": 22.3, "w8a16": 43.0, "w8a4": 13.2, "w4a4": 12.0,
        "w4a16": 19.2, "w4a16-mse": 18.3, "w4a8-tdq": 19.0, "w4a4-tdq": 12.5, "w8a8-dynamic": 38.3, "w4a4-group": 16.1,
        "bucketed": 23.3, "minmax-single": 32.4, "percentile-ndtc": 31.3, "trt-percentile": 32.1,
    },
    "dit": {
        "w8a8": 39.9, "w4a8": 29.3, "fp8": 33.6, "fp8-attn": 33.5, "w8a16": 47.0, "w8a4": 31.1, "w4a4": 26.9,
        "w4a16": 29.4, "w4a16-mse": 28.3, "w4a8-tdq": 29.3, "w4a4-tdq": 27.1, "w8a8-dynamic": 49.9, "w4a4-group": 29.2,
        "bucketed": 37.4, "minmax-single": 40.1, "percentile-ndtc": 40.2, "trt-percentile": 39.1,
    },
}  # fmt: skip


def _inputs(model, t=500):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *model.sample_shape, generator=g)
    return x, torch.full((2,), t), torch.tensor([3, 10])


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_prepared_model_in_float_mode_matches_the_original(kind):
    model = tiny_model(kind)
    x, t, y = _inputs(model)
    ref = model(x, t, y)
    prepare(model, "w8a8")
    with full_precision(model):
        assert torch.allclose(model(x, t, y), ref, atol=1e-5)


def test_prepare_takes_over_the_float_weights_without_a_copy():
    model = tiny_model("unet")
    before = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d | nn.Embedding)}
    prepare(model, "w8a8")
    after = {n: m.weight for n, m in model.named_modules() if isinstance(m, diffquant.nn.QuantModule)}
    assert after and all(after[n] is before[n] for n in after)  # the same Parameter objects: no second copy
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    tied.forward = lambda x, t: tied[1](tied[0](x))  # a (x, t) denoiser for prepare's contract check
    prepare(tied, get_recipe("w8a8").replace(exclude=()))
    w0, w1 = tied[0].weight, tied[1].weight
    assert w0 is not w1 and w0.data_ptr() != w1.data_ptr() and torch.equal(w0, w1)  # each rounds its own


@pytest.mark.parametrize("kind", ["unet", "dit"])
@pytest.mark.parametrize("name", list(RECIPES))
def test_quantize_save_load_bit_identical(kind, name, tmp_path):
    model = tiny_model(kind)
    x, t, y = _inputs(model)
    ref = model(x, t, y)
    q = quantize(model, RECIPES[name], CAL, progress=False)
    out = q(x, t, y)
    assert sqnr(ref, out) > MEASURED_SQNR[kind][name] - 6
    save_quantized(q, tmp_path / "q", extra={"note": "test"})
    fresh = tiny_model(kind)
    loaded = load_quantized(tmp_path / "q", model=fresh)
    assert torch.equal(loaded(x, t, y), out)


def test_shortcut_split_gets_two_scales():
    model = quantize(tiny_model("unet"), "w8a8", CAL, progress=False)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, QuantConv2d) and m.input_split}
    assert any(n.endswith("up_blocks.0.resnets.0.conv1") for n in convs)
    for m in convs.values():
        assert m.input_quantizer.scale.item() != m.input_quantizer_2.scale.item()
    assert not any(".down_blocks." in n for n in convs)


def test_default_exclusions_stay_float():
    model = quantize(tiny_model("dit"), "w8a8", CAL, progress=False)
    types = {n: type(m) for n, m in model.named_modules()}
    assert types["dit.pos_embed.proj"] is nn.Conv2d and types["dit.proj_out_2"] is nn.Linear
    assert types["dit.transformer_blocks.0.ff.net.2"] is not nn.Linear


def test_override_by_pattern():
    recipe = get_recipe("w8a8").replace(
        overrides=(
            diffquant.Override("*ff.net.2", weights="int4", weight_group_size=32),
            diffquant.Override("*to_out.0", skip=True),
        )
    )
    model = quantize(tiny_model("dit"), recipe, CAL, progress=False)
    mods = dict(model.named_modules())
    assert str(mods["dit.transformer_blocks.0.ff.net.2"].weight_qtype) == "int4"
    assert type(mods["dit.transformer_blocks.0.attn1.to_out.0"]) is nn.Linear


def test_bucketed_scales_follow_the_step():
    model = quantize(tiny_model("unet"), RECIPES["bucketed"], CAL, progress=False)
    q = next(m for m in model.modules() if isinstance(m, ActQuantizer))
    assert q.scale.numel() == 3 and len(set(q.scale.tolist())) > 1
    x, _, y = _inputs(model)
    a = model(x, torch.full((2,), 999), y)
    b = model(x, torch.full((2,), 999), y)
    assert torch.equal(a, b)


def test_selection_rules():
    ts = list(range(999, -1, -100))  # 10 steps
    assert [len(r) for r in selected_rows(CalibrationConfig(selection="single", steps=10), ts, 4, 1000)] == [0] * 9 + [
        4
    ]
    uni = selected_rows(CalibrationConfig(selection="uniform", every=3, steps=10), ts, 4, 1000)
    assert [len(r) for r in uni] == [4, 0, 0, 4, 0, 0, 4, 0, 0, 4]
    nd = selected_rows(CalibrationConfig(selection="ndtc", steps=10), ts, 1000, 1000)
    counts = [len(r) for r in nd]
    assert sum(counts) == 1000 and counts[6] > counts[0]  # N(0.4 T, 0.4 T): mass near t = 400
    assert step_buckets(ts, 3) == [[999, 899, 799, 699], [599, 499, 399], [299, 199, 99]]
    assert step_buckets(ts[:2], 4) == [[999], [899], [], []]  # more buckets than recorded steps


def test_more_buckets_than_recorded_steps_calibrates_each_step():
    recipe = Recipe(act_mode="bucketed", buckets=50, calibration=CalibrationConfig(selection="all"))
    q = quantize(tiny_model("unet"), recipe, dataclasses.replace(CAL, selection="all"), progress=False)
    quant = next(q for q in act_quantizers(q) if q.mode == "bucketed")
    owners = quant.bucket_of_t.unique()
    assert len(owners) == CAL.steps and int(owners.max()) == CAL.steps - 1  # the first buckets, one per step


def test_model_without_timestep_argument():
    class NoT(nn.Module):
        def forward(self, x, cond):
            return x

    with pytest.raises(UnsupportedModelError, match=r"forward\(x, cond\).*timestep"):
        quantize(NoT(), "w8a8")


def test_non_finite_activation_names_layer_and_step():
    model = tiny_model("dit")
    blocks = model.dit.transformer_blocks[0]
    blocks.ff.net[2].weight.data[0, 0] = float("inf")
    with pytest.raises(CalibrationError, match=r"dit\.transformer_blocks\.0\..*time step \d+"):
        quantize(model, "w8a8", CAL, progress=False)


def test_load_rejects_another_model(tmp_path):
    save_quantized(quantize(tiny_model("dit"), "w8a8-dynamic", progress=False), tmp_path / "d")
    with pytest.raises(QuantizedDirError, match="FashionDiT"):
        load_quantized(tmp_path / "d", model=tiny_model("unet"))
    (tmp_path / "d" / "recipe.json").unlink()
    with pytest.raises(QuantizedDirError, match=r"recipe\.json is missing"):
        load_quantized(tmp_path / "d", model=tiny_model("dit"))


def test_truncated_quantized_weights(tmp_path):
    save_quantized(quantize(tiny_model("dit"), "w8a8-dynamic", progress=False), tmp_path / "d")
    f = tmp_path / "d" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(QuantizedDirError, match="corrupt"):
        load_quantized(tmp_path / "d", model=tiny_model("dit"))


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model = quantize(tiny_model("dit"), "w8a8-dynamic", progress=False)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_int4_storage_is_smaller():
    w8 = quantize(tiny_model("dit"), "w8a8-dynamic", progress=False)
    w4 = quantize(
        tiny_model("dit"), get_recipe("w8a8-dynamic").replace(weights="int4", weight_group_size=32), progress=False
    )
    from diffquant.serialization import weight_bytes

    assert weight_bytes(w4) < weight_bytes(w8)


PEAK_SCRIPT = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from tests.conftest import tiny_model
from diffquant import CalibrationConfig, quantize
torch.set_num_threads(1)
n = int(sys.argv[1])
quantize(tiny_model("unet"), "w8a8", CalibrationConfig(n_samples=n, steps=4, every=1, batch_size=32), progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_calibration_peak_memory_does_not_grow_with_samples(tmp_path):
    import pathlib

    root = str(pathlib.Path(__file__).resolve().parents[1])
    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT.format(root=root))
    peaks = {}
    for n in (64, 512):
        out = subprocess.run([sys.executable, str(script), str(n)], capture_output=True, text=True, check=True)
        peaks[n] = int(out.stdout.strip().splitlines()[-1])  # KiB
    assert peaks[512] < peaks[64] * 1.1 + 10_000, peaks


@pytest.mark.parametrize(
    ("level", "conv", "ff", "qkv", "out", "matmuls"),
    [(1, True, False, False, False, False), (2, True, True, False, False, False), (2.5, True, True, True, False, False),
     (3, True, True, True, True, False), (4, True, True, True, True, True)],
)  # fmt: skip
def test_quant_levels(level, conv, ff, qkv, out, matmuls):
    model = prepare(tiny_model("dit"), get_recipe("w8a8").replace(quant_level=level))
    mods = dict(model.named_modules())
    block = "dit.transformer_blocks.0"
    assert isinstance(mods[f"{block}.ff.net.2"], nn.Linear) is not ff
    assert isinstance(mods[f"{block}.attn1.to_q"], nn.Linear) is not qkv
    assert isinstance(mods[f"{block}.attn1.to_out.0"], nn.Linear) is not out
    assert hasattr(mods[f"{block}.attn1"], "quant_matmuls") is matmuls
    unet = dict(prepare(tiny_model("unet"), get_recipe("w8a8").replace(quant_level=level)).named_modules())
    assert isinstance(unet["unet.down_blocks.0.resnets.0.conv1"], QuantConv2d) is conv


@pytest.mark.parametrize("kind", ["unet", "dit"])
@pytest.mark.parametrize("name", ["w8a8", "w4a8", "bucketed"])
def test_load_on_meta_equals_the_old_load_into_a_float_model_bit_for_bit(kind, name, tmp_path):
    """``load_quantized`` builds the architecture with empty (meta) parameters and assigns the saved
    integers; the old path quantized a float copy again (prepare, freeze) and copied the state in."""
    from diffquant.models.builtin import load_state_file
    from diffquant.prepare import freeze

    q = quantize(tiny_model(kind), RECIPES[name], CAL, progress=False)
    save_quantized(q, tmp_path / "q")
    state = load_state_file(tmp_path / "q" / "model.safetensors")
    old = freeze(prepare(tiny_model(kind), RECIPES[name]))
    old.load_state_dict(state)
    built = load_quantized(tmp_path / "q", lambda: tiny_model(kind))
    into_float = load_quantized(tmp_path / "q", tiny_model(kind))
    assert not any(t.is_meta for t in built.state_dict().values())
    assert all("weight" not in m._parameters for m in built.modules() if getattr(m, "frozen", False))
    x, t, y = _inputs(built)
    with torch.no_grad():
        reference = old(x, t, y)
        for m in (built, into_float):
            assert m.state_dict().keys() == old.state_dict().keys()
            assert all(
                torch.equal(a, b) for a, b in zip(m.state_dict().values(), old.state_dict().values(), strict=True)
            )
            assert torch.equal(m(x, t, y), reference)


def test_load_quantized_without_a_model_builds_the_builtin_named_in_meta(tmp_path):
    from diffquant.models import load_builtin

    q = quantize(load_builtin("fashion-dit"), "w8a8-dynamic", progress=False)  # data-free: no trajectory
    save_quantized(q, tmp_path / "q", "fashion-dit")
    loaded = load_quantized(tmp_path / "q")
    x, t, y = _inputs(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), q(x, t, y))
    assert loaded.diffquant_recipe == q.diffquant_recipe
    with pytest.raises(QuantizedDirError, match=r"saved from a custom model; pass a builder of its architecture"):
        save_quantized(quantize(tiny_model("dit"), "w8a8-dynamic", progress=False), tmp_path / "anon")
        load_quantized(tmp_path / "anon")
