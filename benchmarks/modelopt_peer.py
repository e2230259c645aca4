"""diffquant's INT8 recipes beside NVIDIA ModelOpt's INT8 recipes (fake quant), same model, same run.

ModelOpt (``pip install nvidia-modelopt==0.47.0``; not a dependency of diffquant, it imports on a CPU
machine and simulates quantization) quantizes the built-in model the way its diffusers example
(``examples/diffusers/quantization``: ``--format int8 --collect-method min-mean --percentile 1.0
--alpha 0.8``, quant level 3: every Linear and Conv2d) does:

    modelopt int8 (max)            ``mtq.INT8_DEFAULT_CFG``: per-channel int8 weights, per-tensor int8
                                   inputs, max calibration over every calibration step
    modelopt int8 smoothquant+pct  ``mtq.INT8_SMOOTHQUANT_CFG`` with SmoothQuant alpha 0.8 on the
                                   Linears, and the example's Percentile Quant on every Conv2d input:
                                   amax per denoising step (mean over the calibration batches), the
                                   final amax the minimum over the first ``percentile x steps`` steps

plus the example's name filter (time embedding, ``conv_in``/``conv_out``, ``conv_shortcut``,
``pos_embed``, ``norm_out``... stay float). The example's ``PercentileCalibrator`` divides the summed
per-step amax by the number of steps instead of the number of batches; here it is the mean over the
batches (what its name says; the same when both are one).

Every row sees the same calibration trajectories (128 DDIM-50 trajectories, seed 1234, classes
balanced: diffquant's default calibration draw) and the same evaluation (DDIM-50, seed 0, N images,
FD and class consistency in ``fashion-features`` space, PSNR against the FP images of identical noise).

    python benchmarks/modelopt_peer.py --model fashion-dit --n 500
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import sys
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from diffquant import quantize
from diffquant.eval import Evaluator, psnr
from diffquant.models import DENOISERS, load_builtin
from diffquant.recipe import RECIPES, get_recipe
from diffquant.sampling import sample

RESULTS = Path(__file__).parent / "results"
CAL = dict(n=128, steps=50, sampler="ddim", seed=1234, batch_size=64, progress=False)
# examples/diffusers/quantization/utils.py: filter_func_default (these modules stay float)
FILTER = re.compile(
    r".*(time_emb_proj|time_embedding|conv_in|conv_out|conv_shortcut|add_embedding|pos_embed|"
    r"time_text_embed|context_embedder|norm_out|x_embedder).*"
)
OURS = ("w8a8", "w8a8-smoothquant", "w8a8-percentile", "w8a8-tdq")


def percentile_calibrator_cls():
    """ModelOpt's diffusion Percentile Quant calibrator (per-step amax, min over the first steps)."""
    from modelopt.torch.quantization import utils as quant_utils
    from modelopt.torch.quantization.calib.max import MaxCalibrator

    class StepPercentileCalibrator(MaxCalibrator):
        def __init__(self, num_bits=8, axis=None, unsigned=False, track_amax=False, **kw):
            super().__init__(num_bits, axis, unsigned, track_amax)
            self.percentile, self.total_step = kw["percentile"], kw["total_step"]
            self.sums: dict[int, torch.Tensor] = {}
            self.calls = 0

        def collect(self, x):
            amax = quant_utils.reduce_amax(x, axis=None).detach().float()
            step = self.calls % self.total_step
            self.sums[step] = self.sums[step] + amax if step in self.sums else amax
            self.calls += 1

        def compute_amax(self):
            batches = self.calls / self.total_step
            upto = max(1, int(self.total_step * self.percentile))
            per_step = torch.stack([self.sums[i] / batches for i in range(upto)])
            self._calib_amax = per_step.min(dim=0)[0]
            return self._calib_amax

        def reset(self):
            self.sums, self.calls = {}, 0
            super().reset()

    return StepPercentileCalibrator


def modelopt_config(kind: str, model: nn.Module, steps: int, alpha: float = 0.8, percentile: float = 1.0) -> dict:
    import modelopt.torch.quantization as mtq

    if kind == "max":
        return copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    cfg = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG)
    cfg["algorithm"] = {"method": "smoothquant", "alpha": alpha}
    cal = percentile_calibrator_cls()
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            opts = {"num_bits": 8, "axis": None, "percentile": percentile, "total_step": steps}
            cfg["quant_cfg"].append(
                {
                    "quantizer_name": f"*{name}*input_quantizer*",
                    "cfg": {"num_bits": 8, "axis": None, "calibrator": (cal, (), opts)},
                }
            )
    return cfg


def modelopt_quantize(name: str, kind: str) -> tuple[nn.Module, dict]:
    import modelopt.torch.quantization as mtq

    model = load_builtin(name)
    cfg = modelopt_config(kind, model, CAL["steps"])
    model = mtq.quantize(model, cfg, forward_loop=lambda m: sample(m, **CAL))
    mtq.disable_quantizer(model, lambda n: FILTER.match(n) is not None)
    enabled = sum(1 for n, m in model.named_modules() if n.endswith("_quantizer") and getattr(m, "is_enabled", False))
    return model, {"enabled_quantizers": enabled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fashion-dit", choices=list(DENOISERS))
    parser.add_argument("--n", type=int, default=500, help="evaluation samples")
    parser.add_argument(
        "--ours", nargs="+", default=list(OURS), choices=list(RECIPES), help="diffquant recipes beside ModelOpt's"
    )
    parser.add_argument("--n-calib", type=int, default=CAL["n"], help="calibration trajectories")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="results stem")
    args = parser.parse_args()
    CAL["n"] = args.n_calib
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    try:
        import modelopt.torch.quantization  # noqa: F401
    except ImportError as e:
        sys.exit(f"nvidia-modelopt is not installed ({e}); pip install nvidia-modelopt==0.47.0 (a CPU install works)")

    out = args.out or RESULTS / f"modelopt_peer_{args.model}_n{args.n}"
    record = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "modelopt": __import__("modelopt").__version__,
        "threads": torch.get_num_threads(),
        "model": args.model,
        "n": args.n,
        "rows": [],
    }
    evaluator = Evaluator()
    kw = dict(n=args.n, steps=50, sampler="ddim", seed=0, progress=False)
    fp_images, labels = sample(load_builtin(args.model), **kw)
    record["rows"].append({"tool": "FP32", "recipe": "-", **evaluator.score(fp_images, labels), "psnr_vs_fp": None})

    def add(tool: str, recipe: str, build, **extra):
        start = time.perf_counter()
        model, info = build()
        build_s = time.perf_counter() - start
        images, _ = sample(model, **kw)
        row = {"tool": tool, "recipe": recipe, **evaluator.score(images, labels), "psnr_vs_fp": psnr(images, fp_images)}
        row.update(build_s=round(build_s, 1), **info, **extra)
        record["rows"].append(row)
        print(json.dumps(row), flush=True)
        save(record, out)

    add("modelopt", "INT8_DEFAULT_CFG (max)", lambda: modelopt_quantize(args.model, "max"))
    add(
        "modelopt",
        "INT8_SMOOTHQUANT_CFG alpha 0.8 + conv percentile 1.0 (min-mean)",
        lambda: modelopt_quantize(args.model, "smoothquant"),
    )
    for recipe in args.ours:
        r = get_recipe(recipe).replace(calibration={"n_samples": CAL["n"]})
        add("diffquant", recipe, lambda r=r: (quantize(load_builtin(args.model), r, progress=False), {}))
        scoped = r.replace(name=f"{recipe}@level3", quant_level=3)
        add(
            "diffquant",
            f"{recipe}, quant_level 3",
            lambda s=scoped: (quantize(load_builtin(args.model), s, progress=False), {}),
        )


def save(record: dict, out: Path) -> None:
    record["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out.with_suffix(".json"))
    fp = record["rows"][0]
    lines = [
        f"# diffquant vs NVIDIA ModelOpt {record['modelopt']}, INT8 fake quant: {record['model']} (N = {record['n']}, DDIM-50)",
        "",
        f"Command: `{record['command']}` — {record['date']}, torch {record['torch']}, {record['threads']} threads, "
        f"{record['machine']}.",
        "",
        "Same calibration trajectories for every row (DDIM-50, seed 1234; 128 unless the command says `--n-calib`), same evaluation (seed 0); PSNR "
        "against the FP images from identical noise; FD gap relative to the FP row. ModelOpt's rows follow its "
        "diffusers example (quant level 3: Linear and Conv2d; attention matmuls float); diffquant's named recipes "
        "also quantize the attention matmuls (Q·Kᵀ, P·V), the `quant_level 3` rows do not.",
        "",
        "| tool | recipe | FD | FD gap | class consistency | PSNR vs FP (dB) | build (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in record["rows"]:
        gap = "" if r is fp else f"{100 * (r['fd'] - fp['fd']) / fp['fd']:+.1f} %"
        p = "" if r["psnr_vs_fp"] is None else f"{r['psnr_vs_fp']:.2f}"
        lines.append(
            f"| {r['tool']} | {r['recipe']} | {r['fd']:.4f} | {gap} | {r['class_consistency']:.4f} | {p} | "
            f"{r.get('build_s', '')} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
