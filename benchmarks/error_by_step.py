"""Where a quantized denoiser's error is: per sampler step, on the FP model's own trajectory.

For each variant, the FP model samples DDIM-50 trajectories (64 images, seed 777, not the
calibration seed); at every step the quantized model is evaluated on the same input and the
difference ``d = eps_q - eps`` is summarised as its energy relative to ``eps`` (``rel_err``) and
its part correlated with ``eps``, ``k = <d, eps> / <eps, eps>`` (what the per-step output correction
divides out; reported with the correction switched off, so ``k`` is what it has to undo).

    python benchmarks/error_by_step.py                 # fashion-unet int4 variants

Variants: the shipped ``w4a8`` (int4/g32 GPTQ weights, Hessians counted back from the last step),
the same with GPTQ's Hessian steps counted from the first step (as before that change), and
``w4a16`` (weights only).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from diffquant import quantize
from diffquant.models import DENOISERS, load_builtin
from diffquant.recipe import get_recipe
from diffquant.sampling import SamplerConfig, balanced_labels, sample_batch
from diffquant.timestep import denoising_step

RESULTS = Path(__file__).parent / "results"
VARIANTS = {
    "w4a8": ("w4a8", "last"),
    "w4a8, Hessians from the first step": ("w4a8", "first"),
    "w4a16": ("w4a16", "last"),
}


@torch.no_grad()
def error_by_step(fp: torch.nn.Module, q: torch.nn.Module, n: int, steps: int) -> list[dict]:
    labels = balanced_labels(n, fp.num_classes)
    rows = []

    def on_step(k, t, x, eps):
        with denoising_step(k, t, steps):
            oc = getattr(q, "diffquant_output_correction", None)
            if oc is not None:
                oc.enabled = False  # k is what the correction has to undo
            try:
                eps_q = q(x, torch.full((n,), t), labels)
            finally:
                if oc is not None:
                    oc.enabled = True
        d, e = (eps_q - eps).double(), eps.double()
        k_t = float((d * e).sum() / (e * e).sum())
        rows.append(dict(step=k, t=t, rel_err=float(d.pow(2).sum() / e.pow(2).sum()), k=k_t))

    config = SamplerConfig(sampler="ddim", steps=steps, seed=777)
    sample_batch(fp, range(n), labels, config, fp.config["scheduler"], fp.sample_shape, fp.num_classes, on_step=on_step)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fashion-unet", choices=list(DENOISERS))
    parser.add_argument("--n", type=int, default=64, help="trajectories")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    fp = load_builtin(args.model)
    results = {}
    for label in args.variants:
        recipe, start = VARIANTS[label]
        q = quantize(load_builtin(args.model), get_recipe(recipe).replace(gptq={"uniform_from": start}), progress=False)
        results[label] = error_by_step(fp, q, args.n, 50)
        last = results[label][-1]
        print(json.dumps(dict(variant=label, last_step=last)), flush=True)
    record = dict(
        model=args.model, n=args.n, variants=results,
        command="python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
        date=datetime.now(UTC).isoformat(timespec="seconds"),
    )  # fmt: skip
    out = RESULTS / f"error_by_step_{args.model}"
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    labels = list(results)
    lines = [
        f"# Output error by sampler step, {args.model} (DDIM-50, {args.n} FP trajectories, seed 777)",
        "",
        f"Command: `{record['command']}` — {record['date']}, torch {record['torch']}. `rel_err` = "
        "||eps_q - eps||² / ||eps||² on the FP trajectory's inputs; `k` = <eps_q - eps, eps> / <eps, eps> "
        "(the output correction off). Steps 0-39 summarised by their mean, the last ten listed.",
        "",
        "| step | t | " + " | ".join(f"{lb}: rel_err | k" for lb in labels) + " |",
        "|---|---:|" + "---:|---:|" * len(labels),
    ]
    first = {lb: results[lb][:40] for lb in labels}
    cells = [
        f"{sum(r['rel_err'] for r in first[lb]) / 40:.2e} | {sum(r['k'] for r in first[lb]) / 40:+.4f}" for lb in labels
    ]
    lines.append("| 0-39 (mean) | 999-219 | " + " | ".join(cells) + " |")
    for i in range(40, 50):
        row = results[labels[0]][i]
        cells = [f"{results[lb][i]['rel_err']:.2e} | {results[lb][i]['k']:+.4f}" for lb in labels]
        lines.append(f"| {i} | {row['t']} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
