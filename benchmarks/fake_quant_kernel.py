"""Fake-quant cost per op: the unfused formula vs PyTorch's fused per-tensor kernel, side by side.

    python benchmarks/fake_quant_kernel.py --threads 1

diffquant's reference path (``primitives.fake_quant_int``) uses the element-wise formula, which
gives the same values as the fused kernel; this is the measurement behind not using the kernel.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "fake_quant_kernel"


def unfused(x, scale, zp, qmin, qmax):
    return (torch.clamp(torch.round(x * (1.0 / scale)) + zp, qmin, qmax) - zp) * scale


def fused(x, scale, zp, qmin, qmax):
    return torch.fake_quantize_per_tensor_affine(x, scale, zp.to(torch.int32), qmin, qmax)


def median_ms(fn, *args, repeats: int = 7, inner: int = 10) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn(*args)
        times.append((time.perf_counter() - start) / inner * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for shape in ((40, 64, 14, 14), (40, 128, 7, 7), (256, 49, 128)):
        x = torch.randn(shape) * 3
        scale, zp = torch.tensor(0.02), torch.tensor(128.0)
        a, b = unfused(x, scale, zp, 0, 255), fused(x, scale, zp, 0, 255)
        ms_unfused, ms_fused = median_ms(unfused, x, scale, zp, 0, 255), median_ms(fused, x, scale, zp, 0, 255)
        rows.append(
            {"shape": list(shape), "unfused_ms": round(ms_unfused, 3), "fused_ms": round(ms_fused, 3),
             "speedup": round(ms_unfused / ms_fused, 2), "identical": bool(torch.equal(a, b))}
        )  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    record = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "threads": args.threads,
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Fake-quant per op: unfused formula vs fused kernel (same run, median of 7 x 10 calls)",
        "",
        f"Command: `{record['command']}`, torch {record['torch']}, {args.threads} thread(s), {record['machine']}.",
        "",
        "| shape | unfused (ms) | fused (ms) | speed-up | identical values |",
        "|---|---:|---:|---:|---|",
    ]
    lines += [
        f"| {'x'.join(map(str, r['shape']))} | {r['unfused_ms']} | {r['fused_ms']} | {r['speedup']}x | {r['identical']} |"
        for r in rows
    ]
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
