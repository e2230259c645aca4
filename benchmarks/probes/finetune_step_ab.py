"""Probe: one fine-tuning step (forward, backward, AdamW) with the fused fake quant of
``primitives.fake_quant_int`` and per-group scales split in place, against the chain of element-wise
autograd ops and the channels-moved-last groups they replaced, interleaved in one process (one thread).

    python benchmarks/probes/finetune_step_ab.py fashion-unet w4a4-ft    # median s / step of each

Rows of 16 trajectory rows per call, learning rate 0 (both variants see the same model). Results:
``benchmarks/results/finetune_step_ab.md``.
"""

import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import diffquant
from diffquant import primitives as P
from diffquant.denoiser import noise_prediction
from diffquant.methods import finetune as FT
from diffquant.models import load_builtin
from diffquant.recipe import FinetuneConfig, get_recipe
from diffquant.trajectory.builtin import record_builtin

sys.path.insert(0, str(Path(__file__).parents[1]))
from scale import cpu_model  # benchmarks/scale.py: the CPU model and its int8 ISA flags


def chain_fake_quant_int(x, scale, zero_point, qmin, qmax):  # before: one autograd node per op
    q = torch.clamp(P.round_ste(x * (1.0 / scale)) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def moved_group_fake_quant(x, qtype, symmetric, channel_dim, group_size):  # before: channels moved last
    xt = x.movedim(channel_dim, -1)
    c = xt.shape[-1]
    pad = -c % group_size
    if pad:
        xt = torch.cat([xt, xt[..., -1:].expand(*xt.shape[:-1], pad)], -1)
    y = P.dynamic_fake_quant(xt.reshape(*xt.shape[:-1], -1, group_size), qtype, "token", symmetric, -1)
    return y.reshape(*xt.shape[:-1], c + pad)[..., :c].movedim(-1, channel_dim)


def main() -> None:
    torch.set_num_threads(1)
    name, recipe_name = sys.argv[1], sys.argv[2]
    fp = load_builtin(name)
    recipe = get_recipe(recipe_name).replace(weight_method="rtn", calibration={"n_samples": 16, "batch_size": 16})
    q = diffquant.quantize(copy.deepcopy(fp), recipe.replace(finetune=None), progress=False)
    config = FinetuneConfig(iterations=1, samples=16, eval_every=0, batch=16, train=recipe.finetune.train)
    selection = FT.finetune_calibration(recipe.calibration, config)
    trajectory = record_builtin(fp, selection, [selection], progress=False)
    opt = torch.optim.AdamW(FT.Trainables(q, config).groups(), lr=0)
    calls = [trajectory[i] for i in range(0, len(trajectory), max(1, len(trajectory) // 6))][:6]
    variants = {
        "fused": (P.fake_quant_int, P._group_fake_quant),
        "chain": (chain_fake_quant_int, moved_group_fake_quant),
    }

    def step(call):
        loss = F.mse_loss(noise_prediction(call.replay(q), 4), call.output)
        opt.zero_grad()
        loss.backward()
        opt.step()

    times = {k: [] for k in variants}
    for rnd in range(7):
        for key in variants if rnd % 2 else reversed(list(variants)):
            P.fake_quant_int, P._group_fake_quant = variants[key]
            start = time.perf_counter()
            for call in calls:
                step(call)
            if rnd:  # round 0 warms up
                times[key].append((time.perf_counter() - start) / len(calls))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"| {name} | {recipe_name} | {med['chain']:.3f} | {med['fused']:.3f} | {med['chain'] / med['fused']:.2f}x | {cpu_model()} |"
    )


if __name__ == "__main__":
    main()
