"""Probe: which sampler steps' quantization error reaches the image? The quantized model runs only in
one window of steps (the FP model at every other step), from the same noise; the image error against
the all-FP images says what that window costs. Beside it, each step's noise-prediction error on the FP
trajectory (what a uniformly weighted distillation loss minimizes) and the sampler's own propagation
weight (DDIM in ``x / sqrt(alpha_bar)`` coordinates is Euler in ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``:
an error ``d`` in eps moves the image by ``(sigma_t - sigma_prev) * d``, contracted by the rest of the
flow by about ``s / sqrt(s^2 + sigma_prev^2)`` for data of standard deviation ``s``).

    OMP_NUM_THREADS=1 python benchmarks/probes/step_importance.py fashion-unet w4a4 128        # windows of 5 steps
    OMP_NUM_THREADS=1 python benchmarks/probes/step_importance.py fashion-unet w4a4 500 10     # of 10, with FD

Appends one JSON line per window to ``benchmarks/results/step_importance.jsonl`` (with FD and class
consistency, and the FP row's, from N = 500 on: image error against FP is fidelity, FD is what the
distribution lost).
"""

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1]))
from scale import cpu_model  # benchmarks/scale.py: the CPU model and its int8 ISA flags

import diffquant
from diffquant.eval import Evaluator
from diffquant.models import load_builtin
from diffquant.sampling import SamplerConfig, balanced_labels, make_scheduler, sample, sample_batch
from diffquant.timestep import current_step, denoising_step

OUT = Path(__file__).parents[1] / "results" / "step_importance.jsonl"
STEPS = 50


class Mixed(nn.Module):
    """The quantized model at the steps in ``window``, the FP model elsewhere."""

    def __init__(self, fp: nn.Module, q: nn.Module, window: range):
        super().__init__()
        self.fp, self.q, self.window = fp, q, window
        self.config, self.num_classes, self.sample_shape = fp.config, fp.num_classes, fp.sample_shape

    def forward(self, x, t, labels):
        return (self.q if current_step().index in self.window else self.fp)(x, t, labels)


def main() -> None:
    model_name, recipe, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    window_size = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    evaluator = Evaluator() if n >= 500 else None
    fp = load_builtin(model_name)
    start = time.time()
    q = diffquant.quantize(load_builtin(model_name), recipe, progress=False)
    quantize_s = round(time.time() - start)
    kw = dict(n=n, steps=STEPS, sampler="ddim", seed=0, progress=False)
    # one FP run: its images (the reference), and each step's noise-prediction error of q on its inputs
    eps_err = [0.0] * STEPS
    ref_labels = balanced_labels(n, fp.num_classes)

    def on_step(k, t, x_in, eps):
        with denoising_step(k, t, STEPS):
            eq = q(x_in, torch.full((x_in.shape[0],), t), ref_labels)
        eps_err[k] = float(((eq - eps) ** 2).mean())

    ref = sample_batch(
        fp,
        range(n),
        ref_labels,
        SamplerConfig(steps=STEPS),
        fp.config["scheduler"],
        fp.sample_shape,
        fp.num_classes,
        on_step=on_step,
    )  # fmt: skip (the images sample() gives: seed 0, DDIM)
    fp_score = evaluator.score(ref, ref_labels) if evaluator else None
    sched = make_scheduler("ddim", fp.config["scheduler"], STEPS)
    abar = sched.alphas_cumprod
    ts = [int(t) for t in sched.timesteps]
    sigma = [float(((1 - abar[t]) / abar[t]).sqrt()) for t in ts] + [float(((1 - abar[0]) / abar[0]).sqrt())]
    s = float(ref.std())
    weight = [((sigma[k] - sigma[k + 1]) * s / (s * s + sigma[k + 1] ** 2) ** 0.5) ** 2 for k in range(STEPS)]
    host, date = cpu_model(), time.strftime("%Y-%m-%d")
    windows = [range(lo, lo + window_size) for lo in range(0, STEPS, window_size)] + [range(STEPS)]
    for window in windows:
        start = time.time()
        images, _ = sample(Mixed(fp, q, window), **kw)
        mse = float(((images - ref) ** 2).mean())
        scores = {}
        if evaluator:
            score = evaluator.score(images, ref_labels)
            scores = {"fd": score["fd"], "cc": score["class_consistency"], "fp_fd": fp_score["fd"],
                      "fp_cc": fp_score["class_consistency"]}  # fmt: skip
        row = dict(
            model=model_name, recipe=recipe, n=n, steps=[window.start, window.stop - 1], image_mse=mse,
            eps_mse=sum(eps_err[k] for k in window), predicted=sum(weight[k] * eps_err[k] for k in window),
            sigma=[round(sigma[window.start], 4), round(sigma[window.stop], 4)], data_std=round(s, 3),
            seconds=round(time.time() - start), quantize_s=quantize_s, cpu=host, date=date,
            threads=torch.get_num_threads(), **scores,
        )  # fmt: skip
        print(json.dumps(row), flush=True)
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
