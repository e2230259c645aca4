"""Before/after: where the CPU backend quantizes a layer's input, same process, interleaved rounds.

    python benchmarks/probes/fused_quantize.py --model fashion-dit --rev 97de7fb

``before``: the backend at git revision ``--rev`` (loaded from ``git show REV:src/diffquant/backends/cpu.py``),
where each layer's opaque operator quantizes its own input with ``torch.quantize_per_tensor`` (a
separate pass over the float activation that no compiler can fuse). ``after``: the current backend,
where the quantize step is plain element-wise graph ops (``round(x / s) + z``, clamped, as uint8) in
front of an opaque integer GEMM, so that under ``torch.compile`` Inductor fuses it into the op that
produces the activation. Same quantized model, same inputs, FP32 eager and compiled beside them;
median of ``--rounds`` interleaved rounds. SQNR of both against the fake-quant reference.
Results: ``benchmarks/results/fused_quantize_<model>.md``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from diffquant.backends import lower
from diffquant.bench import compile_forward, example_inputs, interleaved_ms, quantized_for_bench, sqnr_db

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def old_backend(rev: str):
    """The CPU backend module as it was at ``rev`` (its custom op has another name, so both coexist)."""
    text = subprocess.run(
        ["git", "show", f"{rev}:src/diffquant/backends/cpu.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "cpu_before.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("diffquant_cpu_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fashion-dit")
    parser.add_argument("--recipe", default="w8a7")
    parser.add_argument("--rev", required=True, help="git revision of the 'before' backend")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    fp, q = quantized_for_bench(args.model, args.recipe)
    x, t, y = example_inputs(fp, args.batch)
    reference = q(x, t, y)
    old = old_backend(args.rev)

    def lowered(which: str):  # a lowered model holds opaque prepacked weights: lower a fresh copy, no deepcopy
        return old.lower(copy.deepcopy(q)) if which == "before" else lower(copy.deepcopy(q), "cpu")

    after, report = lowered("after")
    models = {"fp32": fp, "before": lowered("before")[0], "after": after}
    sqnr = {name: round(sqnr_db(reference, models[name](x, t, y)), 2) for name in ("before", "after")}
    compiled = {
        "fp32 compiled": compile_forward(copy.deepcopy(fp)),
        "before compiled": compile_forward(lowered("before")[0]),
        "after compiled": compile_forward(lowered("after")[0]),
    }
    calls = {**{f"{n} eager": m for n, m in models.items()}, **compiled}
    ms = interleaved_ms({n: (lambda r, m=m: m(x, t, y)) for n, m in calls.items()}, args.rounds)
    record = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "torch": torch.__version__,
        "threads": args.threads,
        "lowering": report.summary(),
        "ms": {k: round(v, 2) for k, v in ms.items()},
        "speedup_vs_fp32_eager": {k: round(ms["fp32 eager"] / v, 3) for k, v in ms.items()},
        "after_over_before": {
            mode: round(ms[f"after {mode}"] / ms[f"before {mode}"], 3) for mode in ("eager", "compiled")
        },
        "sqnr_vs_reference_db": sqnr,
    }
    print(json.dumps(record, indent=2))
    lines = [
        f"# Quantize step inside the opaque op (before) vs fused in the graph (after): {args.model}, `{args.recipe}`",
        "",
        f"Command: `{record['command']}` (torch {record['torch']}, {args.threads} threads, batch {args.batch}, "
        f"median of {args.rounds} interleaved rounds; 'before' = `src/diffquant/backends/cpu.py` at {args.rev}).",
        "",
        "| variant | ms | speed-up vs FP32 eager |",
        "|---|---:|---:|",
        *(f"| {k} | {v} | {record['speedup_vs_fp32_eager'][k]}x |" for k, v in record["ms"].items()),
        "",
        f"after / before: eager {record['after_over_before']['eager']}, compiled "
        f"{record['after_over_before']['compiled']}. SQNR vs the fake-quant reference: before {sqnr['before']} dB, "
        f"after {sqnr['after']} dB. Lowering: {report.summary().splitlines()[0]}.",
    ]
    out = RESULTS / f"fused_quantize_{args.model}.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
