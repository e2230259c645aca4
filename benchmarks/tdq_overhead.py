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
import sys
from pathlib import Path

import torch

from diffquant import quantize
from diffquant.backends import lower
from diffquant.bench import BENCH_CALIBRATION, compile_forward, example_inputs, interleaved_ms
from diffquant.models import load_builtin


def timed_calls(models: dict, inputs) -> dict:
    """``call(round)`` per model: the same inputs, a new time step every round."""
    x, _, y = inputs

    def call(model):
        return lambda r: model(x, torch.full((x.shape[0],), 999 - 37 * r % 1000), y)

    return {k: call(m) for k, m in models.items()}


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
    ms = {"eager_ms": interleaved_ms(timed_calls(models, inputs), args.rounds, warmup=2)}
    if args.compile:
        compiled = {k: compile_forward(m) for k, m in models.items()}
        ms["compiled_ms"] = interleaved_ms(timed_calls(compiled, inputs), args.rounds, warmup=2)
    result = {mode: {k: round(v, 2) for k, v in d.items()} for mode, d in ms.items()}
    for mode, times in list(result.items()):
        result[mode.replace("_ms", "_tdq_over_static")] = round(times[args.tdq] / times[args.static], 4)
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
