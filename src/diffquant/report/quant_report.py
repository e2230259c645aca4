"""``diffquant report``: one HTML page comparing a quantized model with its full-precision original."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffquant.data.fashion_mnist import CLASS_NAMES
from diffquant.eval import Evaluator, per_step_sqnr, psnr
from diffquant.eval.evaluate import load_reference
from diffquant.nn.quantizer import ActQuantizer
from diffquant.report.grid import save_grid
from diffquant.report.html import write_report
from diffquant.report.plots import plot_range_heatmap, plot_step_sqnr, plot_tdq_intervals
from diffquant.sampling import sample
from diffquant.timestep import current_step


@torch.no_grad()
def activation_ranges(model: nn.Module, n: int = 8, steps: int = 50) -> tuple[np.ndarray, list[str], list[int]]:
    """``max |input|`` of every Linear / Conv2d of a float model at every step of a DDIM trajectory.

    Returns ``(amax (layers, steps), layer names, time steps)``.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    record: dict[str, dict[int, float]] = {name: {} for name, _ in layers}
    hooks = []
    for name, m in layers:

        def hook(mod, args, name=name):
            t = current_step().timestep
            record[name][t] = max(record[name].get(t, 0.0), float(args[0].detach().abs().max()))

        hooks.append(m.register_forward_pre_hook(hook))
    try:
        sample(model, n=n, steps=steps, seed=1, progress=False)
    finally:
        for h in hooks:
            h.remove()
    timesteps = sorted(next(iter(record.values())), reverse=True)
    amax = np.array([[record[name][t] for t in timesteps] for name, _ in layers])
    return amax, [name for name, _ in layers], timesteps


def write_quant_report(
    quantized: nn.Module, fp: nn.Module, out: str | Path, name: str, recipe_name: str, n: int = 200,
    steps: int = 50, progress: bool = True, fp_samples: tuple | None = None, evaluator: Evaluator | None = None,
) -> Path:  # fmt: skip
    """Sample both models from identical noise, score them, plot the per-step error and the activation ranges.

    Writes ``report.html``, ``fp.png``, ``quantized.png``, ``step_sqnr.png``, ``ranges.png`` and
    ``results.json`` into ``out``, and ``tdq_intervals.png`` when ``quantized`` was quantized with a
    TDQ recipe in this process (the per-step optima are not saved with a model). ``fp_samples = (images, labels)`` reuses the FP model's samples
    of this protocol (DDIM-``steps``, seed 0, ``n``) instead of drawing them again.
    """
    per_class = min(10, n // len(CLASS_NAMES))
    if per_class < 1:
        raise ValueError(f"the report needs n >= {len(CLASS_NAMES)} (one image per class), got {n}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    evaluator = evaluator or Evaluator()
    kw = dict(n=n, steps=steps, sampler="ddim", seed=0, progress=progress)
    fp_images, labels = fp_samples if fp_samples is not None else sample(fp, **kw)
    if fp_images.shape[0] != n:
        raise ValueError(f"fp_samples holds {fp_images.shape[0]} images, the report samples n = {n}")
    q_images, _ = sample(quantized, **kw)
    fp_row = {"model": f"{name} (FP32)", **evaluator.score(fp_images, labels), "psnr_vs_fp": ""}
    q_row = {
        "model": f"{name} ({recipe_name})",
        **evaluator.score(q_images, labels),
        "psnr_vs_fp": psnr(q_images, fp_images),
    }
    for images, file in ((fp_images, "fp.png"), (q_images, "quantized.png")):
        grid = torch.cat([images[labels == c][:per_class] for c in range(len(CLASS_NAMES))])
        save_grid(grid, out / file, ncol=per_class)
    curve = per_step_sqnr(fp, quantized, n=min(n, 32), steps=steps)
    plot_step_sqnr(curve, out / "step_sqnr.png", f"{name}, {recipe_name}: error of each step on the FP trajectory")
    amax, layer_names, timesteps = activation_ranges(fp, n=8, steps=steps)
    plot_range_heatmap(amax, layer_names, timesteps, out / "ranges.png")
    floor = load_reference()["fd_test_vs_train"].get(str(n))
    rows = [fp_row, q_row]
    columns = [("model", "model"), ("fd", "FD ↓"), ("class_consistency", "class consistency ↑"),
               ("psnr_vs_fp", "PSNR vs FP (dB) ↑"), ("n", "N")]  # fmt: skip
    notes = [
        f"DDIM-{steps}, eta 0, seed 0; both models start from identical noise, so the grids can be compared "
        "image by image. FD in fashion-features space against the training set"
        + (f" (FD of {n} real test images: {floor:.4f})." if floor is not None else "."),
        "Per-step SQNR: the quantized model's noise prediction against the FP model's on the FP trajectory. "
        "Heat map: how far each layer's input range at each step is below that layer's widest step — "
        "why one scale for all steps wastes precision.",
    ]
    figures = [
        ("fp.png", "full precision"),
        ("quantized.png", recipe_name),
        ("step_sqnr.png", "error per denoising step", "plot"),
        ("ranges.png", "activation range per layer and step (FP model)", "wide plot"),
    ]
    tdq = [q for q in quantized.modules() if isinstance(q, ActQuantizer) and q.fit_targets is not None]
    if tdq:  # quantized in this process: the per-step optima of the TDQ fit are still there
        plot_tdq_intervals(tdq, out / "tdq_intervals.png")
        figures.append(
            ("tdq_intervals.png", "TDQ interval vs per-step optimum (6 most step-dependent layers)", "wide plot")
        )
    title = f"diffquant report: {name}, {recipe_name}"
    subtitle = "Samples from identical noise, quality against the data set, where the error comes from"
    page = write_report(out / "report.html", title, subtitle, rows, columns, figures, notes)
    (out / "results.json").write_text(json.dumps({"rows": rows, "step_sqnr": curve}, indent=2) + "\n")
    return page
