"""Reference quality of the built-in full-precision models under the evaluation protocol.

Writes benchmarks/results/reference_quality.{json,md}; a run of some ``--models`` replaces their rows
and keeps the others' (each row carries the command that produced it). Usage:

    python benchmarks/reference_quality.py --n 5000 --steps 50
    python benchmarks/reference_quality.py --n 5000 --models fashion-dit
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
from safetensors import safe_open

from diffquant.eval import Evaluator, evaluate
from diffquant.eval.evaluate import load_reference
from diffquant.models import DENOISERS, load_builtin, weights_path

RESULTS = Path(__file__).parent / "results"


def trained_steps(name: str) -> int:
    with safe_open(str(weights_path(name)), "pt") as f:
        return int((f.metadata() or {}).get("step", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--models", nargs="+", default=list(DENOISERS))
    parser.add_argument("--out", type=Path, default=RESULTS / "reference_quality")
    args = parser.parse_args()

    reference = load_reference()
    floors = reference["fd_test_vs_train"]
    floor = floors.get(str(args.n))
    evaluator = Evaluator()
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    path = args.out.with_suffix(".json")
    previous = json.loads(path.read_text()) if path.is_file() else {}
    same_protocol = previous.get("protocol") == [args.sampler, args.steps, args.n]
    rows = [r for r in previous.get("rows", []) if same_protocol and r["model"] not in args.models]
    for name in args.models:
        model = load_builtin(name)
        result = evaluate(model, n=args.n, steps=args.steps, sampler=args.sampler, evaluator=evaluator)
        result.update(model=name, trained_steps=trained_steps(name), fd_floor=floor, command=command)
        result["threads"] = torch.get_num_threads()
        result["params"] = sum(p.numel() for p in model.parameters())
        rows.append(result)
        print(json.dumps(result), flush=True)

    rows.sort(key=lambda r: list(DENOISERS).index(r["model"]) if r["model"] in DENOISERS else len(DENOISERS))
    record = {
        "protocol": [args.sampler, args.steps, args.n],
        "command": command,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "features_test_accuracy": reference["test_accuracy"],
        "fd_floor_by_n": floors,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json.tmp").write_text(json.dumps(record, indent=2) + "\n")
    path.with_suffix(".json.tmp").replace(path)
    lines = [
        "# Reference quality of the built-in models (full precision)",
        "",
        f"Last command: `{record['command']}` — {record['date']}, torch {record['torch']}; each row's command "
        "and thread count are in the JSON.",
        "",
        f"Protocol: {args.sampler.upper()}-{args.steps}, eta 0, seed 0, N = {args.n}, classes balanced, no guidance. "
        f"FD in `fashion-features` space (test accuracy {reference['test_accuracy']:.4f}) against the 60,000 "
        f"training images; the floor is the FD of {args.n} real test images.",
        "",
        "| model | params | trained steps | FD | FD floor (real test images) | class consistency | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        floor_txt = "n/a" if r["fd_floor"] is None else f"{r['fd_floor']:.4f}"
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['trained_steps']} | {r['fd']:.4f} | "
            f"{floor_txt} | {r['class_consistency']:.4f} | {r['seconds']:.0f} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.json')} and .md ({time.process_time():.0f} s CPU)")


if __name__ == "__main__":
    main()
