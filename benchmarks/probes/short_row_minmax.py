"""Probe: per-token min / max over short contiguous rows (activation groups of 16), plain inner
reductions against one element-wise halving first, interleaved in one process (one thread).

    python benchmarks/probes/short_row_minmax.py

First the reductions alone on activation-group shapes of the built-in models, then a whole no-grad
forward of each built-in model quantized with ``w4a4-ft``'s activations (dynamic, per group of 16;
no fine-tuning: the speed is the same), batch 100 as the evaluation samples it, with
``primitives.dynamic_range`` as it was (plain) and as it is (halved). Median ms of 9 rounds.
"""

import copy
import statistics
import time

import torch

import diffquant
from diffquant import primitives as P
from diffquant.bench import example_inputs
from diffquant.models import load_builtin
from diffquant.recipe import get_recipe

HALVED = P.dynamic_range


def plain_range(x, granularity, channel_dim=-1):  # before: one inner reduction per bound
    if granularity == "token":
        return x.detach().amin(channel_dim, keepdim=True), x.detach().amax(channel_dim, keepdim=True)
    return HALVED(x, granularity, channel_dim)


def interleaved(fns: dict, rounds: int = 9) -> dict:
    times = {k: [] for k in fns}
    for r in range(rounds + 1):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            if r:
                times[k].append((time.perf_counter() - start) * 1e3)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    for shape in ((100, 49, 256), (100, 49, 1024), (16, 49, 512)):
        x = torch.randn(*shape).unflatten(-1, (-1, 16))
        ms = interleaved({"plain": lambda x=x: plain_range(x, "token"), "halved": lambda x=x: HALVED(x, "token")})
        print(f"rows of 16, {shape}: {ms}, halved / plain {ms['halved'] / ms['plain']:.3f}")
    for name in ("fashion-dit", "fashion-unet"):
        fp = load_builtin(name)
        recipe = get_recipe("w4a4-ft").replace(
            finetune=None, weight_method="rtn", calibration={"n_samples": 8, "batch_size": 8}
        )
        q = diffquant.quantize(copy.deepcopy(fp), recipe, progress=False).eval()
        x, t, y = example_inputs(fp, 100)

        def forward(fn, q=q, x=x, t=t, y=y):
            P.dynamic_range = fn
            try:
                q(x, t, y)
            finally:
                P.dynamic_range = HALVED

        ms = interleaved({"plain": lambda: forward(plain_range), "halved": lambda: forward(HALVED)})
        print(f"{name} w4a4 (groups of 16) forward, batch 100: {ms}, halved / plain {ms['halved'] / ms['plain']:.3f}")


if __name__ == "__main__":
    main()
