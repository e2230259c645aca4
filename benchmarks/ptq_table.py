"""The PTQ comparison table: calibration methods x bit settings on the built-in models.

Every row is evaluated with the fixed protocol (DDIM-50, seed 0, classes balanced) beside the
full-precision row of the same run; PSNR compares each row's images with the FP images from
identical noise. Rows are appended to the JSON as they finish, and a rerun skips rows already
there (runs are long on a CPU), so the script can be stopped and resumed.

    python benchmarks/ptq_table.py --n 1000                       # the whole table
    python benchmarks/ptq_table.py --models fashion-unet --n 5000 --bits w8a8 w4a8

Methods:
    naive    single-step calibration (the last step), min-max, per-tensor static scales,
             round-to-nearest weights (every other method keeps the recipe's weight rounding:
             GPTQ for int4, which stands in for Q-Diffusion's and PTQ4DM's weight reconstruction)
    qdiff    Q-Diffusion-style: uniform steps (every 5th), MSE (L2) range search, shortcut split
    ptq4dm   PTQ4DM-style: normally distributed time steps (NDTC), L_2.4 range search
    bucketed 10 groups of 5 steps, each its own scale (all steps observed, L_2.4 search)
    tdq      Temporal Dynamic Quantization: a per-step scale table from a generator g(t) fitted to
             the per-step optimal ranges (all steps observed, L_2.4 search)
    per-step one bucket per calibrated step (50): each DDIM-50 step runs at its own optimal range,
             the best any function of t can do with ranges chosen by each layer's own error (TDQ's fit)
    tdq-out  tdq, then the per-step ranges refitted to the denoiser's output error (``tdq_fit="output"``)
    bucketed-sq, tdq-sq, tdq-out-sq  the same with SmoothQuant (alpha searched per layer) first
    dynamic  per-token dynamic activation scales (no calibration data)
    dynamic-tensor  per-tensor dynamic activation scales
    default  the named recipe as it ships (uniform steps, L_2.4 search, shortcut split): the
             "no smoothing" / "uniform bits" reference of the rows below
    smoothquant      default + SmoothQuant, alpha searched per layer by output error
    smoothquant-0.8  default + SmoothQuant with a fixed alpha of 0.8
    minmax   all steps observed, min-max over all of them
    percentile  TensorRT's Percentile Quant: per-step amax, mean over the first 100 % of the steps
    seq      default with sequential GPTQ (``gptq-seq``: each layer rounded from its inputs in the
             partly quantized model)
    gptq     default with GPTQ weights (the FP8 recipes round to nearest otherwise)
    gptq-oc  gptq with the per-step output correction (what rescues the W4A8 rows, tried on FP8)
    seed-7, seed-99  default calibrated from other seeds (calibration trajectories, GPTQ Hessian rows):
             how much a recipe's FD moves between calibration draws (smoothquant-seed-7, -99 likewise)
    no-oc    default without the per-step output correction (the ablation of the recipes that have it)
    mixed-4.5   default with mixed-precision weights at an average of 4.5 nominal bits (layers
             move from the row's weight format to int8 by measured sensitivity)
    ft       PTQ with per-channel weights and one activation scale per step, then quantization-aware
             fine-tuning (FinetuneConfig defaults: LoRA + LSQ scales, distilled on the FP trajectory);
             ft-tdq / ft-static the same from TDQ / static ranges, ft-lora with the scales frozen,
             ft-dynamic from per-token dynamic activations (nothing to learn in them: LoRA only).
    ft5-group, ft5-table, ft5-tdq, ft5-static  the fine-tuned named recipes (``w8a4-ft``, ``w4a4-ft``,
             ``-table-ft``, ``w4a4-tdq-ft``) and their static-range twin: a five-step rollout loss
             (trajectory matching), 400 steps, from per-group dynamic activations (16 channels) /
             one scale per step / TDQ / one static scale
             The row keeps the fine-tuning's cost (seconds, iterations) and held-out losses; W2A8 / W1A8
             (ternary / binary weights) are meant with these methods.

With --seed-noise the FP model is evaluated a second time from other seeds (``FP32 (seed 1)``):
the FD difference between the two FP rows is the sampling noise of the FD at this N.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from diffquant import load_quantized, quantize, save_quantized
from diffquant.eval import Evaluator, extract_features, paired_fd_gap_interval, psnr
from diffquant.eval.evaluate import load_reference
from diffquant.models import DENOISERS, load_builtin
from diffquant.recipe import PER_GROUP, ROLLOUT, get_recipe
from diffquant.sampling import sample

RESULTS = Path(__file__).parent / "results"
BITS = {
    "W8A8": "w8a8",
    "W8A6": "w8a6",
    "W4A8": "w4a8",
    "W8A4": "w8a4",
    "W4A4": "w4a4",
    "FP8": "fp8-attn",  # like the integer rows, with the attention matmuls quantized
    "FP8-noattn": "fp8",  # FP8 weights and activations of the Linear/conv layers, attention matmuls float
    "W8A16": "w8a16",  # weight-only references: how much of a row's error the weights alone cause
    "W4A16": "w4a16",
    # FP8's error split: E4M3 weights alone (float activations), E4M3 activations alone (float weights)
    "FP8-W": ("fp8-attn", {"activations": "none", "attention": False}),
    "FP8-A": ("fp8-attn", {"weights": "none"}),
    # ternary / binary weights (8-bit conditioning layers) with 8-bit activations: the fine-tuned rows
    "W2A8": ("w2a8-ft", {"finetune": None}),
    "W1A8": ("w1a8-ft", {"finetune": None}),
}
BIT_KEYS = {k.upper(): k for k in BITS}  # command-line spelling is case-insensitive
FT = {"weight_group_size": None, "output_correction": False, "finetune": {}}  # finetune: FinetuneConfig defaults
ROLL = dataclasses.asdict(ROLLOUT)  # the named fine-tuned recipes' FinetuneConfig
METHODS = {
    "naive": dict(
        observer="minmax",
        split_shortcut=False,
        weight_method="rtn",
        output_correction=False,
        calibration={"selection": "single"},
    ),
    "qdiff": dict(observer="mse", lp_norm=2.0, calibration={"selection": "uniform", "every": 5}),
    "ptq4dm": dict(observer="mse", lp_norm=2.4, calibration={"selection": "ndtc"}),
    "bucketed": dict(observer="mse", act_mode="bucketed", buckets=10, calibration={"selection": "all"}),
    "tdq": dict(observer="mse", act_mode="tdq", calibration={"selection": "all"}),
    "per-step": dict(observer="mse", act_mode="bucketed", buckets=50, calibration={"selection": "all"}),
    "tdq-out": dict(observer="mse", act_mode="tdq", tdq_fit="output", calibration={"selection": "all"}),
    "bucketed-sq": dict(
        observer="mse", act_mode="bucketed", buckets=10, smoothquant=True, calibration={"selection": "all"}
    ),
    "tdq-sq": dict(observer="mse", act_mode="tdq", smoothquant=True, calibration={"selection": "all"}),
    "tdq-out-sq": dict(
        observer="mse", act_mode="tdq", tdq_fit="output", smoothquant=True, calibration={"selection": "all"}
    ),
    "dynamic": dict(act_mode="dynamic", act_granularity="token"),
    "dynamic-tensor": dict(act_mode="dynamic", act_granularity="tensor"),
    "default": dict(),
    "smoothquant": dict(smoothquant=True),
    "smoothquant-0.8": dict(smoothquant=True, smoothquant_alpha=0.8),
    "minmax": dict(observer="minmax", calibration={"selection": "all"}),
    "percentile": dict(
        observer="step-percentile", step_percentile=1.0, step_reduction="mean", calibration={"selection": "all"}
    ),
    "mixed-4.5": dict(weight_bits_budget=4.5),
    "no-oc": dict(output_correction=False),
    "seq": dict(weight_method="gptq-seq"),
    "gptq": dict(weight_method="gptq"),
    "gptq-oc": dict(weight_method="gptq", output_correction=True),
    "seed-7": dict(calibration={"seed": 7}),
    "seed-99": dict(calibration={"seed": 99}),
    "smoothquant-seed-7": dict(smoothquant=True, calibration={"seed": 7}),
    "smoothquant-seed-99": dict(smoothquant=True, calibration={"seed": 99}),
    # quantization-aware fine-tuning (diffquant.methods.finetune) after PTQ, per-channel weights (what the
    # integer kernels run): one activation scale per step (EfficientDM's TALSQ), TDQ generators, static
    "ft": dict(FT, act_mode="bucketed", buckets=50, calibration={"selection": "all"}),
    "ft-tdq": dict(FT, act_mode="tdq", calibration={"selection": "all"}),
    "ft-static": dict(FT, act_mode="static", buckets=1, calibration={"selection": "all"}),
    "ft-lora": dict(
        FT, act_mode="bucketed", buckets=50, calibration={"selection": "all"}, finetune={"train": ("lora",)}
    ),
    # per-token dynamic activations (one scale per row / pixel, run by the CPU backend), LoRA only
    "ft-dynamic": dict(FT, act_mode="dynamic", act_granularity="token", calibration={"selection": "all"}),
    # the fine-tuned named recipes (-ft, -table-ft, -tdq-ft; tests/test_recipe.py checks they are the
    # same recipes): five-step rollout, 400 steps, from per-group dynamic / per-step / TDQ / static ranges
    "ft5-group": dict(FT, **PER_GROUP, finetune=ROLL),
    "ft5-table": dict(FT, act_mode="bucketed", buckets=50, calibration={"selection": "all"}, finetune=ROLL),
    "ft5-tdq": dict(FT, act_mode="tdq", calibration={"selection": "all"}, finetune=ROLL),
    "ft5-static": dict(FT, act_mode="static", buckets=1, calibration={"selection": "all"}, finetune=ROLL),
}
DEFAULT_METHODS = ("naive", "qdiff", "ptq4dm", "dynamic")


def recipe_for(bits: str, method: str, n_calib: int):
    base, changes = BITS[bits] if isinstance(BITS[bits], tuple) else (BITS[bits], {})
    label = bits.lower() if changes else base
    changes = {**changes, **METHODS[method]}
    changes["calibration"] = {**changes.get("calibration", {}), "n_samples": n_calib}
    return get_recipe(base).replace(name=f"{label}-{method}", **changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DENOISERS))
    parser.add_argument("--bits", nargs="+", default=list(BITS), type=lambda b: BIT_KEYS.get(b.upper(), b))
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    parser.add_argument("--n", type=int, default=1000, help="evaluation samples")
    parser.add_argument("--n-calib", type=int, default=128, help="calibration trajectories")
    parser.add_argument("--steps", type=int, default=50, help="evaluation sampler steps")
    parser.add_argument(
        "--sampler", default="ddim", help="evaluation sampler; calibration keeps the recipe's (DDIM-50)"
    )
    parser.add_argument(
        "--rows", nargs="+", default=None, metavar="BITS:METHOD", help="explicit rows (instead of --bits x --methods)"
    )
    parser.add_argument("--seed-noise", action="store_true", help="add an FP row from other seeds (FD noise)")
    parser.add_argument(
        "--models-dir", type=Path, default=None,
        help="save each row's quantized model here (MODEL_BITS_METHOD/), and load it instead of quantizing "
        "when it is there: a row evaluated with another --sampler is the same model, not refitted",
    )  # fmt: skip
    parser.add_argument(
        "--lowered", type=int, default=0, metavar="N",
        help="also sample the first N images with the model lowered to the CPU integer backend and record "
        "their PSNR against the reference path's images (psnr_lowered_vs_reference)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="results stem (default: results/ptq_table_n{N})")
    args = parser.parse_args()
    suffix = "" if (args.sampler, args.steps) == ("ddim", 50) else f"_{args.sampler}{args.steps}"
    out = args.out or RESULTS / f"ptq_table_n{args.n}{suffix}"
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    record = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    record.update(
        command="python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        n=args.n,
        steps=args.steps,
        sampler=args.sampler,
        fd_floor=load_reference()["fd_test_vs_train"].get(str(args.n)),
    )
    if args.rows:
        pairs = [tuple(r.split(":", 1)) for r in args.rows]
        bad = [
            r
            for r, pair in zip(args.rows, pairs, strict=True)
            if len(pair) != 2 or pair[0].upper() not in BIT_KEYS or pair[1] not in METHODS
        ]
        if bad:
            parser.error(f"--rows takes BITS:METHOD with BITS in {list(BITS)} and METHOD in {list(METHODS)}; got {bad}")
        pairs = [(BIT_KEYS[b.upper()], m) for b, m in pairs]
    else:
        pairs = [(b, m) for b in args.bits for m in args.methods]
    done = {(r["model"], r["bits"], r["method"], weight_method(r)) for r in record["rows"]}
    evaluator = Evaluator()
    kw = dict(n=args.n, steps=args.steps, sampler=args.sampler, seed=0, progress=False)

    def save():
        record["date"] = datetime.now(UTC).isoformat(timespec="seconds")
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(path)
        write_markdown(record, out.with_suffix(".md"))

    for name in args.models:
        # the FP images of this protocol are cached beside the results (not committed), so a resumed or
        # split run compares every row with the same FP images without sampling them again
        cache = out.parent / f".{out.name}_{name}_fp.pt"
        start = time.perf_counter()
        if cache.is_file():
            fp_images, labels = torch.load(cache)
        else:
            fp_images, labels = sample(load_builtin(name), **kw)
            torch.save((fp_images, labels), cache.with_suffix(".tmp"))
            cache.with_suffix(".tmp").replace(cache)
        fp_seconds = time.perf_counter() - start
        fp_features = extract_features(evaluator.feature_net, fp_images)
        if (name, "FP32", "-", "-") not in done:
            row = {"model": name, "bits": "FP32", "method": "-", **evaluator.score(fp_images, labels)}
            row.update(psnr_vs_fp=None, seconds=round(fp_seconds, 1), ms_per_image=round(1000 * fp_seconds / args.n, 2))
            record["rows"].append(row)
            save()
        if args.seed_noise and (name, "FP32 (seed 1)", "-", "-") not in done:
            images, labels1 = sample(load_builtin(name), **{**kw, "seed": 1})
            row = {"model": name, "bits": "FP32 (seed 1)", "method": "-", **evaluator.score(images, labels1)}
            row.update(psnr_vs_fp=None)
            record["rows"].append(row)
            print(json.dumps(row), flush=True)
            save()
        for bits, method in pairs:
            recipe = recipe_for(bits, method, args.n_calib)
            if (name, bits, method, weight_method({"recipe": recipe.to_dict()})) in done:
                continue
            start = time.perf_counter()
            saved = args.models_dir / f"{name}_{bits}_{method}" if args.models_dir else None
            if saved is not None and (saved / "meta.json").is_file():
                model = load_quantized(saved)
                loaded_from = str(saved)
            else:
                model = quantize(load_builtin(name), recipe, progress=False)
                loaded_from = None
                if saved is not None:
                    save_quantized(model, saved, name)
            calib_seconds = time.perf_counter() - start
            sample_start = time.perf_counter()
            images, _ = sample(model, **kw)
            sample_seconds = time.perf_counter() - sample_start
            row = {"model": name, "bits": bits, "method": method, **evaluator.score(images, labels)}
            interval = paired_fd_gap_interval(
                fp_features, extract_features(evaluator.feature_net, images), evaluator.reference
            )
            row.update(
                psnr_vs_fp=psnr(images, fp_images),
                fd_gap_interval=[round(v, 4) for v in interval],
                calib_seconds=round(calib_seconds, 1),
                ms_per_image=round(1000 * sample_seconds / args.n, 2),
                seconds=round(time.perf_counter() - start, 1),
                recipe=model.diffquant_recipe.to_dict(),  # resolved: a budget's per-layer overrides included
                peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),  # process so far
            )
            if loaded_from is not None:  # not quantized in this run: its quantize time is not measured here
                row.update(calib_seconds=None, loaded_from=loaded_from)
            if args.lowered:
                row["psnr_lowered_vs_reference"], row["lowering"] = lowered_psnr(model, images, kw, args.lowered)
            ft = model.diffquant_report.get("finetune")
            if ft:  # its cost and what it reached on the held-out trajectories
                keep = ("iterations", "seconds", "held_before", "held_after", "best_step", "stopped")
                row["finetune"] = {k: ft[k] for k in keep}
            record["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "recipe"}), flush=True)
            save()


def lowered_psnr(model, reference_images, kw: dict, n: int) -> tuple[float, str]:
    """PSNR of the first ``n`` images sampled with ``model`` lowered to the CPU backend against the
    reference path's images from the same noise, and the lowering report's summary line."""
    import copy

    from diffquant.backends import lower

    lowered, report = lower(copy.deepcopy(model), "cpu")
    images, _ = sample(lowered, **{**kw, "n": n})
    return round(psnr(images, reference_images[:n]), 2), report.summary().splitlines()[0]


def weight_method(row: dict) -> str:
    """How a row's weights were rounded (``rtn`` for rows run before recipes had the field), with the
    int4 group size and ``+oc`` when the per-step output correction was on."""
    if "recipe" not in row:
        return "-"
    r = row["recipe"]
    if r.get("weights") == "none":
        return "float"
    label = r.get("weight_method", "rtn")
    if r.get("weights") == "int4" and r.get("weight_group_size"):
        label += f" g{r['weight_group_size']}"
    return label + (" +oc" if r.get("output_correction") else "")


def write_markdown(record: dict, path: Path) -> None:
    floor = "n/a (not tabulated for this N)" if record["fd_floor"] is None else f"{record['fd_floor']:.4f}"
    lines = [
        f"# PTQ methods x bit settings (N = {record['n']}, {record.get('sampler', 'ddim')}-{record['steps']})",
        "",
        "Rows come from one or more runs of this script with the same protocol (it resumes, skipping rows "
        "already there; `--rows` picks rows). "
        f"Last command: `{record['command']}` — {record.get('date', '')}, torch {record['torch']}, "
        f"{record['threads']} threads, {record['machine']}.",
        "",
        f"FD in `fashion-features` space against the training set; FD of {record['n']} real test images "
        f"(the floor): {floor}. PSNR: against the FP32 images of the same run from identical noise. "
        "FD gap: (FD - FD_FP) / FD_FP; its 95 % interval: paired bootstrap over the images (200 resamples of "
        "the same indices in both sets; rows run before it existed have none). Calibration always on DDIM-50 trajectories. ms/image: sampling time of "
        "the float reference (fake-quant) path on this CPU, not of integer kernels.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in record["rows"]):
        rows = [r for r in record["rows"] if r["model"] == model]
        fp = next((r for r in rows if r["bits"] == "FP32"), None)
        lines += [
            f"## {model}",
            "",
            "| bits | method | weights | FD | FD gap | 95 % interval | class consistency | PSNR vs FP (dB) | ms/image |",
        ]
        lines += ["|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            gap = "" if fp is None or r is fp else f"{100 * (r['fd'] - fp['fd']) / fp['fd']:+.1f} %"
            p = "" if r["psnr_vs_fp"] is None else f"{r['psnr_vs_fp']:.2f}"
            ms = "" if r.get("ms_per_image") is None else r["ms_per_image"]
            iv = r.get("fd_gap_interval")
            iv = "" if iv is None else f"{100 * iv[0]:+.1f} … {100 * iv[1]:+.1f} %"
            lines.append(
                f"| {r['bits']} | {r['method']} | {weight_method(r)} | {r['fd']:.4f} | {gap} | {iv} | {r['class_consistency']:.4f} | {p} | {ms} |"
            )
        lines.append("")
        extra = [r for r in rows if r.get("finetune") or r.get("psnr_lowered_vs_reference") is not None]
        if extra:  # what fine-tuning cost, and the rows' integer-backend images against their reference path
            lines += [
                "| bits | method | fine-tuning (s) | steps (best) | held-out loss before -> after | peak RSS (GB) | "
                "CPU backend PSNR vs reference (dB) | lowering |",
                "|---|---|---:|---:|---|---:|---:|---|",
            ]
            for r in extra:
                ft = r.get("finetune") or {}
                held = f"{ft['held_before']:.5f} -> {ft['held_after']:.5f}" if ft else ""
                steps = f"{ft['iterations']} ({ft.get('best_step')})" if ft else ""
                low = r.get("psnr_lowered_vs_reference")
                lines.append(
                    f"| {r['bits']} | {r['method']} | {ft.get('seconds', '')} | {steps} | {held} | "
                    f"{r.get('peak_rss_gb', '')} | {'' if low is None else low} | {r.get('lowering', '')} |"
                )
            lines.append("")
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
