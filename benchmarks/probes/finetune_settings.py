"""Probe: fine-tuning settings on fashion-unet from one PTQ model, scored by held-out loss and PSNR.

    SAMPLES=128 OMP_NUM_THREADS=1 python benchmarks/probes/finetune_settings.py w4a4 "train=lora,it=1000" "train=lora/scales,it=1000"

``w4a4`` here is W4A4 with round-to-nearest per-channel weights and static ranges (seconds to
quantize); ``w4a4-tdq`` the same with TDQ (range fit). Each setting (``train``, ``it``
iterations, ``rank``, ``lr``, ``slr`` scale lr, ``ev`` eval_every) fine-tunes a copy of the same
PTQ model on ``SAMPLES`` recorded FP trajectories (DDIM-50, every step) and prints the held-out
loss before and after, the training loss of the last tenth, the held-out curve, and the PSNR of
64 DDIM-25 images against the FP images from identical noise. A probe harness (fast and small); the
fine-tuning table is the protocol of record. Raw lines: ``benchmarks/results/finetune_settings_probe.log``.
"""

import copy
import json
import sys
import time

import torch

import diffquant
from diffquant.eval import psnr
from diffquant.methods.finetune import finetune, finetune_calibration
from diffquant.models import load_builtin
from diffquant.recipe import FinetuneConfig, get_recipe
from diffquant.sampling import sample
from diffquant.trajectory import record_builtin

torch.manual_seed(0)
recipe_name = sys.argv[1]
variants = sys.argv[2:]
fp = load_builtin("fashion-unet")
recipe = get_recipe(recipe_name)
if recipe_name in ("w4a4", "w4a4-tdq"):
    recipe = recipe.replace(weight_method="rtn", weight_group_size=None, output_correction=False)
if recipe_name == "w4a4-tdq":
    recipe = recipe.replace(tdq_fit="range")
cfg0 = FinetuneConfig(samples=int(__import__("os").environ.get("SAMPLES", 16)))
sel = finetune_calibration(recipe.calibration, cfg0)
traj = record_builtin(fp, sel, [sel, recipe.calibration], progress=False)
kw = dict(n=64, steps=25, sampler="ddim", seed=0, progress=False)
ref, _ = sample(fp, **kw)
t0 = time.time()
base = diffquant.quantize(copy.deepcopy(fp), recipe, traj, progress=False)
print("ptq", round(time.time() - t0), "s psnr", round(psnr(sample(base, **kw)[0], ref), 2), flush=True)
for v in variants:
    d = dict(x.split("=") for x in v.split(",")) if v else {}
    conf = dict(
        iterations=int(d.get("it", 200)),
        samples=cfg0.samples,
        eval_every=int(d.get("ev", 100)),
        batch=16,
        rank=int(d.get("rank", 32)),
        lr=float(d.get("lr", 5e-4)),
        scale_lr=float(d.get("slr", 1e-3)),
        train=tuple(d.get("train", "lora/scales").split("/")),
    )
    q = copy.deepcopy(base)
    t0 = time.time()
    rep = finetune(q, traj.select(sel), FinetuneConfig(**conf), progress=False)
    diffquant.freeze(q)
    p = psnr(sample(q, **kw)[0], ref)
    print(
        json.dumps(
            {
                "v": v,
                "held": [round(rep["held_before"], 6), round(rep["held_after"], 6)],
                "train_tail": round(rep["train_loss"], 6),
                "psnr": round(p, 2),
                "s": round(time.time() - t0),
                "best": rep["best_step"],
                "curve": rep["held_curve"],
            }
        ),
        flush=True,
    )
