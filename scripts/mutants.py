"""Mutation check: deliberate bugs in the core, each of which the fast tests must catch.

    python scripts/mutants.py                 # every mutant (tens of minutes on 2 cores)
    python scripts/mutants.py --quick         # the short list CI runs
    python scripts/mutants.py --only guidance-sign zero-point-sign

Each mutant replaces one exact piece of source (found exactly once, or the script fails: a mutant
that no longer applies is a stale list, not a pass) in a copy of ``src/`` and ``tests/`` in a
temporary directory, and runs the tests named for it (``-m "not slow"``, stopping at the first
failure). A mutant is *caught* when a test fails; *survived* when all pass, which makes the
script exit 1. The working tree is never touched. ``--out`` writes the table (markdown), which
docs/robustness.md keeps.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # under src/diffquant
    old: str
    new: str
    tests: tuple[str, ...]
    what: str
    quick: bool = False


MUTANTS = (
    Mutant(
        "guidance-sign", "sampling.py",
        "eps = eps_u + config.guidance_scale * (eps_c - eps_u)", "eps = eps_u - config.guidance_scale * (eps_c - eps_u)",
        ("tests/test_sampling.py",), "classifier-free guidance with its sign flipped", quick=True,
    ),
    Mutant(
        "guidance-branches", "sampling.py",
        "eps = eps_u + config.guidance_scale * (eps_c - eps_u)", "eps = eps_c + config.guidance_scale * (eps_u - eps_c)",
        ("tests/test_sampling.py",), "guidance with the conditional and unconditional branches swapped",
    ),
    Mutant(
        "rounding-floor", "primitives.py",
        "return torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, qmin, qmax)",
        "return torch.clamp(torch.floor(x * (1.0 / scale)) + zero_point, qmin, qmax)",
        ("tests/test_primitives.py",), "integer quantization rounds down instead of to nearest", quick=True,
    ),
    Mutant(
        "zero-point-sign", "primitives.py",
        "zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)",
        "zero_point = (qmin + torch.round(lo / scale)).clamp(qmin, qmax)",
        ("tests/test_primitives.py",), "asymmetric zero point with its sign flipped", quick=True,
    ),
    Mutant(
        "dequant-zero-point", "primitives.py",
        "return (q.to(torch.float32) - zero_point) * scale", "return (q.to(torch.float32) + zero_point) * scale",
        ("tests/test_primitives.py",), "dequantization adds the zero point instead of subtracting it",
    ),
    Mutant(
        "weight-scale-qmax", "primitives.py",
        "limit = qtype.max_value if qtype.kind == \"float\" else qtype.qmax",
        "limit = qtype.max_value if qtype.kind == \"float\" else qtype.qmax + 1",
        ("tests/test_primitives.py",), "weight absmax scale divides by qmax + 1",
    ),
    Mutant(
        "int4-nibble-order", "primitives.py",
        "return u[..., 0::2] | (u[..., 1::2] << 4)", "return u[..., 1::2] | (u[..., 0::2] << 4)",
        ("tests/test_primitives.py",), "int4 packing with the nibbles swapped",
    ),
    Mutant(
        "step-off-by-one", "timestep.py",
        "StepInfo(-1, round(float(flat[0]) * scale), -1)", "StepInfo(-1, round(float(flat[0]) * scale) + 1, -1)",
        ("tests/test_trajectory.py::test_a_quantized_plain_module_runs_at_the_step_its_own_t_names",),
        "the model's own t read one time step off",
        quick=True,
    ),
    Mutant(
        "scale-of-wrong-step", "nn/quantizer.py",
        'b = 0 if self.scale.numel() == 1 else self.bucket_of_t[timestep] if self.mode == "bucketed" else timestep',
        'b = 0 if self.scale.numel() == 1 else self.bucket_of_t[max(timestep - 100, 0)] if self.mode == "bucketed" '
        "else max(timestep - 100, 0)",
        ("tests/nn/test_modules.py", "tests/test_quantize.py"), "a per-step activation scale looked up at another step",
    ),
    Mutant(
        "gptq-inner-update", "methods/gptq.py",
        "w1[j2:] -= h1[j1:j2, j2:].T @ err1[j1:j2]", "pass",
        ("tests/methods/test_gptq.py",), "GPTQ forgets the inner block's error for the rest of the block", quick=True,
    ),
    Mutant(
        "gptq-damp", "methods/gptq.py",
        "h.diagonal().add_(lam)", "h.diagonal().add_(100 * lam)",
        ("tests/methods/test_gptq.py",), "GPTQ damping 100x too strong",
    ),
    Mutant(
        "resume-data-order", "train.py",
        'g.set_state(ck["generator"])\n        torch.set_rng_state(ck["torch_rng"])',
        'torch.set_rng_state(ck["torch_rng"])',
        ("tests/test_train.py",), "a resumed training run re-seeds its data order", quick=True,
    ),
    Mutant(
        "resume-optimizer", "train.py",
        'opt.load_state_dict(ck["opt"])\n        g.set_state(ck["generator"])\n        torch.set_rng_state',
        'g.set_state(ck["generator"])\n        torch.set_rng_state',
        ("tests/test_train.py",), "a resumed training run starts with a fresh optimizer",
    ),
    Mutant(
        "observer-keeps-batches", "observers.py",
        "self.per_step.setdefault(int(timestep), StepHistogram(self.bins)).update(x)",
        "self.per_step.setdefault(int(timestep), StepHistogram(self.bins)).update(x)\n"
        "        self.__dict__.setdefault('kept', []).append(x)",
        ("tests/test_observers.py",), "an observer that keeps every batch it sees", quick=True,
    ),
    Mutant(
        "bench-reference-count", "bench.py",
        'result["reference_layers"] = len(report.kept)', 'result["reference_layers"] = len(report.kept) + 1',
        ("tests/test_cli.py::test_bench_json_on_a_quantized_directory",), "bench reports a wrong reference-layer count",
    ),
    Mutant(
        "prepare-copies-weights", "nn/modules.py",
        "q.weight, q.bias = module.weight, module.bias", "q.weight, q.bias = nn.Parameter(module.weight.detach().clone()), module.bias",
        ("tests/test_quantize.py::test_prepare_takes_over_the_float_weights_without_a_copy",),
        "prepare holds a second copy of every Linear weight",
    ),
    Mutant(
        "recipe-type-check-off", "recipe.py",
        '        _check_fields(self, "calibration.")\n', "",
        ("tests/test_recipe.py",), "calibration settings are not type-checked",
    ),
    Mutant(
        "output-gain-step", "nn/output_gain.py",
        "t = min(max(int(step.timestep), 0), self.gain.numel() - 1)",
        "t = min(max(int(step.timestep) - 50, 0), self.gain.numel() - 1)",
        ("tests/methods/test_output_correction.py",), "the output correction applies another step's gain",
    ),
    Mutant(
        "attention-mask-dropped", "nn/attention.py",
        "scores = scores.add_(mask) if mask.dtype == scores.dtype else scores + mask", "pass",
        ("tests/nn/test_modules.py",), "the attention mask is ignored",
    ),
    Mutant(
        "lora-merge-sign", "nn/lora.py",
        "m.weight.add_(m.lora.delta(m.weight.shape).to(m.weight.dtype))",
        "m.weight.sub_(m.lora.delta(m.weight.shape).to(m.weight.dtype))",
        ("tests/methods/test_finetune.py",), "fine-tuning merges its LoRA update with the sign flipped", quick=True,
    ),
    Mutant(
        "finetune-resume-generator", "methods/finetune.py",
        'gen.set_state(saved["generator"])', "pass",
        ("tests/methods/test_finetune.py",), "a resumed fine-tuning run draws its rows anew (not where it stopped)",
    ),
    Mutant(
        "finetune-keeps-last", "methods/finetune.py",
        'trainables.load(best["state"])', "pass",
        ("tests/methods/test_finetune.py",), "fine-tuning keeps its last state, not the best held-out one",
    ),
    Mutant(
        "finetune-ddp-share", "methods/finetune.py",
        "mine = rows[rank::world]", "mine = rows",
        ("tests/methods/test_finetune.py",), "every fine-tuning rank trains on the whole batch (the gradient counted twice)",
    ),
)  # fmt: skip


def run_mutant(m: Mutant, timeout: int) -> tuple[str, float, str]:
    """``(caught | survived | timeout, seconds, the first failing test)`` for one mutant."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
        tree = Path(tmp)
        for part in ("src", "tests"):
            shutil.copytree(ROOT / part, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
        path = tree / "src" / "diffquant" / m.file
        text = path.read_text()
        if text.count(m.old) != 1:
            raise SystemExit(
                f"mutant {m.name}: {m.old!r} occurs {text.count(m.old)} times in {m.file}; update the list"
            )
        path.write_text(text.replace(m.old, m.new))
        env = {**os.environ, "PYTHONPATH": str(tree / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider", *m.tests]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - start, ""
        seconds = time.perf_counter() - start
        failed = next((line.split()[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")), "")
        if proc.returncode == 0:
            return "survived", seconds, ""
        if proc.returncode == 5:  # no test collected: the list names tests that do not exist
            raise SystemExit(f"mutant {m.name}: no test collected from {m.tests}")
        last = (proc.stdout.strip() or proc.stderr.strip() or "(no output)").splitlines()[-1]
        return "caught", seconds, failed or last[:120]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the short list CI runs")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="these mutants")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
    ap.add_argument("--out", type=Path, help="write the result table (markdown) here")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if (not args.quick or m.quick) and (not args.only or m.name in args.only)]
    if args.only and len(chosen) != len(args.only):
        raise SystemExit(f"unknown mutants: {sorted(set(args.only) - {m.name for m in MUTANTS})}")
    rows, survived = [], []
    for m in chosen:
        status, seconds, where = run_mutant(m, args.timeout)
        print(f"{m.name:24s} {status:9s} {seconds:6.1f} s  {where}", flush=True)
        rows.append(f"| `{m.name}` | {m.what} | `{m.file}` | {status} | {where.replace('|', '/')} |")
        if status != "caught":
            survived.append(m.name)
    if args.out is not None:
        head = [
            f"`python scripts/mutants.py{' --quick' if args.quick else ''}`: {len(chosen) - len(survived)} of "
            f"{len(chosen)} mutants caught by the fast tests.",
            "",
            "| mutant | the bug | file | result | first failing test |",
            "|---|---|---|---|---|",
        ]
        args.out.write_text("\n".join(head + rows) + "\n")
    if survived:
        print(f"survived: {', '.join(survived)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
