"""Does a per-step scale table cost time? TDQ vs static scales, same backend, same process, interleaved.

    python benchmarks/tdq_overhead.py --model fashion-unet --threads 2

Quantizes the model twice with the same calibration, once with one static scale per tensor
(``--static``, default ``w8a7``) and once with TDQ's per-step table (``--tdq``, default ``w8a7-tdq``),
lowers both to ``--backend`` and times one denoiser call of each, alternating the two in every round
(so load changes hit both alike), median of ``--rounds``. Eager, and with ``--compile`` also
``torch.compile``. The time step changes every round, so a table lookup that recompiled or read a
tensor per step would show.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from diffquant import quantize
from diffquant.backends import lower
from diffquant.bench import BENCH_CALIBRATION, compile_forward, example_inputs
from diffquant.models import load_builtin


def interleaved_ms(fns: dict, inputs, rounds: int) -> dict[str, float]:
    """Median ms per call of each function, calling them in turn every round at a new time step."""
    x, _, y = inputs
    times = {k: [] for k in fns}
    for r in range(rounds + 2):
        t = torch.full((x.shape[0],), 999 - 37 * r % 1000)
        for k, fn in fns.items():
            start = time.perf_counter()
            fn(x, t, y)
            if r >= 2:  # two warm-up rounds
                times[k].append((time.perf_counter() - start) * 1e3)
    return {k: round(statistics.median(v), 2) for k, v in times.items()}


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fashion-unet")
    ap.add_argument("--static", default="w8a7")
    ap.add_argument("--tdq", default="w8a7-tdq")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default=None, help="default benchmarks/results/tdq_overhead_MODEL")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fp = load_builtin(args.model).eval()
    models = {}
    for name in (args.static, args.tdq):
        q = quantize(copy.deepcopy(fp), name, BENCH_CALIBRATION, progress=False).eval()
        models[name], _ = lower(q, args.backend)
    inputs = example_inputs(fp, args.batch)
    result = {"eager_ms": interleaved_ms({k: m for k, m in models.items()}, inputs, args.rounds)}
    if args.compile:
        compiled = {k: compile_forward(m) for k, m in models.items()}
        result["compiled_ms"] = interleaved_ms(compiled, inputs, args.rounds)
    for mode, ms in list(result.items()):
        result[mode.replace("_ms", "_tdq_over_static")] = round(ms[args.tdq] / ms[args.static], 4)
    info = {
        "command": "python " + " ".join(sys.argv), "model": args.model, "backend": args.backend,
        "batch": args.batch, "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__,
    }  # fmt: skip
    out = Path(args.out or f"benchmarks/results/tdq_overhead_{args.model}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**info, **result}, indent=2))
    lines = [
        f"# TDQ per-step table vs static scales: {args.model}, backend {args.backend}",
        "",
        f"Command: `{info['command']}` (torch {info['torch']}, {args.threads} threads, batch {args.batch}, "
        f"median of {args.rounds} interleaved rounds, a new time step every round).",
        "",
        f"| mode | {args.static} (ms) | {args.tdq} (ms) | TDQ / static |",
        "|---|---:|---:|---:|",
    ]
    for mode in ("eager", "compiled"):
        if f"{mode}_ms" in result:
            ms = result[f"{mode}_ms"]
            lines.append(f"| {mode} | {ms[args.static]} | {ms[args.tdq]} | {result[f'{mode}_tdq_over_static']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
