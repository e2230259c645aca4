"""The recorded FP trajectory: record once, select, replay, spill to disk; the user's own loop."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffquant
from diffquant import CalibrationConfig, get_recipe, quantize
from diffquant.calibrate import run as calibrate_ranges
from diffquant.eval.metrics import sqnr
from diffquant.methods.gptq import gptq_calibration, round_weights
from diffquant.modes import act_quantizers, full_precision, observing, quant_modules
from diffquant.observers import StepAmaxObserver, recipe_observer
from diffquant.prepare import prepare
from diffquant.recipe import RECIPES, GPTQConfig
from diffquant.sampling import SamplerConfig, balanced_labels, sample_batch
from diffquant.timestep import current_step
from diffquant.trajectory import Trajectory, record_builtin, schedule_of, selected_rows, step_buckets
from tests.conftest import tiny_model

CAL = CalibrationConfig(n_samples=6, steps=8, every=3, batch_size=4, sampler="ddpm")


def _streaming_scales(kind: str, recipe) -> dict[str, torch.Tensor]:
    """Calibration as diffquant did it before the trajectory existed: the sampler runs the prepared model
    in float and the quantizers observe the selected rows of each step while it runs (a subset of a
    batch is run once more with the observers on)."""
    model = prepare(tiny_model(kind), recipe)
    config = recipe.calibration
    quants = [q for q in act_quantizers(model) if q.mode != "dynamic"]
    for q in quants:
        q.observer = recipe_observer(recipe)
    schedule = model.config["scheduler"]
    timesteps = schedule_of(model, config)
    rows = selected_rows(config, timesteps, config.n_samples, schedule["num_train_timesteps"])
    sampler = SamplerConfig(sampler=config.sampler, steps=config.steps, seed=config.seed)
    with torch.no_grad(), full_precision(model):
        for lo in range(0, config.n_samples, config.batch_size):
            hi = min(config.n_samples, lo + config.batch_size)
            batch_rows = [[r - lo for r in rs if lo <= r < hi] for rs in rows]

            def model_fn(x, t, y, batch_rows=batch_rows):
                r = batch_rows[current_step().index]
                if len(r) == x.shape[0]:
                    with observing(quants):
                        return model(x, t, y)
                if r:
                    idx = torch.tensor(r)
                    with observing(quants):
                        model(x[idx], t[idx], y[idx])
                return model(x, t, y)

            labels = balanced_labels(hi - lo, model.num_classes, lo)
            sample_batch(model_fn, range(lo, hi), labels, sampler, schedule, model.sample_shape, model.num_classes)
    groups = step_buckets(timesteps, recipe.buckets) if recipe.act_mode == "bucketed" else None
    for q in quants:
        q.finalize(groups)
    return {k: v for k, v in model.state_dict().items() if k.endswith(("scale", "zero_point", "bucket_of_t"))}


@pytest.mark.parametrize("kind", ["unet", "dit"])
@pytest.mark.parametrize("selection", ["uniform", "ndtc", "single", "all"])
def test_replayed_calibration_is_bit_identical_to_the_streaming_path(kind, selection):
    act_mode = {"all": "bucketed"}.get(selection, "static")
    recipe = get_recipe("w8a8").replace(
        calibration=dataclasses.replace(CAL, selection=selection), act_mode=act_mode, buckets=3
    )
    reference = _streaming_scales(kind, recipe)
    model = prepare(tiny_model(kind), recipe)
    with full_precision(model):  # the same FP model records the trajectory the reference sampled
        trajectory = record_builtin(model, recipe.calibration, progress=False)
    calibrate_ranges(model, recipe, trajectory)
    got = {k: v for k, v in model.state_dict().items() if k in reference}
    assert reference and got.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(got[k], v), k


def test_recording_keeps_only_the_rows_the_selections_replay():
    model = tiny_model("dit")
    gptq = gptq_calibration(CAL)
    ndtc = dataclasses.replace(CAL, selection="ndtc")
    trajectory = record_builtin(model, CAL, [ndtc, gptq], progress=False)
    full = record_builtin(model, CAL, [dataclasses.replace(CAL, selection="all")], progress=False)
    assert trajectory.timesteps == full.timesteps and len(trajectory.timesteps) == CAL.steps
    kept = {(c.step.index, s) for c in trajectory for s in c.samples}
    wanted = {
        (k, s) for cfg in (ndtc, gptq) for k, r in enumerate(selected_rows(cfg, full.timesteps, 6, 1000)) for s in r
    }
    assert kept == wanted
    assert trajectory.memory_bytes < full.memory_bytes
    # a selection of the smaller recording equals the same selection of the full one, call by call
    for a, b in zip(trajectory.select(ndtc), full.select(ndtc), strict=True):
        assert a.step == b.step and a.samples == b.samples
        assert torch.equal(a.args[0], b.args[0]) and torch.equal(a.output, b.output)


def test_spilled_trajectory_quantizes_exactly_like_one_in_memory(tmp_path):
    # GPTQ and the output correction (recorded outputs replayed too) and TDQ tables
    recipe = get_recipe("w4a8-tdq").replace(calibration=CAL, output_correction=True, tdq_iters=100)
    from diffquant.quantize import selections

    selections = selections(recipe)
    in_memory = record_builtin(tiny_model("dit"), CAL, selections, progress=False)
    on_disk = record_builtin(tiny_model("dit"), CAL, selections, max_bytes=0, spill_dir=tmp_path, progress=False)
    assert not in_memory.spilled and on_disk.spilled and on_disk.memory_bytes == 0
    assert on_disk.spilled_bytes == in_memory.memory_bytes and len(list(tmp_path.rglob("*.safetensors"))) == len(
        on_disk
    )
    a = quantize(tiny_model("dit"), recipe, in_memory, progress=False).state_dict()
    b = quantize(tiny_model("dit"), recipe, on_disk, progress=False).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    spill = next(tmp_path.iterdir())
    del on_disk
    import gc

    gc.collect()
    assert not spill.exists(), "the spill directory goes with the trajectory"


def test_trajectory_byte_budget_splits_memory_and_disk(tmp_path):
    model = tiny_model("dit")
    whole = record_builtin(model, CAL, progress=False)
    budget = whole.memory_bytes // 2
    split = record_builtin(model, CAL, max_bytes=budget, spill_dir=tmp_path, progress=False)
    assert 0 < split.memory_bytes <= budget and split.spilled
    assert split.memory_bytes + split.spilled_bytes == whole.memory_bytes
    for a, b in zip(whole, split, strict=True):
        assert torch.equal(a.args[0], b.args[0]) and torch.equal(a.args[1], b.args[1]) and a.step == b.step


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_gptq_in_hessian_groups_equals_gptq_all_at_once(kind):
    recipe = get_recipe("w4a16").replace(calibration=CAL)
    trajectory = record_builtin(tiny_model(kind), CAL, [gptq_calibration(CAL)], progress=False)
    results = {}
    for budget in (1 << 40, 1):  # everything at once / every layer its own group
        model = prepare(tiny_model(kind), recipe)
        report = round_weights(model, "gptq", trajectory, CAL, gptq=GPTQConfig(hessian_bytes=budget), progress=False)
        results[budget] = (report, {k: v.clone() for k, v in model.state_dict().items()})
    (one, a), (many, b) = results[1 << 40], results[1]
    assert one["groups"] == 1 and many["groups"] == len(one["error_ratios"]) > 3
    assert one["error_ratios"] == many["error_ratios"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_step_percentile_settings_reach_the_observer():
    recipe = get_recipe("w8a8-percentile").replace(step_percentile=0.25, step_reduction="min", calibration=CAL)
    obs = recipe_observer(recipe)
    assert isinstance(obs, StepAmaxObserver) and obs.step_percentile == 0.25 and obs.reduction == "min"
    trajectory = record_builtin(tiny_model("unet"), dataclasses.replace(CAL, selection="all"), progress=False)
    scales = {}
    for r in (recipe, recipe.replace(step_percentile=1.0, step_reduction="mean")):
        model = prepare(tiny_model("unet"), r.replace(weight_method="rtn", calibration=trajectory_config(CAL)))
        calibrate_ranges(model, model.diffquant_recipe, trajectory)
        scales[r.step_percentile] = torch.stack([q.scale[0] for q in act_quantizers(model)])
    assert not torch.equal(scales[0.25], scales[1.0])  # before the fix every setting ran as 1.0 / mean


def trajectory_config(config):
    return dataclasses.replace(config, selection="all")


class PlainDenoiser(nn.Module):
    """A user's own denoiser: ``forward(x, t, y)``, no sampler settings, no diffusers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Conv2d(1, 16, 3, padding=1)
        self.label = nn.Embedding(10, 16)
        self.time = nn.Linear(1, 16)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 16)
        self.out = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, x, t, y):
        h = F.silu(self.inp(x) + (self.label(y) + self.time(t.float()[:, None] / 1000))[:, :, None, None])
        h = F.silu(self.mid(h))
        h = h * torch.sigmoid(self.head(h.mean((2, 3))))[:, :, None, None]
        return self.out(h)


def my_sampler(model, n: int = 8, steps: int = 10):
    """The user's own loop: a few Euler-like steps from seeded noise (not diffquant's sampler)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.arange(n) % 10
    for t in torch.linspace(999, 0, steps).round().long():
        x = x - 0.1 * model(x, t.expand(n), y)
    return x


@pytest.mark.parametrize("name", list(RECIPES))
def test_a_plain_module_and_its_own_loop_quantize_with_every_named_recipe(name):
    fp = PlainDenoiser().eval()
    with diffquant.recording(fp) as trajectory:
        reference = my_sampler(fp)
    assert len(trajectory) == 10 and trajectory.timesteps[0] == 999 and trajectory.samples == list(range(8))
    assert all(c.step.num_steps == 10 and c.output is not None for c in trajectory)
    recipe = get_recipe(name)
    if recipe.finetune is not None:  # the fine-tuning path, not its length (tests/methods/test_finetune.py)
        recipe = recipe.replace(finetune={"iterations": 40})
    if recipe.finetune is not None and recipe.finetune.rollout > 1:  # an Euler-like loop cannot be rolled
        with pytest.warns(UserWarning, match="rollout=1 instead of"):
            q = quantize(copy.deepcopy(fp), recipe, trajectory, progress=False)
        assert q.diffquant_report["finetune"]["rollout"] == 1
        assert "alphas_cumprod" in q.diffquant_report["finetune"]["rollout_fallback"]
    else:
        q = quantize(copy.deepcopy(fp), recipe, trajectory, progress=False)
    assert all(m.frozen for m in quant_modules(q) if m.weight_qtype is not None)
    assert (recipe.finetune is None) == ("finetune" not in q.diffquant_report)
    with torch.no_grad():
        out = my_sampler(q)
    assert torch.isfinite(out).all()
    floor = 20 if get_recipe(name).weights == "int8" and get_recipe(name).activations in ("int8", "none") else 5
    assert sqnr(reference, out) > floor, name


def test_a_sampler_callable_and_calibrating_give_a_calibrated_model():
    fp = PlainDenoiser().eval()
    with torch.no_grad():
        reference = my_sampler(fp)
    by_callable = quantize(copy.deepcopy(fp), "w8a8-tdq", my_sampler, progress=False)
    qmodel = diffquant.prepare(copy.deepcopy(fp), "w8a8-tdq")
    with diffquant.calibrating(qmodel) as trajectory:
        my_sampler(qmodel)
    assert isinstance(trajectory, Trajectory) and len(trajectory) == 10
    assert "ranges" in qmodel.diffquant_report and "gptq" in qmodel.diffquant_report
    with torch.no_grad():
        for m in (by_callable, qmodel):
            assert sqnr(reference, my_sampler(m)) > 25


def test_recording_splits_runs_and_maps_guidance_rows():
    fp = PlainDenoiser().eval()
    with diffquant.recording(fp) as trajectory:
        my_sampler(fp, n=3, steps=4)
        my_sampler(fp, n=2, steps=4)  # t rises again: a second run, samples 3 and 4
        x = torch.randn(2, 1, 8, 8)
        fp(x, torch.full((2,), 999), torch.tensor([1, 2]))  # a run of two samples, then guidance stacked in one
        fp(torch.cat([x, x]), torch.full((4,), 500), torch.tensor([1, 2, 0, 0]))  # call: each sample twice
    calls = list(trajectory)
    assert [c.samples for c in calls[:4]] == [[0, 1, 2]] * 4 and [c.samples for c in calls[4:8]] == [[3, 4]] * 4
    assert [c.samples for c in calls[8:]] == [[5, 6], [5, 6, 5, 6]] and calls[9].step.index == 1
    assert [c.step.index for c in calls[:4]] == [0, 1, 2, 3] and trajectory.n_runs == 3
    assert trajectory.select(n_samples=2, selection="all").samples == [0, 1]
    with pytest.raises(ValueError, match="one time step per call"), diffquant.recording(fp):
        fp(torch.randn(2, 1, 8, 8), torch.tensor([999, 500]), torch.tensor([0, 1]))


def test_quantize_without_a_trajectory_says_how_to_record_one():
    with pytest.raises(TypeError, match=r"diffquant\.recording"):
        quantize(PlainDenoiser(), "w8a8", progress=False)
    with pytest.raises(ValueError, match="made no call of the model"):
        quantize(PlainDenoiser(), "w8a8", lambda model: None, progress=False)
    q = quantize(PlainDenoiser(), "w8a8-dynamic", progress=False)  # data-free
    assert q.diffquant_report == {}


def test_quantization_report_reads_per_step_and_survives_save_and_load(tmp_path):
    q = quantize(PlainDenoiser().eval(), "w4a8", my_sampler, progress=False)
    report = q.diffquant_report
    assert isinstance(report, diffquant.QuantizationReport)
    assert report.steps == ["ranges", "gptq", "output_correction"] and report["trajectory"]["calls"] == 10
    lines = str(report).splitlines()
    assert [line.split()[0] for line in lines] == ["trajectory", "ranges", "gptq", "output_correction"]
    assert "per-step output gain on 10 steps" in lines[3]
    n_layers = len(report["gptq"]["error_ratios"])
    assert f"{n_layers} layers in {report['gptq']['groups']} Hessian group" in lines[2] and "median" in lines[2]
    diffquant.save_quantized(q, tmp_path / "q")
    loaded = diffquant.load_quantized(tmp_path / "q", lambda: PlainDenoiser())
    assert isinstance(loaded.diffquant_report, diffquant.QuantizationReport)
    assert loaded.diffquant_report == report.to_dict() and str(loaded.diffquant_report) == str(report)
    with pytest.raises(TypeError, match="dict of step reports"):
        diffquant.QuantizationReport.from_dict(["gptq"])


def test_a_quantized_plain_module_runs_at_the_step_its_own_t_names():
    q = quantize(PlainDenoiser().eval(), get_recipe("w8a8").replace(weight_method="rtn"), my_sampler, progress=False)
    seen = []
    q.mid.register_forward_pre_hook(lambda m, a: seen.append(current_step().timestep))
    with torch.no_grad():
        for t in (999, 500, 0):
            q(torch.randn(2, 1, 8, 8), torch.full((2,), t), torch.tensor([1, 2]))
    assert seen == [999, 500, 0] and current_step() is None
