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

What "the same within float summation noise" means for a row is measured, not assumed: ``--tag NAME
--env KEY=VALUE`` runs the rows again on both sides with the environment changed (e.g. oneDNN limited
to its AVX2 kernels, which sum convolutions in another order: outputs differ at 1e-6), into
``{before,after}_NAME.json``; the table then shows how far the same code moves under that perturbation
beside how far the change moved it. ``--summarize`` rewrites the table only.

    python benchmarks/trajectory_before_after.py --rev 2ae3200 --tag avx2-kernels \
        --env ONEDNN_MAX_CPU_ISA=AVX2 --env MKL_ENABLE_INSTRUCTIONS=AVX2 --models fashion-unet --rows W8A4:tdq-out
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


def run_table(tree: Path, out: Path, model: str, row: str, n: int, extra_env: dict | None = None) -> None:
    env = {**os.environ, **(extra_env or {}), "PYTHONPATH": str(tree / "src")}
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


def _key(row: dict) -> tuple:
    return row["model"], row["bits"], row["method"]


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
        a = next((r for r in after if _key(r) == _key(b)), None)
        if a is None:
            continue
        lines.append(
            f"| {b['model']} | {b['bits']} | {b['method']} | {b['fd']:.4f} | {a['fd']:.4f} | {b['psnr_vs_fp']:.2f} | "
            f"{a['psnr_vs_fp']:.2f} | {b['calib_seconds']:.0f} | {a['calib_seconds']:.0f} |"
        )
    for path in sorted(OUT.glob("before_*.json")):
        tag = path.stem.removeprefix("before_")
        other = OUT / f"after_{tag}.json"
        env = json.loads((OUT / f"{tag}.env.json").read_text()) if (OUT / f"{tag}.env.json").is_file() else {}
        lines += [
            "",
            f"Float-noise check `{tag}`: the same rows, same code on each side, with "
            + (", ".join(f"`{k}={v}`" for k, v in env.items()) or "a changed environment")
            + ". FD and PSNR of the default run, then of the perturbed run:",
            "",
            "| model | bits | method | side | FD | FD perturbed | PSNR | PSNR perturbed |",
            "|---|---|---|---|---:|---:|---:|---:|",
        ]
        for side, default, perturbed in (("before", before, path), ("after", after, other)):
            rows = json.loads(perturbed.read_text())["rows"] if perturbed.is_file() else []
            for r in rows:
                d = next((x for x in default if _key(x) == _key(r)), None)
                if r["bits"] == "FP32" or d is None:
                    continue
                lines.append(
                    f"| {r['model']} | {r['bits']} | {r['method']} | {side} | {d['fd']:.4f} | {r['fd']:.4f} | "
                    f"{d['psnr_vs_fp']:.2f} | {r['psnr_vs_fp']:.2f} |"
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
    ap.add_argument("--tag", default=None, help="results go to {before,after}_TAG.json (with --env)")
    ap.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE",
        help="environment of both sides' runs (with --tag): a float-noise perturbation of the same code",
    )  # fmt: skip
    ap.add_argument("--summarize", action="store_true", help="only rewrite trajectory_before_after.md")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.rev, args.n, tuple(args.patch))
        return
    if bool(args.env) != bool(args.tag) or any("=" not in e for e in args.env):
        ap.error("--env KEY=VALUE and --tag NAME go together")
    env = dict(e.split("=", 1) for e in args.env)
    suffix = f"_{args.tag}" if args.tag else ""
    OUT.mkdir(parents=True, exist_ok=True)
    if args.tag:
        (OUT / f"{args.tag}.env.json").write_text(json.dumps(env, indent=2) + "\n")
    old = Path(tempfile.mkdtemp(prefix="diffquant-before-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.rev], check=True)
    for patch in args.patch:
        subprocess.run(["git", "-C", str(old), "apply", str(patch.resolve())], check=True)
    try:
        for model in args.models:
            for row in args.rows:
                run_table(old, OUT / f"before{suffix}", model, row, args.n, env)
                run_table(ROOT, OUT / f"after{suffix}", model, row, args.n, env)
                summarize(args.rev, args.n, tuple(args.patch))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)


if __name__ == "__main__":
    main()
