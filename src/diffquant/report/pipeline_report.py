"""``diffquant report --quantized DIR`` for a quantized diffusers pipeline: one HTML page against its FP pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffquant.denoiser import input_channels, input_name, noise_prediction
from diffquant.recipe import CalibrationConfig
from diffquant.report.grid import save_grid
from diffquant.report.html import write_report
from diffquant.report.plots import plot_step_sqnr


def record_pipeline_trajectory(reference, n: int = 4, steps: int = 50, prompts=None, pipeline_kwargs=None, seed=777):
    """The FP ``reference`` pipeline's denoiser calls over ``n`` samples of ``steps`` steps, every step kept
    (``seed``: the noise; by default not the calibration seed, so error curves are not measured on the data
    the ranges were fitted to)."""
    from diffquant.integrations.pipelines import PipelineRunner

    config = CalibrationConfig(selection="all", n_samples=n, steps=steps, batch_size=n, seed=seed)
    return PipelineRunner(reference, prompts, None, pipeline_kwargs).record(config, progress=False)


@torch.no_grad()
def step_sqnr(trajectory, model) -> list[dict]:
    """Noise-prediction SQNR of ``model`` against the recorded FP outputs at every step of ``trajectory``
    (each call replayed: the same ``x_t`` and conditioning, so each step's error is the model's own, not
    accumulated drift). Returns one ``{"index", "t", "sqnr_db"}`` per step."""
    arg = input_name(model)
    signal, noise, ts = {}, {}, {}
    for call in trajectory:
        out = noise_prediction(call.replay(model), input_channels(call.args, call.kwargs, arg))
        k = call.step.index
        ref = call.output.double()
        signal[k] = signal.get(k, 0.0) + float(ref.pow(2).sum())
        noise[k] = noise.get(k, 0.0) + float((ref - out.double()).pow(2).sum())
        ts[k] = call.step.timestep
    return [
        {"index": k, "t": ts[k], "sqnr_db": 10 * torch.log10(torch.tensor(signal[k] / max(noise[k], 1e-30))).item()}
        for k in sorted(ts)
    ]


def pipeline_step_sqnr(
    reference, pipe, n: int = 4, steps: int = 50, prompts=None, pipeline_kwargs=None, seed: int = 777
) -> list[dict]:
    """:func:`step_sqnr` of ``pipe``'s denoiser on the reference pipeline's own trajectory
    (:func:`record_pipeline_trajectory`)."""
    from diffquant.integrations.pipelines import denoiser_name

    trajectory = record_pipeline_trajectory(reference, n, steps, prompts, pipeline_kwargs, seed)
    return step_sqnr(trajectory, getattr(pipe, denoiser_name(reference)))


def write_pipeline_report(
    pipe, reference, out: str | Path, name: str, recipe_name: str, n: int = 40, steps: int = 50,
    prompt: str | None = None, fashion: bool = False,
) -> Path:  # fmt: skip
    """Images of both pipelines from identical noise (and prompts), their fidelity, the per-step error.

    ``fashion`` (a ``fashion-sd`` pipeline): the evaluation protocol's images (class prompts, guidance 3),
    FD against the data set and prompt-class consistency for both, a grid per class; otherwise
    :func:`~diffquant.integrations.pipelines.sample_pipeline` with ``prompt`` and PSNR. Writes
    ``report.html``, ``fp.png``, ``quantized.png``, ``step_sqnr.png`` and ``results.json`` into ``out``.
    """
    from diffquant.integrations.pipelines import is_text_conditioned, pipeline_images, score_pipeline_images

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, ref, labels, guidance = pipeline_images(pipe, reference, n, steps, 0, prompt, None, 8, fashion)
    metrics = {"n": n, "steps": steps, "seed": 0, "guidance_scale": guidance}
    metrics.update(score_pipeline_images(images, ref, labels))
    if fashion:
        from diffquant.models.fashion_sd import CLASS_NOUNS, GUIDANCE
        from diffquant.models.fashion_sd import prompt as class_prompt

        per_class = max(1, min(8, n // len(CLASS_NOUNS)))
        for x, file in ((ref, "fp.png"), (images, "quantized.png")):  # the scored images, a column per class
            save_grid(torch.cat([x[labels == c][:per_class] for c in range(len(CLASS_NOUNS))]), out / file,
                      ncol=per_class)  # fmt: skip
        prompts, kwargs = [class_prompt(c) for c in range(len(CLASS_NOUNS))], {"guidance_scale": GUIDANCE}
        rows = [
            {"model": f"{name} (FP32)", "fd": metrics["fd_fp"], "class_consistency": metrics["class_consistency_fp"],
             "psnr_vs_fp": ""},
            {"model": f"{name} ({recipe_name})", "fd": metrics["fd"], "class_consistency": metrics["class_consistency"],
             "psnr_vs_fp": metrics["psnr_vs_fp"]},
        ]  # fmt: skip
        columns = [("model", "model"), ("fd", "FD ↓"), ("class_consistency", "prompt-class consistency ↑"),
                   ("psnr_vs_fp", "PSNR vs FP (dB) ↑")]  # fmt: skip
    else:
        count = min(n, 16)
        for x, file in ((ref, "fp.png"), (images, "quantized.png")):  # the first of the scored images
            save_grid(x[:count], out / file, ncol=min(count, 8), upscale=1)
        prompts = [prompt] if is_text_conditioned(reference) else None
        kwargs = None
        rows = [
            {"model": f"{name} (FP32)", "psnr_vs_fp": ""},
            {"model": f"{name} ({recipe_name})", "psnr_vs_fp": metrics["psnr_vs_fp"]},
        ]
        columns = [("model", "model"), ("psnr_vs_fp", "PSNR vs FP (dB) ↑")]
    curve = pipeline_step_sqnr(reference, pipe, min(n, 4), steps, prompts, kwargs)
    plot_step_sqnr(curve, out / "step_sqnr.png", f"{name}, {recipe_name}: error of each step on the FP trajectory")
    notes = [
        f"{steps} steps of the pipeline's own scheduler, seed 0; both pipelines start from identical noise"
        + (" and prompts" if prompts else "")
        + f", so the grids compare image by image (PSNR over {n} images).",
        "Per-step SQNR: the quantized denoiser's noise prediction against the FP one's on the FP pipeline's "
        "trajectory (its recorded calls replayed).",
    ]
    if fashion:
        notes.insert(1, "FD in fashion-features space against the training set (decoded images cropped to 28 x 28).")
    figures = [
        ("fp.png", "full precision"),
        ("quantized.png", recipe_name),
        ("step_sqnr.png", "error per denoising step", "plot"),
    ]
    title = f"diffquant report: {name}, {recipe_name}"
    subtitle = "Images from identical noise, fidelity to the FP pipeline, where the error comes from"
    page = write_report(out / "report.html", title, subtitle, rows, columns, figures, notes)
    (out / "results.json").write_text(json.dumps({"rows": rows, "metrics": metrics, "step_sqnr": curve}, indent=2))
    return page
