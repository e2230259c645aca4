"""``diffquant demo``: the main job on the built-in models, as a folder with grids and a report."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from diffquant.data.fashion_mnist import CLASS_NAMES
from diffquant.eval import Evaluator
from diffquant.eval.evaluate import load_reference
from diffquant.models import DENOISERS, load_builtin
from diffquant.report import save_grid, write_report
from diffquant.sampling import sample

DEMO_RECIPE = "w8a8-tdq"
DEMO_MODEL = "fashion-unet"


def run_demo(
    out: str | Path, quick: bool = False, n: int | None = None, progress: bool = True, quantize: bool = True
) -> Path:
    """Sample and evaluate every built-in denoiser, then quantize one and compare; write the reports.

    The FP rows cover every built-in denoiser. Then ``fashion-unet`` is quantized with ``w8a8-tdq``
    (calibrated on 32 FP trajectories, 16 with ``quick``), sampled from the same noise and scored;
    its row joins the table and its own report (grids side by side, per-step error, activation
    ranges) is written to ``out/fashion-unet-w8a8-tdq/report.html``.

    Args:
        out: output folder (created).
        quick: 100 samples with DDIM-20 instead of 500 with DDIM-50.
        n: samples per model (overrides the default).
        progress: show progress bars.
        quantize: add the quantized model (default); ``False`` gives the FP rows only.

    Returns:
        Path of the HTML report.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = n or (100 if quick else 500)
    steps = 20 if quick else 50
    if n < 10:
        raise ValueError(f"the demo needs n >= 10 (one row per class), got {n}")
    evaluator = Evaluator()
    reference = load_reference()
    rows, figures, fp_samples = [], [], {}
    for name in DENOISERS:
        model = load_builtin(name)
        start = time.perf_counter()
        images, labels = sample(model, n=n, steps=steps, sampler="ddim", seed=0, progress=progress)
        seconds = time.perf_counter() - start
        score = evaluator.score(images, labels)
        fp_samples[name] = (images, labels)
        rows.append(
            {
                "model": name,
                "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                **score,
                "fd_floor": reference["fd_test_vs_train"].get(str(n), float("nan")),
                "steps": steps,
                "ms_per_image": 1000 * seconds / n,
            }
        )
        # one row per class: the first 10 images of each class, classes top to bottom
        per_class = torch.cat([images[labels == c][:10] for c in range(len(CLASS_NAMES))])
        save_grid(per_class, out / f"{name}.png", ncol=10)
        figures.append((f"{name}.png", f"{name}: DDIM-{steps}, rows = {', '.join(CLASS_NAMES)}"))
    links = []
    if quantize:
        rows.append(_quantized_row(out, n, steps, quick, fp_samples[DEMO_MODEL], evaluator, progress))
        fp_row = next(r for r in rows if r["model"] == DEMO_MODEL)
        rows[-1].update(fd_floor=fp_row["fd_floor"], params_m=fp_row["params_m"])
        links.append((f"{DEMO_MODEL}-{DEMO_RECIPE}/report.html", f"{DEMO_MODEL} {DEMO_RECIPE} vs FP32: full report"))
    columns = [
        ("model", "model"),
        ("params_m", "params (M)"),
        ("fd", "FD ↓"),
        ("fd_floor", "FD of real test images"),
        ("class_consistency", "class consistency ↑"),
        ("psnr_vs_fp", "PSNR vs FP (dB)"),
        ("n", "N"),
        ("steps", "DDIM steps"),
        ("ms_per_image", "ms / image"),
    ]
    notes = [
        "FD: Fréchet distance in the feature space of the built-in fashion-features classifier, against "
        "the shipped statistics of the 60,000 training images. The real-test-image column is the FD of "
        f"{n} real test images: the floor a perfect model reaches at this N. Class consistency: share of "
        "samples the classifier assigns to their conditioning class.",
        f"Machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads.",
    ]
    if quantize:
        notes.insert(
            1,
            f"{DEMO_MODEL} ({DEMO_RECIPE}): 8-bit weights and activations, activation ranges a function of the "
            "time step tabulated per step (Temporal Dynamic Quantization), calibrated on the FP model's own "
            "trajectories; sampled from the same noise as the FP row, so PSNR compares image by image.",
        )
    title = "diffquant demo: built-in models, full precision and quantized"
    subtitle = f"Fashion-MNIST, DDIM-{steps}, eta 0, seed 0, {n} samples per model, classes balanced"
    report = write_report(out / "report.html", title, subtitle, rows, columns, figures, notes, links)
    (out / "results.json").write_text(json.dumps({"rows": rows, "quick": quick}, indent=2) + "\n")
    return report


def _quantized_row(out: Path, n: int, steps: int, quick: bool, fp_samples, evaluator, progress: bool) -> dict:
    """Quantize the demo model, write its report next to the demo's, return its table row."""
    from diffquant.quantize import quantize
    from diffquant.recipe import CalibrationConfig
    from diffquant.report.quant_report import write_quant_report

    start = time.perf_counter()
    calibration = CalibrationConfig(selection="all", n_samples=16 if quick else 32, steps=steps, batch_size=32)
    q = quantize(load_builtin(DEMO_MODEL), DEMO_RECIPE, calibration, progress=progress)
    calibrate_s = time.perf_counter() - start
    sub = out / f"{DEMO_MODEL}-{DEMO_RECIPE}"
    start = time.perf_counter()
    write_quant_report(
        q, load_builtin(DEMO_MODEL), sub, DEMO_MODEL, DEMO_RECIPE, n=n, steps=steps, progress=progress,
        fp_samples=fp_samples, evaluator=evaluator,
    )  # fmt: skip
    row = json.loads((sub / "results.json").read_text())["rows"][1]
    return {
        **row,
        "steps": steps,
        "calibration_s": calibrate_s,
        "report_s": time.perf_counter() - start,
    }
