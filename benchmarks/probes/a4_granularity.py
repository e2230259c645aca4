"""Probe: how much of the 4-bit activation error is granularity? Float weights, A4 variants.

    OMP_NUM_THREADS=1 python benchmarks/probes/a4_granularity.py fashion-unet 64

For each variant the model's activations are quantized (weights float, attention matmuls as the
recipe has them) and scored two ways: the relative noise-prediction error ||eps_q - eps||^2 / ||eps||^2
on the FP trajectory (teacher-forced, every step of 16 trajectories, mean over steps and at the last
steps), and PSNR of whole sampled images against the FP images from identical noise (DDIM-50).
Variants: ``static`` per-step scales (bucketed, 50 buckets), ``tensor`` / ``token`` dynamic, and
``gN``: dynamic with one scale per group of N channels of each token (per-group activations,
SVDQuant's INT4 setting, NVFP4's 16-element blocks); ``rot-`` before a variant: each layer's input
rotated along its channels first (a randomized Hadamard, QuaRot's trick; the weights would hold the
inverse rotation); ``token-cR``: per token with every range shrunk to the fraction R (clipping); ``f4gN``: per group
of N with FP4 E2M1 values (NVFP4's format, scale ``amax / 6``) in place of asymmetric INT4. Appends to ``benchmarks/results/a4_granularity_probe.jsonl``.

Measured (fashion-unet, 64 images, 2026-12-01, 1 thread beside other jobs): PSNR vs FP 20.0 dB with
per-step static scales, 11.0 per-tensor dynamic (min-max: outliers set the grid), 27.4 per token,
27.6 / 29.2 / 30.5 with groups of 64 / 32 / 16 channels; int8 per token 59.3. Scale per token (per
pixel) is the lever; grouping channels adds 2-3 dB more. Neither rotation nor clipping helps: a
randomized Hadamard first gives 27.3 dB per token (20.6 with per-step static scales), and per-token
ranges shrunk to 90 / 80 / 70 % give 21.2 / 15.8 / 12.4 dB (the extremes of a pixel carry signal).
FP4 instead of INT4 loses (2026-12-03, AMD EPYC, 64 images, 1 thread each, two at once): groups of
16 / 8 with E2M1 values 23.4 / 23.9 dB on fashion-unet against 30.9 / 32.4 with asymmetric INT4,
fashion-dit 27.9 / 30.8 against 29.1 / 33.0; its noise-prediction error is twice INT4's: E2M1 is
symmetric, and most layer inputs here are one-sided (after SiLU / GELU), where it spends half its
levels on values that never occur. Fine-tuning (benchmarks/probes/finetune.py, W4 per-channel GPTQ weights, 2000 steps): per token
FD 2.59 -> 1.64, PSNR 23.5 -> 24.4 dB; per-step static FD 5.12 -> 2.47, 18.0 -> 22.5 dB (FP FD 0.847).
"""

import json
import sys
import time
from pathlib import Path

import torch
from act_groups import SETTINGS, install  # beside this file
from fp_cache import fp_images

sys.path.insert(0, str(Path(__file__).parents[1]))
from scale import cpu_model

import diffquant
from diffquant.denoiser import noise_prediction
from diffquant.eval import psnr
from diffquant.models import load_builtin
from diffquant.recipe import CalibrationConfig, get_recipe
from diffquant.sampling import sample

OUT = Path(__file__).parents[1] / "results" / "a4_granularity_probe.jsonl"
ROTATE = {"on": False}
_forward = None


def hadamard(c: int) -> torch.Tensor:
    """A randomized Hadamard rotation of ``c`` channels (block-diagonal, blocks the largest power of 2
    dividing ``c``; random signs, seed 0): orthogonal, spreads a channel outlier over its block."""
    block = c & -c
    h = torch.ones(1, 1)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = torch.block_diag(*[h] * (c // block)) / block**0.5
    signs = torch.randint(0, 2, (c,), generator=torch.Generator().manual_seed(0)) * 2 - 1
    return signs[:, None].float() * h


def rotated_forward(self, x):
    """The input quantizer on ``x`` rotated along its channels, rotated back: the fake-quant of a layer
    whose weights hold the inverse rotation (``W' = W R``), the activation quantized as ``x R``."""
    if not ROTATE["on"] or not (self.name.endswith(".input") or self.name.endswith(".input_skip")):
        return _forward(self, x)
    dim = self.channel_dim % x.dim()
    r = hadamard(x.shape[dim]).to(x.dtype)
    xr = torch.tensordot(x.movedim(dim, -1), r, 1)
    y = _forward(self, xr.movedim(-1, dim))
    if self.observing:
        return x
    return torch.tensordot(y.movedim(dim, -1), r.T, 1).movedim(-1, dim)


def main() -> None:
    model_name, n = sys.argv[1], int(sys.argv[2])
    variants = sys.argv[3:] or ["a8-token", "static", "tensor", "token", "g64", "g32", "g16"]
    fp, _ = fp_images(model_name, n)
    install()
    import diffquant.nn.quantizer as Q

    global _forward
    _forward = Q.ActQuantizer.forward
    Q.ActQuantizer.forward = rotated_forward
    fp_model = load_builtin(model_name)
    with diffquant.recording(fp_model, outputs=True) as traj:
        sample(fp_model, n=16, steps=50, sampler="ddim", seed=4321, progress=False)
    for v in variants:
        start = time.time()
        bits = "int8" if v.startswith("a8") else "int4"
        kind = v.split("-")[-1]
        SETTINGS["clip"], SETTINGS["fp4"] = 1.0, False
        if kind.startswith("f4g"):  # f4g16: per group of 16, FP4 E2M1 values (NVFP4-style)
            SETTINGS["fp4"], kind = True, kind[2:]
        if kind.startswith("c"):  # token-c0.9: per token, ranges clipped to 90 %
            SETTINGS["clip"], kind = float(kind[1:]), "token"
        ROTATE["on"] = v.startswith("rot")
        if kind == "static":
            recipe = get_recipe("w8a4").replace(
                weights="none", activations=bits, act_mode="bucketed", buckets=50,
                calibration=CalibrationConfig(selection="all", n_samples=64), weight_method="rtn",
            )  # fmt: skip
        else:
            gran = "tensor" if kind == "tensor" else "group" if kind.startswith("g") else "token"
            recipe = get_recipe("w8a4").replace(
                weights="none", activations=bits, act_mode="dynamic", act_granularity=gran, weight_method="rtn",
                act_group_size=int(kind[1:]) if gran == "group" else 16,
            )  # fmt: skip
        qmodel = diffquant.quantize(load_builtin(model_name), recipe, progress=False)
        errs = []
        with torch.no_grad():
            for call in traj:
                ref = call.output
                out = noise_prediction(call.replay(qmodel), ref.shape[1])
                errs.append((call.step.index, float(((out - ref) ** 2).sum() / (ref**2).sum())))
        by_step = {}
        for i, e in errs:
            by_step.setdefault(i, []).append(e)
        mean = sum(sum(v) / len(v) for v in by_step.values()) / len(by_step)
        last = sum(by_step[max(by_step)]) / len(by_step[max(by_step)])
        images, _ = sample(qmodel, n=n, steps=50, sampler="ddim", seed=0, progress=False)
        row = dict(
            model=model_name, variant=v, rel_err_mean=round(mean, 6), rel_err_last=round(last, 6),
            psnr=round(psnr(images, fp), 2), n=n, s=round(time.time() - start), cpu=cpu_model(),
        )  # fmt: skip
        print(json.dumps(row), flush=True)
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
