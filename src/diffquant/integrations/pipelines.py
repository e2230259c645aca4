"""Quantize a diffusers ``DiffusionPipeline``: find its denoiser, calibrate with the pipeline itself.

    pipe = StableDiffusionPipeline.from_pretrained(...)
    diffquant.quantize(pipe, "w8a8-tdq", prompts=["a photo of a cat", "a red bicycle"])
    image = pipe("a photo of a cat").images[0]

Calibration runs the user's pipeline as it is (its scheduler, text encoder, classifier-free
guidance, latent size) once and records its denoiser's calls (``pipe.unet`` or
``pipe.transformer``) at the steps the recipe's method steps select
(:class:`~diffquant.trajectory.Trajectory`); the ``sampler`` field of the
:class:`~diffquant.recipe.CalibrationConfig` is not used, the pipeline's scheduler is. Each call's
step index is its time step located in the scheduler's schedule (never a call count). After quantization the denoiser takes its step from its
own time-step argument (the hook of :func:`diffquant.quantize.prepare`); pipelines that pass a
rescaled time step (Flux passes ``t / 1000``) are detected on the first calibration call and the
factor is kept as ``diffquant_timestep_scale`` (saved with the model).

A quantized pipeline is saved as its quantized denoiser plus the pipeline's other components
(:func:`save_components`, the pipeline's own ``save_pretrained`` with the denoiser's config but not
its float weights); :func:`load_pipeline` loads those components around the rebuilt denoiser.

This module never imports diffusers at import time; pipelines are recognised by their class's MRO.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from diffquant.denoiser import UnsupportedModelError, batch_size, timestep_argument, timestep_of
from diffquant.integrations.quiet import quiet_loading
from diffquant.timestep import StepInfo
from diffquant.trajectory import Recorder, Trajectory, union_rows

DENOISERS = ("unet", "transformer")


def is_pipeline(obj) -> bool:
    """Whether ``obj`` is a diffusers ``DiffusionPipeline`` (checked without importing diffusers)."""
    return any(c.__name__ == "DiffusionPipeline" and c.__module__.startswith("diffusers.") for c in type(obj).__mro__)


def denoiser_name(pipe) -> str:
    """The pipeline attribute holding the denoiser: ``"unet"`` or ``"transformer"``."""
    for name in DENOISERS:
        if isinstance(getattr(pipe, name, None), nn.Module):
            return name
    raise UnsupportedModelError(
        f"{type(pipe).__name__} has no denoiser diffquant knows ({' or '.join(DENOISERS)} attribute); "
        "quantize its denoiser module directly with diffquant.quantize(module, ..., calibration=runner)."
    )


def call_parameters(pipe) -> set[str]:
    """The keyword names the pipeline's ``__call__`` takes."""
    return set(inspect.signature(pipe.__call__).parameters)


def is_text_conditioned(pipe) -> bool:
    """Whether the pipeline is called with a ``prompt`` (Stable Diffusion, PixArt, SD3, Flux...)."""
    return "prompt" in call_parameters(pipe)


def _conditioning(pipe, prompts, class_labels) -> Callable[[int, int], dict]:
    """``cond(lo, hi)``: the pipeline-call keywords that condition calibration samples ``lo..hi-1``."""
    params = call_parameters(pipe)
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


def _timestep_scale(scheduled: float, passed: float) -> float:
    """How the pipeline rescales the scheduler's time step before the denoiser sees it (1.0: not at all)."""
    if passed == 0 or abs(scheduled - passed) <= 1e-3 * max(1.0, abs(scheduled)):
        return 1.0
    return scheduled / passed


class PipelineRunner:
    """Records a diffusers pipeline's denoiser calls into a :class:`~diffquant.trajectory.Trajectory`.

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

    @torch.no_grad()
    def record(
        self, config, selections: list | None = None, *, max_bytes: int | None = None, progress: bool = True
    ) -> Trajectory:
        """Run the pipeline on ``max(n_samples)`` calibration samples and record the rows ``selections``
        (default ``[config]``) replay; steps and seed from ``config``."""
        from tqdm.auto import tqdm

        pipe = self.pipe
        model = getattr(pipe, denoiser_name(pipe))
        name, pos = timestep_argument(model)
        selections = selections or [config]
        pipe.scheduler.set_timesteps(config.steps)
        scheduled = [float(t) for t in pipe.scheduler.timesteps]
        ints = [round(t) for t in scheduled]
        T = int(pipe.scheduler.config.num_train_timesteps)
        n = max(c.n_samples for c in selections)
        traj = Trajectory(max_bytes, num_timesteps=T)
        traj.timesteps = ints
        schedule = getattr(pipe.scheduler, "alphas_cumprod", None)  # DDPM-family schedulers (not flow matching)
        traj.alphas_cumprod = schedule.float() if isinstance(schedule, torch.Tensor) else None
        span = {"lo": 0, "hi": 0}
        scale: list[float] = []
        bar = tqdm(total=n * len(ints), desc="recording FP trajectory", unit="step", disable=not progress, leave=False)

        def locate(args, kwargs):
            passed = float(timestep_of(args, kwargs, name, pos).flatten()[0])
            if not scale:  # the first call is at the first scheduled step
                scale.append(_timestep_scale(scheduled[0], passed))
            index = min(range(len(scheduled)), key=lambda k: abs(scheduled[k] - passed * scale[0]))
            lo, hi = span["lo"], span["hi"]
            batch = batch_size(args, kwargs) or hi - lo
            if batch % (hi - lo):
                raise RuntimeError(f"the denoiser got a batch of {batch} for {hi - lo} samples; cannot map rows")
            bar.update(hi - lo)
            # classifier-free guidance stacks copies of the batch ([uncond, cond]): each row's sample
            return StepInfo(index, ints[index], len(ints)), [lo + j % (hi - lo) for j in range(batch)]

        recorder = Recorder(model, traj, keep=union_rows(selections, ints, T), locate=locate)
        progress_config = dict(getattr(pipe, "_progress_bar_config", {}))
        pipe.set_progress_bar_config(disable=True)
        try:
            for lo in range(0, n, config.batch_size):
                hi = min(n, lo + config.batch_size)
                span.update(lo=lo, hi=hi)
                generators = [torch.Generator().manual_seed(config.seed * 1_000_003 + i) for i in range(lo, hi)]
                pipe(
                    **self.cond(lo, hi), num_inference_steps=config.steps, generator=generators,
                    output_type="latent", **self.kwargs,
                )  # fmt: skip
        finally:
            recorder.close()
            pipe._progress_bar_config = progress_config
            bar.close()
        traj.timesteps = ints
        traj.timestep_scale = scale[0] if scale else 1.0
        return traj


@contextlib.contextmanager
def _config_only(model: nn.Module):
    """Inside the block ``model.save_pretrained(dir)`` writes the model's ``config.json`` and no weights."""
    model.save_pretrained = lambda save_directory, **kwargs: model.save_config(save_directory)
    try:
        yield
    finally:
        del model.save_pretrained


def save_components(pipe, directory: str | os.PathLike) -> Path:
    """Write ``pipe`` with its own ``save_pretrained`` into ``directory``, except the denoiser's weights.

    The denoiser's folder gets its ``config.json`` only (its quantized weights are saved by
    :func:`diffquant.save_quantized`); every other component (VAE, text encoders, tokenizers,
    scheduler) and ``model_index.json`` are what diffusers writes.
    """
    component = denoiser_name(pipe)
    with _config_only(getattr(pipe, component)):
        pipe.save_pretrained(str(directory))
    return Path(directory)


def diffusers_model_class(class_name: str | None):
    """The diffusers model class called ``class_name`` (a ``ModelMixin``), or ``None`` if there is none."""
    import diffusers

    cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) and class_name.isidentifier() else None
    return cls if isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin) else None


def model_builder(config_dir: str | os.PathLike) -> Callable[[], nn.Module]:
    """A builder of the diffusers model whose ``config.json`` is in ``config_dir`` (random weights: build it
    inside :func:`diffquant.serialization.empty_weights` to have none)."""
    import json

    path = Path(config_dir) / "config.json"
    config = json.loads(path.read_text())
    cls = diffusers_model_class(config.get("_class_name"))
    if cls is None:
        raise ValueError(f"{path}: _class_name {config.get('_class_name')!r} is not a diffusers model class")
    return lambda: cls.from_config(config)


def load_pipeline(directory: str | os.PathLike, denoiser: nn.Module):
    """Load the pipeline saved by :func:`save_components` in ``directory`` around ``denoiser``."""
    import json

    from diffusers import DiffusionPipeline

    index = json.loads((Path(directory) / "model_index.json").read_text())
    component = next((name for name in DENOISERS if name in index), None)
    if component is None:
        raise UnsupportedModelError(f"{directory}/model_index.json names no {' or '.join(DENOISERS)}")
    with quiet_loading():
        return DiffusionPipeline.from_pretrained(str(directory), local_files_only=True, **{component: denoiser})


def sample_pipeline(
    pipe,
    n: int = 1,
    steps: int = 50,
    seed: int = 0,
    prompt: str | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 8,
):
    """``n`` images from a pipeline, ``(n, H, W, C)`` floats in ``[0, 1]`` (diffusers' ``output_type="np"``).

    Image ``i`` starts from ``torch.Generator().manual_seed(seed * 1_000_003 + i)``; a text-conditioned
    pipeline draws every image from ``prompt``, a class-conditional one (DiT) gives image ``i`` class ``i``.

    Args:
        pipe: a diffusers pipeline (quantized or not).
        n: number of images.
        steps: the pipeline's ``num_inference_steps``.
        seed: base seed.
        prompt: the prompt of a text-conditioned pipeline (required there, refused elsewhere).
        guidance_scale: classifier-free guidance (default: the pipeline's own).
        batch_size: images per pipeline call.
    """
    import numpy as np

    params = call_parameters(pipe)
    if n < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"n, steps and batch_size must be at least 1, got {n}, {steps} and {batch_size}")
    if "prompt" in params and not prompt:
        raise ValueError(f'{type(pipe).__name__} is text-conditioned: pass a prompt (--prompt "...")')
    if "prompt" not in params and prompt is not None:
        raise ValueError(f"{type(pipe).__name__} takes no prompt; leave --prompt out")
    extra = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    if extra and "guidance_scale" not in params:
        raise ValueError(f"{type(pipe).__name__} takes no guidance scale; leave --guidance out")
    out = []
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        if "prompt" in params:
            cond = {"prompt": [prompt] * (hi - lo)}
        elif "class_labels" in params:
            classes = getattr(getattr(pipe, denoiser_name(pipe)).config, "num_embeds_ada_norm", None) or 1000
            cond = {"class_labels": [i % classes for i in range(lo, hi)]}
        else:
            cond = {"batch_size": hi - lo}
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(lo, hi)]
        result = pipe(**cond, num_inference_steps=steps, generator=generators, output_type="np", **extra)
        out.append(np.asarray(result.images, dtype=np.float32))
    return np.concatenate(out)


def pipeline_images(
    pipe,
    reference,
    n: int = 100,
    steps: int = 50,
    seed: int = 0,
    prompt: str | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 8,
    fashion: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float | None]:
    """Images of a quantized pipeline and its FP ``reference`` from identical noise (and prompts), to score
    with :func:`score_pipeline_images` (``diffquant eval`` and ``report`` on a pipeline directory).

    With ``fashion`` (a ``fashion-sd`` pipeline) they are the evaluation protocol's
    (:func:`diffquant.models.fashion_sd.generate`: the class prompts, guidance 3 unless given); any other
    pipeline: :func:`sample_pipeline`'s (``prompt`` for a text-conditioned one).

    Returns:
        ``(images, reference_images, labels, guidance)``: ``(n, C, H, W)`` in ``[-1, 1]``; ``labels`` (the
        class each prompt names) for ``fashion``, else ``None``; the guidance scale used.
    """
    if fashion:
        from diffquant.models.fashion_sd import GUIDANCE, generate

        if prompt is not None:
            raise ValueError("fashion-sd is evaluated on its class prompts; leave --prompt out")
        guidance = GUIDANCE if guidance_scale is None else guidance_scale
        images, labels = generate(pipe, n, steps, guidance, seed, batch_size)
        ref, _ = generate(reference, n, steps, guidance, seed, batch_size)
        return images, ref, labels, guidance
    images, ref = (
        torch.from_numpy(sample_pipeline(p, n, steps, seed, prompt, guidance_scale, batch_size)).permute(0, 3, 1, 2)
        * 2 - 1
        for p in (pipe, reference)
    )  # fmt: skip
    return images, ref, None, guidance_scale


def score_pipeline_images(images, ref, labels=None) -> dict:
    """Fidelity of :func:`pipeline_images`' pair: ``psnr_vs_fp``, the mean per-image PSNR (dB) of ``images``
    against ``ref``; with ``labels`` (a ``fashion-sd`` pair) also both sets' FD against the training set
    (``fd``, ``fd_fp``), their prompt-class consistency and ``fd_vs_fp``, the FD between the two sets in
    ``fashion-features`` space. Any other pipeline gets PSNR only (there is no feature space for an
    arbitrary domain here)."""
    from diffquant.eval.metrics import psnr_per_image

    out = {}
    if labels is not None:
        from diffquant.eval import Evaluator
        from diffquant.eval.evaluate import extract_features
        from diffquant.eval.fd import feature_stats, frechet_distance

        evaluator = Evaluator()
        score, ref_score = evaluator.score(images, labels), evaluator.score(ref, labels)
        a, b = (feature_stats(extract_features(evaluator.feature_net, x)) for x in (images, ref))
        out.update(fd=score["fd"], fd_fp=ref_score["fd"], fd_vs_fp=frechet_distance(a, b))
        out.update(class_consistency=score["class_consistency"], class_consistency_fp=ref_score["class_consistency"])
    out["psnr_vs_fp"] = float(psnr_per_image(images, ref).mean())
    return out


def save_images(images, path: str | os.PathLike, ncol: int = 8) -> Path:
    """Write ``(n, H, W, C)`` images in ``[0, 1]`` as one PNG (the image itself for ``n = 1``, else a grid),
    through a temporary file renamed into place."""
    from PIL import Image

    from diffquant.report.grid import save_grid

    path = Path(path)
    if len(images) > 1:
        return save_grid(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1, path, ncol=ncol, upscale=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pixels = (images[0] * 255).round().clip(0, 255).astype("uint8")
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
