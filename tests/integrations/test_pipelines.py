"""diffusers pipelines: quantize, run, save, load back onto a fresh pipeline, identical images."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import diffquant
from diffquant import CalibrationConfig, get_recipe, load_quantized, quantize, save_quantized
from diffquant.eval.metrics import psnr
from diffquant.integrations.pipelines import PipelineRunner, is_pipeline
from diffquant.nn import QuantModule
from diffquant.quantize import prepare
from diffquant.serialization import QuantizedDirError
from diffquant.timestep import current_step
from tests.integrations.tiny_pipelines import PROMPTS, tiny_dit_pipeline, tiny_sd_pipeline

STEPS = 6
CAL = CalibrationConfig(n_samples=4, steps=STEPS, batch_size=4, every=1)
RECIPES = {
    "w8a8": get_recipe("w8a8"),
    "w8a8-tdq": get_recipe("w8a8-tdq").replace(tdq_iters=150),
    "w4a8": get_recipe("w4a8"),  # GPTQ: Hessians collected by running the pipeline
    # sequential GPTQ: the pipeline's denoiser calls recorded (keyword inputs, CFG batches) and replayed
    "w4a8-seq": get_recipe("w4a8").replace(name="w4a8-seq", weight_method="gptq-seq"),
    # TDQ output fit: the pipeline's calls recorded with their (diffusers-object) outputs, then replayed
    "w8a8-tdq-out": get_recipe("w8a8-tdq").replace(name="w8a8-tdq-out", tdq_iters=150, tdq_fit="output"),
}


def build(kind: str, tmp: Path):
    return tiny_sd_pipeline(tmp) if kind == "sd" else tiny_dit_pipeline()


def conditioning(kind: str) -> dict:
    return {"prompts": PROMPTS} if kind == "sd" else {"class_labels": [0, 3, 7]}


def run(pipe, kind: str) -> np.ndarray:
    cond = PROMPTS[:2] if kind == "sd" else [3, 7]
    gen = torch.Generator().manual_seed(0)
    return pipe(cond, num_inference_steps=STEPS, generator=gen, output_type="np").images


def denoiser(pipe) -> nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("kind", ["sd", "dit"])
@pytest.mark.slow
def test_quantize_run_save_load_identical_images(kind, recipe, tmp_path):
    pipe = build(kind, tmp_path)
    assert is_pipeline(pipe) and not is_pipeline(denoiser(pipe))
    fp_images = run(pipe, kind)
    out = quantize(pipe, RECIPES[recipe], CAL, progress=False, **conditioning(kind))
    assert out is pipe
    quantized = [m for m in denoiser(pipe).modules() if isinstance(m, QuantModule)]
    attention = [m for m in denoiser(pipe).modules() if hasattr(m, "quant_matmuls")]
    assert len(quantized) >= 10 and attention, "the denoiser's Linear/Conv layers and attention are quantized"
    if RECIPES[recipe].weight_method.startswith("gptq"):  # rounded from the pipeline's own calls
        assert len(denoiser(pipe).diffquant_report["gptq"]["error_ratios"]) >= 10
    if RECIPES[recipe].tdq_fit == "output":
        assert denoiser(pipe).diffquant_report["tdq_output_fit"]["steps"] == STEPS
    q_images = run(pipe, kind)
    assert not np.array_equal(q_images, fp_images)
    # 8-bit weights and activations on a random tiny model: close to FP, not equal (measured 42-66 dB)
    assert psnr(torch.from_numpy(q_images), torch.from_numpy(fp_images)) > 30

    save_quantized(pipe, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "meta.json").read_text())
    assert meta["component"] == ("unet" if kind == "sd" else "transformer")
    assert meta["pipeline_class"] == type(pipe).__name__
    fresh = build(kind, tmp_path)  # same seed: the same float weights, as from_pretrained would give
    assert load_quantized(tmp_path / "q", model=fresh) is fresh
    np.testing.assert_array_equal(run(fresh, kind), q_images)


@pytest.mark.parametrize("selection", ["all", "single", "ndtc"])
def test_runner_steps_come_from_the_schedule_and_rows_follow_the_selection(selection, tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    config = CalibrationConfig(selection=selection, n_samples=3, steps=STEPS, batch_size=3, single_index=2)
    everything = PipelineRunner(pipe, PROMPTS).record(dataclasses.replace(config, selection="all"), progress=False)
    pipe.scheduler.set_timesteps(STEPS)
    timesteps = [int(t) for t in pipe.scheduler.timesteps]
    assert everything.timesteps == timesteps
    # classifier-free guidance: [uncond, cond] x 3 samples in each call, each call knows its step
    assert [(c.step.index, c.step.timestep, c.batch) for c in everything] == [
        (i, t, 6) for i, t in enumerate(timesteps)
    ]
    assert all(c.samples == [0, 1, 2, 0, 1, 2] for c in everything)
    kept = PipelineRunner(pipe, PROMPTS).record(config, progress=False)  # only the selected rows are kept
    observed = [(c.step.index, c.batch) for c in kept]
    assert observed == [(c.step.index, c.batch) for c in everything.select(config)]
    if selection == "all":
        assert observed == [(i, 6) for i in range(STEPS)]
    elif selection == "single":
        assert observed == [(2, 6)]
    else:  # per sample one step: a subset of rows (both guidance copies) at some steps, 3 samples in all
        assert sum(b for _, b in observed) == 6 and all(b % 2 == 0 for _, b in observed)


def _rescaled_pipeline():
    """A DiffusionPipeline that passes t / 1000 to its transformer, as Flux does."""
    from diffusers import DDIMScheduler, DiffusionPipeline
    from diffusers.utils.torch_utils import randn_tensor

    class Rescaled(DiffusionPipeline):
        def __init__(self, transformer, scheduler):
            super().__init__()
            self.register_modules(transformer=transformer, scheduler=scheduler)

        @torch.no_grad()
        def __call__(self, class_labels, num_inference_steps=10, generator=None, output_type="np"):
            x = randn_tensor((len(class_labels), 4, 8, 8), generator=generator)
            labels = torch.tensor(class_labels)
            self.scheduler.set_timesteps(num_inference_steps)
            for t in self.scheduler.timesteps:
                eps = self.transformer(x, timestep=(t / 1000).expand(len(x)), class_labels=labels).sample
                x = self.scheduler.step(eps, t, x).prev_sample
            return x

    class Wrapped(nn.Module):  # the DiT block embeds t as given; scale back so the model still works
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, hidden_states, timestep=None, class_labels=None):
            return self.inner(hidden_states, timestep=timestep * 1000, class_labels=class_labels)

    inner = tiny_dit_pipeline().transformer
    return Rescaled(Wrapped(inner), DDIMScheduler(clip_sample=False))


def test_rescaled_timesteps_are_detected_and_saved(tmp_path):
    pipe = _rescaled_pipeline()
    quantize(pipe, "w8a8-tdq", CAL, class_labels=[1, 2], progress=False)
    model = pipe.transformer
    assert model.diffquant_timestep_scale == pytest.approx(1000.0)
    seen = []
    model.inner.proj_out_1.register_forward_pre_hook(lambda m, a: seen.append(current_step().timestep))
    pipe([1, 2], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
    pipe.scheduler.set_timesteps(STEPS)
    assert seen == [int(t) for t in pipe.scheduler.timesteps], "the quantized model sees the scheduler's t"
    save_quantized(pipe, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "meta.json").read_text())["timestep_scale"] == pytest.approx(1000.0)
    fresh = _rescaled_pipeline()
    load_quantized(tmp_path / "q", model=fresh)
    assert fresh.transformer.diffquant_timestep_scale == pytest.approx(1000.0)


def test_output_correction_is_fitted_at_the_pipelines_own_steps():
    # this pipeline passes t / 1000: the recorded calls, and so the fit, must still see each scheduled integer t
    from diffquant.calibrate import calibrate
    from diffquant.methods.output_correction import fit_calibration, fit_output_correction

    pipe = _rescaled_pipeline()
    recipe = get_recipe("w4a8").replace(weight_method="rtn")
    trajectory = PipelineRunner(pipe, class_labels=[1, 2]).record(CAL, [CAL, fit_calibration(CAL)], progress=False)
    assert trajectory.timestep_scale == pytest.approx(1000.0)
    model = prepare(pipe.transformer, recipe)
    calibrate(model, recipe, trajectory)
    ks = fit_output_correction(model, trajectory, CAL)
    pipe.scheduler.set_timesteps(STEPS)
    assert sorted(ks) == sorted(int(t) for t in pipe.scheduler.timesteps)
    gain = model.diffquant_output_correction.gain
    assert torch.isfinite(gain).all() and (gain - 1).abs().max() > 1e-5, "int4 weights leave a correlated error"
    for t, k in ks.items():
        assert float(gain[t]) == pytest.approx(1 / (1 + k), rel=1e-5)


def test_text_pipeline_needs_prompts(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    with pytest.raises(ValueError, match="text-conditioned: pass prompts"):
        quantize(pipe, "w8a8", CAL, progress=False)


def test_bad_pipeline_arguments_are_clear(tmp_path):
    pipe = tiny_dit_pipeline()
    with pytest.raises(ValueError, match="must not set 'generator'"):
        quantize(pipe, "w8a8", CAL, pipeline_kwargs={"generator": None}, progress=False)
    with pytest.raises(ValueError, match="not supported on pipelines"):
        quantize(pipe, "auto", CAL, progress=False)
    with pytest.raises(TypeError, match="pipelines only"):
        quantize(pipe.transformer, "w8a8", CAL, prompts=["x"], progress=False)


def test_quantized_denoiser_of_another_pipeline_is_refused(tmp_path):
    dit = quantize(tiny_dit_pipeline(), "w8a8-dynamic", progress=False)
    save_quantized(dit, tmp_path / "dit")
    with pytest.raises(QuantizedDirError, match="transformer"):
        load_quantized(tmp_path / "dit", model=tiny_sd_pipeline(tmp_path))


def test_readme_snippet_runs_as_written(tmp_path, monkeypatch):
    """The README's diffusers block, executed as written on the tiny pipeline (from_pretrained patched).

    The recipe's own calibration (128 trajectories x 50 steps) and the pipeline's 50 steps are cut
    to a few so the test takes seconds; run unchanged it takes 380 s on the 2-core CPU.
    """
    from diffusers import StableDiffusionPipeline

    text = (Path(__file__).parents[2] / "README.md").read_text()
    block = re.search(r"<!-- readme-snippet: diffusers.*?-->\n```python\n(.*?)```", text, re.S)
    assert block, "README lost its diffusers snippet"
    pipe = tiny_sd_pipeline(tmp_path)
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: pipe))
    monkeypatch.chdir(tmp_path)
    fast = CalibrationConfig(n_samples=2, steps=4, batch_size=2, every=1)
    # the snippet uses the recipe's own calibration (128 trajectories of 50 steps); a smaller one here
    real = diffquant.quantize
    monkeypatch.setattr(
        diffquant, "quantize", lambda p, r, **kw: real(p, get_recipe(r).replace(calibration=fast, tdq_iters=100), **kw)
    )
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", _few_steps(StableDiffusionPipeline.__call__))
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    assert (tmp_path / "sd15-w8a8-tdq" / "model.safetensors").is_file()
    assert namespace["image"].size == (8, 8)
    loaded = load_quantized(tmp_path / "sd15-w8a8-tdq")  # as the snippet's comment says: no pipeline built first
    saved, live = loaded.unet.state_dict(), namespace["pipe"].unet.state_dict()
    assert all(".generator." in k for k in live.keys() - saved.keys())  # TDQ generators are not saved
    assert saved.keys() <= live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)


def _few_steps(call):
    @functools.wraps(call)  # keeps the signature, which quantize() reads
    def wrapper(self, *args, num_inference_steps=50, **kwargs):
        return call(self, *args, num_inference_steps=min(num_inference_steps, 4), **kwargs)

    return wrapper


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_a_quantized_pipeline_runs_on_integer_kernels(backend, tmp_path):
    from diffquant.backends import lower

    pipe = tiny_sd_pipeline(tmp_path)
    quantize(pipe, get_recipe("w8a7"), CAL, prompts=PROMPTS, progress=False)
    reference = run(pipe, "sd")
    lowered, report = lower(pipe, backend)
    assert lowered is pipe and len(report.lowered) >= 10, report.summary()
    # integer kernels vs fake quant from identical noise (the VAE decodes both)
    assert psnr(torch.from_numpy(run(pipe, "sd")), torch.from_numpy(reference)) > 30


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_a_saved_pipeline_loads_by_itself_with_identical_images(kind, tmp_path):
    pipe = build(kind, tmp_path)
    quantize(pipe, "w8a8", CAL, progress=False, **conditioning(kind))
    images = run(pipe, kind)
    save_quantized(pipe, tmp_path / "q")
    saved = tmp_path / "q" / "pipeline"
    component = "unet" if kind == "sd" else "transformer"
    assert (saved / "model_index.json").is_file() and (saved / "vae" / "config.json").is_file()
    # the denoiser's config is there, its float weights are not (the quantized ones are in model.safetensors)
    assert [p.name for p in (saved / component).iterdir()] == ["config.json"]
    # an ordinary directory: safetensors writes its files 0600, mkdtemp its directory 0700
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in (tmp_path / "q").rglob("*")}
    assert all(m == (0o755 if (tmp_path / p).is_dir() else 0o644) for p, m in modes.items()), modes
    loaded = load_quantized(tmp_path / "q")
    assert type(loaded) is type(pipe) and loaded is not pipe
    q = denoiser(loaded)
    assert not any(t.is_meta for t in (*q.parameters(), *q.buffers()))
    assert any(isinstance(m, QuantModule) for m in q.modules())
    np.testing.assert_array_equal(run(loaded, kind), images)


def test_a_pipeline_saved_without_its_components_says_how_to_load_it(tmp_path):
    pipe = quantize(tiny_dit_pipeline(), "w8a8-dynamic", progress=False)
    save_quantized(pipe, tmp_path / "q")
    import shutil

    shutil.rmtree(tmp_path / "q" / "pipeline")
    with pytest.raises(QuantizedDirError, match=r"pipeline/ is missing.*model=pipe"):
        load_quantized(tmp_path / "q")
    assert load_quantized(tmp_path / "q", model=tiny_dit_pipeline()) is not None


def test_quiet_loading_silences_the_load_chatter_and_restores_it(tmp_path):
    """`diffquant sample` printed diffusers' and transformers' advice (install accelerate, torchvision;
    `torch_dtype` renamed) and two progress bars on every load of a quantized pipeline."""
    import logging
    import warnings

    import diffusers.utils.logging as dlog

    from diffquant.integrations.folders import load_folder
    from tests.integrations.tiny_pipelines import save_tiny

    class Records(logging.Handler):  # what reaches the library's loggers (their own handlers' stream varies)
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    folder = save_tiny("sd", tmp_path / "sd")
    seen = Records()
    logging.getLogger("diffusers").addHandler(seen)
    try:
        dlog.set_verbosity_warning()
        before = dlog.get_verbosity(), dlog.is_progress_bar_enabled()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_folder(folder)  # from_pretrained(..., torch_dtype=float32) without accelerate installed
        assert not seen.messages, seen.messages
        assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
        assert (dlog.get_verbosity(), dlog.is_progress_bar_enabled()) == before
        dlog.get_logger("diffusers.pipelines.pipeline_utils").warning("shown again")
        assert seen.messages == ["shown again"]
    finally:
        logging.getLogger("diffusers").removeHandler(seen)
