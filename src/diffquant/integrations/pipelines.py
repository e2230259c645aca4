"""Quantize a diffusers ``DiffusionPipeline``: find its denoiser, calibrate with the pipeline itself.

    pipe = StableDiffusionPipeline.from_pretrained(...)
    diffquant.quantize(pipe, "w8a8-tdq", prompts=["a photo of a cat", "a red bicycle"])
    image = pipe("a photo of a cat").images[0]

Calibration runs the user's pipeline as it is (its scheduler, text encoder, classifier-free
guidance, latent size) and observes its denoiser (``pipe.unet`` or ``pipe.transformer``) at the
steps the recipe's :class:`~diffquant.recipe.CalibrationConfig` selects; its ``sampler`` field is
not used, the pipeline's scheduler is. During calibration each denoiser call runs inside an explicit
:func:`~diffquant.timestep.denoising_step` whose index is the call's time step located in the
scheduler's schedule (never a call count). After quantization the denoiser takes its step from its
own time-step argument (the hook of :func:`diffquant.quantize.prepare`); pipelines that pass a
rescaled time step (Flux passes ``t / 1000``) are detected on the first calibration call and the
factor is kept as ``diffquant_timestep_scale`` (saved with the model).

This module never imports diffusers at import time; pipelines are recognised by their class's MRO.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

DENOISERS = ("unet", "transformer")


def is_pipeline(obj) -> bool:
    """Whether ``obj`` is a diffusers ``DiffusionPipeline`` (checked without importing diffusers)."""
    return any(c.__name__ == "DiffusionPipeline" and c.__module__.startswith("diffusers.") for c in type(obj).__mro__)


def denoiser_name(pipe) -> str:
    """The pipeline attribute holding the denoiser: ``"unet"`` or ``"transformer"``."""
    for name in DENOISERS:
        if isinstance(getattr(pipe, name, None), nn.Module):
            return name
    from diffquant.quantize import UnsupportedModelError

    raise UnsupportedModelError(
        f"{type(pipe).__name__} has no denoiser diffquant knows ({' or '.join(DENOISERS)} attribute); "
        "quantize its denoiser module directly with diffquant.quantize(module, ..., calibration=runner)."
    )


def _conditioning(pipe, prompts, class_labels) -> Callable[[int, int], dict]:
    """``cond(lo, hi)``: the pipeline-call keywords that condition calibration samples ``lo..hi-1``."""
    params = inspect.signature(pipe.__call__).parameters
    if "prompt" in params:
        if not prompts:
            raise ValueError(
                f"{type(pipe).__name__} is text-conditioned: pass prompts=[...] (a few representative prompts; "
                "calibration sample i uses prompts[i % len(prompts)])."
            )
        if isinstance(prompts, str):
            prompts = [prompts]
        return lambda lo, hi: {"prompt": [prompts[i % len(prompts)] for i in range(lo, hi)]}
    if "class_labels" in params:
        if class_labels is None:
            n = getattr(getattr(pipe, denoiser_name(pipe)).config, "num_embeds_ada_norm", None) or 1000
            class_labels = list(range(n))
        labels = [int(c) for c in class_labels]
        if not labels:
            raise ValueError("class_labels is empty; pass the labels to calibrate with.")
        return lambda lo, hi: {"class_labels": [labels[i % len(labels)] for i in range(lo, hi)]}
    if prompts is not None or class_labels is not None:
        raise ValueError(f"{type(pipe).__name__}.__call__ takes neither prompt nor class_labels.")
    return lambda lo, hi: {"batch_size": hi - lo} if "batch_size" in params else {}


def _take(obj, idx: torch.Tensor, batch: int):
    """``obj`` with every tensor whose first dimension is the batch indexed by ``idx`` (recursively)."""
    if isinstance(obj, torch.Tensor):
        return obj[idx] if obj.ndim >= 1 and obj.shape[0] == batch else obj
    if isinstance(obj, tuple | list):
        return type(obj)(_take(o, idx, batch) for o in obj)
    if isinstance(obj, dict):
        return {k: _take(v, idx, batch) for k, v in obj.items()}
    return obj


def _timestep_scale(scheduled: float, passed: float) -> float:
    """How the pipeline rescales the scheduler's time step before the denoiser sees it (1.0: not at all)."""
    if passed == 0 or abs(scheduled - passed) <= 1e-3 * max(1.0, abs(scheduled)):
        return 1.0
    return scheduled / passed


class PipelineRunner:
    """A calibration runner (see :func:`diffquant.calibrate.calibrate`) that runs a diffusers pipeline.

    Args:
        pipe: the pipeline; its denoiser is the model being calibrated.
        prompts: prompts for text-conditioned pipelines (sample ``i`` uses ``prompts[i % len]``).
        class_labels: labels for class-conditional pipelines (default: every class in turn).
        pipeline_kwargs: more keywords for each pipeline call (``guidance_scale``, ``height``, ...).
    """

    def __init__(self, pipe, prompts=None, class_labels=None, pipeline_kwargs: dict | None = None):
        self.pipe = pipe
        self.cond = _conditioning(pipe, prompts, class_labels)
        self.kwargs = dict(pipeline_kwargs or {})
        for reserved in ("num_inference_steps", "generator", "prompt", "class_labels", "output_type"):
            if reserved in self.kwargs:
                raise ValueError(
                    f"pipeline_kwargs must not set {reserved!r}: calibration sets it (steps and seed come from "
                    "the CalibrationConfig, conditioning from prompts / class_labels)."
                )
        self.timestep_scale = 1.0

    @torch.no_grad()
    def __call__(self, model: nn.Module, config, observe: Callable, progress: bool = True) -> list[int]:
        from tqdm.auto import tqdm

        from diffquant.calibrate import observed_call, selected_rows
        from diffquant.quantize import timestep_argument
        from diffquant.timestep import denoising_step

        pipe = self.pipe
        name, pos = timestep_argument(model)
        pipe.scheduler.set_timesteps(config.steps)
        scheduled = [float(t) for t in pipe.scheduler.timesteps]
        ints = [round(t) for t in scheduled]
        rows = selected_rows(config, ints, config.n_samples, pipe.scheduler.config.num_train_timesteps)
        span = {"lo": 0, "hi": 0}
        scale: list[float] = []
        original = model.forward
        bar = tqdm(
            total=config.n_samples * len(ints), desc="calibrating", unit="step", disable=not progress, leave=False
        )

        def forward(*args, **kwargs):
            t = kwargs[name] if name in kwargs else args[pos]
            passed = float(torch.as_tensor(t).flatten()[0])
            if not scale:  # the first call is at the first scheduled step
                scale.append(_timestep_scale(scheduled[0], passed))
            index = min(range(len(scheduled)), key=lambda k: abs(scheduled[k] - passed * scale[0]))
            lo, hi = span["lo"], span["hi"]
            x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.ndim >= 1), None)
            batch = x.shape[0] if x is not None else hi - lo
            if batch % (hi - lo):
                raise RuntimeError(f"the denoiser got a batch of {batch} for {hi - lo} samples; cannot map rows")
            # classifier-free guidance stacks copies of the batch ([cond, uncond]): observe each copy
            local = [r - lo for r in rows[index] if lo <= r < hi]
            positions = [r + j * (hi - lo) for j in range(batch // (hi - lo)) for r in local]

            def call(idx):
                if idx is None:
                    return original(*args, **kwargs)
                return original(*_take(args, idx, batch), **_take(kwargs, idx, batch))

            with denoising_step(index, ints[index], len(ints)):
                out = observed_call(observe.quantizers, call, positions, batch)
            bar.update(hi - lo)
            return out

        forward.__wrapped__ = original  # observers that re-run a call use the model's own forward
        progress_config = dict(getattr(pipe, "_progress_bar_config", {}))
        pipe.set_progress_bar_config(disable=True)
        model.forward = forward
        try:
            for lo in range(0, config.n_samples, config.batch_size):
                hi = min(config.n_samples, lo + config.batch_size)
                span.update(lo=lo, hi=hi)
                generators = [torch.Generator().manual_seed(config.seed * 1_000_003 + i) for i in range(lo, hi)]
                pipe(
                    **self.cond(lo, hi), num_inference_steps=config.steps, generator=generators,
                    output_type="latent", **self.kwargs,
                )  # fmt: skip
        finally:
            del model.forward
            pipe._progress_bar_config = progress_config
            bar.close()
        self.timestep_scale = scale[0] if scale else 1.0
        return ints


def quantize_pipeline(
    pipe,
    recipe="w8a8",
    calibration=None,
    *,
    prompts=None,
    class_labels=None,
    pipeline_kwargs: dict | None = None,
    progress: bool = True,
):
    """Quantize ``pipe``'s denoiser in place, calibrated on the pipeline's own sampling; returns ``pipe``.

    Args:
        pipe: a diffusers ``DiffusionPipeline`` with a ``unet`` or ``transformer``.
        recipe: a recipe or its name.
        calibration: a :class:`~diffquant.recipe.CalibrationConfig` (default: the recipe's); its
            ``n_samples``, ``steps``, ``selection``, ``seed`` and ``batch_size`` are used.
        prompts: prompts for text-conditioned pipelines.
        class_labels: labels for class-conditional pipelines (DiT).
        pipeline_kwargs: more keywords for each calibration call (``guidance_scale``, ``height``, ``width``).
        progress: show a progress bar.
    """
    from diffquant.quantize import quantize
    from diffquant.recipe import CalibrationConfig, get_recipe

    recipe = get_recipe(recipe)
    if calibration is not None and not isinstance(calibration, CalibrationConfig):
        raise TypeError("for a pipeline, calibration must be a CalibrationConfig (the pipeline is the runner)")
    if calibration is not None:
        recipe = recipe.replace(calibration=calibration)
    if recipe.weight_bits_budget is not None:
        raise ValueError(
            f"recipe {recipe.name!r} allocates bits by per-layer sensitivity, which replays recorded (x, t, cond) "
            "inputs; that is not supported on pipelines yet. Quantize with a fixed recipe (diffquant recipes)."
        )
    model = getattr(pipe, denoiser_name(pipe))
    runner = PipelineRunner(pipe, prompts, class_labels, pipeline_kwargs)
    num_timesteps = int(pipe.scheduler.config.num_train_timesteps)
    quantize(model, recipe, runner, num_timesteps=num_timesteps, progress=progress)
    if runner.timestep_scale != 1.0:
        model.diffquant_timestep_scale = runner.timestep_scale
    model.diffquant_num_timesteps = num_timesteps
    return pipe
