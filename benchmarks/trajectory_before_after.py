"""The same PTQ table rows before and after calibration moved onto one recorded trajectory.

    python benchmarks/trajectory_before_after.py --rev 2ae3200            # N = 500, both models

For each row (W8A8 default, W4A8 default, W8A4 TDQ with the output fit, i.e. the named ``w8a8``,
``w4a8`` and ``w8a4-tdq`` recipes) and model, ``benchmarks/ptq_table.py`` runs once with the code of
``--rev`` (a git worktree of that revision, its own ``ptq_table.py``) and once with this checkout,
interleaved (old, new, old, new...) so a loaded machine slows both alike. Each side samples the FP
images of the protocol once (same seeds, same FP model: the same images), so FD and PSNR compare
like with like. Before the change each method
re-ran the FP sampler (calibration 128 trajectories, GPTQ 64, the output correction 64); after it one
recording serves them all. Results: ``benchmarks/results/trajectory_before_after/{before,after}.json``
and ``trajectory_before_after.md`` (FD, PSNR vs FP and calibration seconds side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "trajectory_before_after"
ROWS = ("W8A8:default", "W4A8:default", "W8A4:tdq-out")


def run_table(tree: Path, out: Path, model: str, row: str, n: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    cmd = [sys.executable, str(tree / "benchmarks" / "ptq_table.py"), "--models", model, "--rows", row]
    cmd += ["--n", str(n), "--out", str(out)]
    subprocess.run(cmd, cwd=tree, env=env, check=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def flags() -> str:
    """The ISA flags that decide CPU int8 speed (avx2, avx512_vnni, avx_vnni, amx_int8)."""
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return "flags unknown"
    have = line.split(":", 1)[1].split()
    return "flags " + ", ".join(f for f in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8") if f in have)


def summarize(rev: str, n: int, patches: tuple[Path, ...] = ()) -> None:
    before = json.loads((OUT / "before.json").read_text())["rows"]
    after = json.loads((OUT / "after.json").read_text())["rows"]
    lines = [
        f"# PTQ rows before ({rev}) and after one recorded trajectory (N = {n}, DDIM-50)",
        "",
        f"`python benchmarks/trajectory_before_after.py --rev {rev} --n {n}"
        + "".join(f" --patch {p.as_posix()}" for p in patches)
        + f"` on {cpu_model()} ({flags()}), "
        "rows interleaved (old, new) in one run; each side samples the same FP images (same seeds, same "
        "model) and compares with them. calib s: wall time of loading the model and `quantize`, on a "
        "shared 2-core machine (another benchmark ran beside it).",
        "",
        "| model | bits | method | FD before | FD after | PSNR before | PSNR after | calib s before | calib s after |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for b in before:
        if b["bits"] == "FP32":
            continue
        a = next(
            (r for r in after if (r["model"], r["bits"], r["method"]) == (b["model"], b["bits"], b["method"])), None
        )
        if a is None:
            continue
        lines.append(
            f"| {b['model']} | {b['bits']} | {b['method']} | {b['fd']:.4f} | {a['fd']:.4f} | {b['psnr_vs_fp']:.2f} | "
            f"{a['psnr_vs_fp']:.2f} | {b['calib_seconds']:.0f} | {a['calib_seconds']:.0f} |"
        )
    notes = OUT / "notes.md"  # hand-written, kept when the table is rewritten
    if notes.is_file():
        lines += ["", notes.read_text().strip()]
    (OUT.parent / "trajectory_before_after.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="the revision before the change")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--models", nargs="+", default=["fashion-unet", "fashion-dit"])
    ap.add_argument("--rows", nargs="+", default=list(ROWS))
    ap.add_argument(
        "--patch", type=Path, action="append", default=[],
        help="a fix to apply to the --rev tree too (git apply), so both sides differ only by the change measured",
    )  # fmt: skip
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    old = Path(tempfile.mkdtemp(prefix="diffquant-before-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.rev], check=True)
    for patch in args.patch:
        subprocess.run(["git", "-C", str(old), "apply", str(patch.resolve())], check=True)
    try:
        for model in args.models:
            for row in args.rows:
                run_table(old, OUT / "before", model, row, args.n)
                run_table(ROOT, OUT / "after", model, row, args.n)
                summarize(args.rev, args.n, tuple(args.patch))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)


if __name__ == "__main__":
    main()
