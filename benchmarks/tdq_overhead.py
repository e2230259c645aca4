"""Does a per-step scale table cost time? TDQ vs static scales, same backend, same process, interleaved.

    python benchmarks/tdq_overhead.py --model fashion-unet --threads 2

Quantizes the model twice with the same calibration, once with one static scale per tensor
(``--static``, default ``w8a7``) and once with TDQ's per-step table (``--tdq``, default ``w8a7-tdq``),
lowers both to ``--backend`` and times one denoiser call of each, alternating the two in every round
(so load changes hit both alike), median of ``--rounds``. Eager, and with ``--compile`` also
``torch.compile``. The time step changes every round, so a table lookup that recompiled or read a
tensor per step would show.

``--dynamic`` adds the static recipe with dynamic activation scales, per tensor and per token
(computed from each tensor at run time), to the same rounds: what the run-time alternatives to a
table cost on the same backend. The lowering report's count of layers left on the float reference
path is printed beside each (on ``cpu``, per-token scales have no integer kernel).

With ``--compile`` every compiled model's output is also compared with its eager output at three
time steps (the worst SQNR is in the table): a graph that had folded one step's scales into
constants would time a static model (Inductor's freezing did that to the per-step lookup until
its op was tagged; the first results of this script, before the fix, timed such graphs).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from diffquant import get_recipe, quantize
from diffquant.backends import lower
from diffquant.bench import BENCH_CALIBRATION, compile_forward, example_inputs, interleaved_ms, sqnr_db
from diffquant.models import load_builtin

sys.path.insert(0, str(Path(__file__).parent))
from scale import cpu_model  # benchmarks/scale.py, beside this file

CHECK_STEPS = (999, 500, 10)


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
    ap.add_argument("--dynamic", action="store_true", help="also time per-tensor and per-token dynamic scales")
    ap.add_argument("--out", default=None, help="default benchmarks/results/tdq_overhead_MODEL")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fp = load_builtin(args.model).eval()
    recipes = {args.static: get_recipe(args.static), args.tdq: get_recipe(args.tdq)}
    if args.dynamic:
        for gran in ("tensor", "token"):
            name = f"{args.static}-dynamic-{gran}"
            recipes[name] = recipes[args.static].replace(name=name, act_mode="dynamic", act_granularity=gran)
    models, on_reference = {}, {}
    for name, recipe in recipes.items():
        q = quantize(copy.deepcopy(fp), recipe, BENCH_CALIBRATION, progress=False).eval()
        models[name], report = lower(q, args.backend)
        on_reference[name] = len(report.kept)
    inputs = example_inputs(fp, args.batch)
    ms = {"eager_ms": interleaved_ms(timed_calls(models, inputs), args.rounds, warmup=2)}
    if args.compile:
        x, _, y = inputs
        steps = [torch.full((x.shape[0],), t) for t in CHECK_STEPS]
        eager = {k: [m(x, t, y) for t in steps] for k, m in models.items()}  # compile_forward replaces forward
        compiled = {k: compile_forward(m) for k, m in models.items()}
        ms["compiled_ms"] = interleaved_ms(timed_calls(compiled, inputs), args.rounds, warmup=2)
        agreement = {
            k: round(min(sqnr_db(e, m(x, t, y)) for e, t in zip(eager[k], steps, strict=True)), 1)
            for k, m in compiled.items()
        }
    result = {mode: {k: round(v, 2) for k, v in d.items()} for mode, d in ms.items()}
    for mode, times in list(result.items()):
        result[mode.replace("_ms", "_tdq_over_static")] = round(times[args.tdq] / times[args.static], 4)
        result[mode.replace("_ms", "_over_static")] = {k: round(v / times[args.static], 4) for k, v in times.items()}
    info = {
        "command": "python " + " ".join(sys.argv), "model": args.model, "backend": args.backend,
        "batch": args.batch, "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__,
        "layers_on_reference_path": on_reference, "cpu": cpu_model(),
    }  # fmt: skip
    if args.compile:
        info["compiled_vs_eager_worst_sqnr_db"] = agreement
    out = Path(args.out or f"benchmarks/results/tdq_overhead_{args.model}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**info, **result}, indent=2))
    tmp.replace(out.with_suffix(".json"))
    lines = [
        f"# TDQ per-step table vs static scales: {args.model}, backend {args.backend}",
        "",
        f"Command: `{info['command']}` (torch {info['torch']}, {args.threads} threads, batch {args.batch}, "
        f"median of {args.rounds} interleaved rounds, a new time step every round), {info['cpu']}.",
        "",
        f"| mode | {args.static} (ms) | {args.tdq} (ms) | TDQ / static |",
        "|---|---:|---:|---:|",
    ]
    for mode in ("eager", "compiled"):
        if f"{mode}_ms" in result:
            ms = result[f"{mode}_ms"]
            lines.append(f"| {mode} | {ms[args.static]} | {ms[args.tdq]} | {result[f'{mode}_tdq_over_static']} |")
    if args.dynamic:
        modes = [m for m in ("eager", "compiled") if f"{m}_ms" in result]
        lines += [
            "",
            "Run-time alternatives to a table, same rounds (ratio to static scales; layers left on the float",
            "reference path by the backend's lowering report):",
            "",
            "| activation scales | "
            + " | ".join(f"{m} (ms) | {m} / static" for m in modes)
            + " | layers on reference |",
            "|---|" + "---:|---:|" * len(modes) + "---:|",
        ]
        for name in recipes:
            cells = " | ".join(f"{result[f'{m}_ms'][name]} | {result[f'{m}_over_static'][name]}" for m in modes)
            lines.append(f"| `{name}` | {cells} | {on_reference[name]} |")
    if args.compile:
        lines += ["", "Compiled output against the eager one, worst of time steps "
                  f"{', '.join(map(str, CHECK_STEPS))} (SQNR, dB): "
                  + ", ".join(f"`{k}` {v}" for k, v in info["compiled_vs_eager_worst_sqnr_db"].items()) + "."]  # fmt: skip
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out.with_suffix(".md"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
