"""Weight rounding side by side: round-to-nearest vs the clipping search vs GPTQ, weights only.

Every row quantizes only the weights (``w8a16`` / ``w4a16`` and their ``weight_method`` variants),
samples from the same noise as the FP model of the same run and reports PSNR against its images,
so the number isolates the weight error. Also: fashion-dit's class-embedding tables at int4 alone
(why embedding tables stay int8), and GPTQ calibrated on DDIM-50 evaluated on other samplers, with
Hessians from every 5th step (the default) or every step.

    python benchmarks/weight_rounding.py --n 64
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from diffquant import quantize
from diffquant.eval import psnr
from diffquant.models import DENOISERS, load_builtin
from diffquant.recipe import Override, get_recipe
from diffquant.sampling import sample

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="images per row")
    parser.add_argument("--models", nargs="+", default=list(DENOISERS), choices=list(DENOISERS))
    args = parser.parse_args()
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    rows = []
    fp_cache = {}

    def run(model_name, label, recipe, sampler="ddim", steps=50):
        kw = dict(n=args.n, steps=steps, sampler=sampler, seed=0, progress=False)
        key = (model_name, sampler, steps)
        if key not in fp_cache:
            fp_cache[key] = sample(load_builtin(model_name), **kw)[0]
        start = time.perf_counter()
        model = quantize(load_builtin(model_name), recipe, progress=False)
        seconds = time.perf_counter() - start
        images, _ = sample(model, **kw)
        row = dict(
            model=model_name, row=label, weights=recipe.weights, weight_method=recipe.weight_method,
            sampler=f"{sampler}-{steps}", psnr_vs_fp=round(psnr(images, fp_cache[key]), 2),
            quantize_seconds=round(seconds, 1),
        )  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)

    for name in args.models:
        for base in ("w8a16", "w4a16"):
            for method in ("rtn", "mse", "gptq"):
                run(name, f"{base} {method}", get_recipe(base).replace(weight_method=method))
    if "fashion-dit" in args.models:
        tables = get_recipe("w8a16").replace(
            weight_method="rtn", overrides=(Override("*class_embedder*", weights="int4", weight_group_size=64),)
        )
        run("fashion-dit", "w8a16 rtn, class tables int4/g64", tables)
        for every in (get_recipe("w4a16").gptq.every, 1):
            recipe = get_recipe("w4a16").replace(gptq={"every": every})
            for sampler in ("ddim", "dpmsolver++"):
                run("fashion-dit", f"w4a16 gptq, Hessians every {every} step(s)", recipe, sampler, 20)
    record = dict(
        rows=rows, n=args.n, command="python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
        date=datetime.now(UTC).isoformat(timespec="seconds"),
    )  # fmt: skip
    out = RESULTS / "weight_rounding"
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# Weight rounding, weights only (N = {args.n} images per row)",
        "",
        f"Command: `{record['command']}` — {record['date']}, torch {record['torch']}, {record['threads']} threads. "
        "PSNR against the FP images of the same run from identical noise; calibration (GPTQ's Hessians) on "
        "DDIM-50 trajectories; quantize seconds include GPTQ's trajectory pass.",
        "",
        "| model | row | sampler | PSNR vs FP (dB) | quantize (s) |",
        "|---|---|---|---:|---:|",
    ]
    lines += [
        f"| {r['model']} | {r['row']} | {r['sampler']} | {r['psnr_vs_fp']:.2f} | {r['quantize_seconds']} |"
        for r in rows
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
