"""Where the milliseconds go: one compiled denoiser call, its CPU time summed per op type.

    python benchmarks/profile_ops.py --model sd15 --threads 2 --out benchmarks/results/xeon_amx/profile_sd15
    python benchmarks/profile_ops.py --model fashion-dit --batch 64
    python benchmarks/profile_ops.py --model sd15 --tiny --variants diffquant   # a quick check

Each variant is compiled with Inductor's freezing (``diffquant.bench.compile_forward``) and with
Inductor's kernel profiling on, so every generated C++ kernel is a profiler event of its own; the
events of ``--calls`` calls after warm-up are summed by op type:

    int8 conv / int8 linear       oneDNN's quantized kernels (Inductor's own or diffquant's opaque op)
    fp32 conv / fp32 linear       float convolutions and GEMMs (layers kept float, FP32 rows)
    attention                     scaled-dot-product attention kernels and float bmm
    group norm, layer norm, ...   Inductor's generated kernels, by the first of these ops they fuse
                                  (they never hold a GEMM, whatever else their name lists)
    other fused element-wise      generated kernels fusing none of those
    other                         the rest: copies, reorders, the compiled region's own overhead

Variants: ``fp32`` (the float model), ``diffquant`` (``--recipe``, lowered to the CPU backend), ``pt2e``
(the SD-1.5 script's X86InductorQuantizer flow; sd15 only). The table gives ms per call and the share of
each op type, the wall time per call beside the profiled sum.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

# first match wins: (op type, pattern on the event name, lower-cased). Inductor's generated kernels
# ("graph_0_cpp_fused_<ops>_<n>") are named after every op they fuse, a GEMM's neighbours included, but
# never run a GEMM themselves (those are extern calls, events of their own): they take FUSED_KINDS only
GEMM_KINDS = [
    ("int8 conv", r"qconv|quantized::conv"),
    ("int8 linear", r"qlinear|int8_gemm|_int_mm|quantized::linear"),
    ("attention", r"scaled_dot_product|flash_attention|sdpa|aten::bmm|aten::baddbmm"),
    ("fp32 conv", r"mkldnn_convolution|aten::convolution|mkl_convolution|_convolution_pointwise"),
    ("fp32 linear", r"aten::addmm|aten::mm|mkl_linear|_linear_pointwise|aten::linear"),
]
FUSED_KINDS = [
    ("group norm", r"group_norm"),
    ("layer norm", r"layer_norm"),
    ("softmax", r"softmax"),
    ("quantize / dequantize", r"quantize|int_repr"),
    ("activation (silu, gelu)", r"silu|gelu|sigmoid"),
]


def kind(name: str) -> str:
    n = name.lower()
    fused = "cpp_fused" in n
    for k, pattern in FUSED_KINDS if fused else GEMM_KINDS + FUSED_KINDS:
        if re.search(pattern, n):
            return k
    return "other fused element-wise" if fused else "other"


def profile(fn, calls: int) -> tuple[dict, dict, float]:
    """``fn`` profiled over ``calls`` calls: ms per call by op type, by op name, and the wall ms per call."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        wall = (time.perf_counter() - start) * 1e3 / calls
    by_kind, by_name = defaultdict(float), defaultdict(float)
    for e in prof.key_averages():  # self time: each op's own, its callees' counted under their names
        ms = e.self_cpu_time_total / 1e3 / calls
        by_kind[kind(e.key)] += ms
        by_name[e.key] += ms
    return dict(by_kind), dict(by_name), wall


def variants(args):
    """``(name, callable)`` of each variant asked for, built one at a time (yielded, freed after use)."""
    from diffquant import get_recipe, quantize
    from diffquant.backends import lower
    from diffquant.bench import compile_forward, example_inputs, quantized_for_bench
    from diffquant.models import load_builtin

    if args.model == "sd15":
        import sd_unet_cpu as sd

        fp = sd.sd15_unet(args.tiny)
        call_args = sd.inputs()
    else:
        fp = load_builtin(args.model).eval()
        call_args = example_inputs(fp, args.batch)
    for name in args.variants:
        if name == "fp32":
            m = compile_forward(copy.deepcopy(fp))
        elif name == "diffquant":
            if args.model == "sd15":  # as sd_unet_cpu.py quantizes it
                recipe = get_recipe(args.recipe).replace(attention=False, tdq_iters=args.tdq_iters, weight_method="rtn")
                q = quantize(copy.deepcopy(fp), recipe, sd.runner, progress=False)
            else:
                q = quantized_for_bench(args.model, args.recipe)[1]
            m = compile_forward(lower(q, "cpu")[0])
        elif name == "pt2e" and args.model == "sd15":
            import sd_unet_cpu as sd

            m = sd.pt2e_model(fp, args)
        else:
            raise SystemExit(f"Error: variant {name!r} is not available for --model {args.model}")
        yield name, (lambda m=m: m(*call_args))
        m = None
        gc.collect()


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15", choices=["sd15", "fashion-unet", "fashion-dit"])
    ap.add_argument("--variants", nargs="+", default=["fp32", "diffquant", "pt2e"])
    ap.add_argument("--recipe", default="w8a8-tdq")
    ap.add_argument("--tdq-iters", type=int, default=100)
    ap.add_argument("--batch", type=int, default=64, help="batch of the built-in models")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="sd15: the narrow UNet of sd_unet_cpu.py --tiny")
    ap.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True  # every generated kernel a profiler event

    from diffquant.backends.cpu import host

    results = {}
    for name, fn in variants(args):
        for _ in range(2):  # compile, warm up
            fn()
        by_kind, by_name, wall = profile(fn, args.calls)
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
        results[name] = {"wall_ms": round(wall, 1), "by_kind": by_kind, "top": top}
        print(json.dumps({"variant": name, "wall_ms": round(wall, 1),
                          "by_kind": {k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}}),
              flush=True)  # fmt: skip
    kinds = sorted({k for r in results.values() for k in r["by_kind"]}, key=lambda k: -max(
        r["by_kind"].get(k, 0.0) for r in results.values()))  # fmt: skip
    cmd = "python " + " ".join(sys.argv)
    lines = [
        f"# Where the time goes: {args.model}{' (tiny)' if args.tiny else ''}, compiled, ms per call by op type",
        "",
        f"Command: `{cmd}` (torch {torch.__version__}, {args.threads} threads, {args.calls} profiled calls), "
        f"{host()['text']}.",
        "",
        "| op type | " + " | ".join(results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    for k in kinds:
        cells = []
        for r in results.values():
            v = r["by_kind"].get(k, 0.0)
            total = sum(r["by_kind"].values())
            cells.append(f"{v:.1f} ({100 * v / total:.0f} %)" if v else "")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append(
        "| **profiled sum** | " + " | ".join(f"{sum(r['by_kind'].values()):.1f}" for r in results.values()) + " |"
    )
    lines.append(
        "| wall per call (profiler on) | " + " | ".join(f"{r['wall_ms']:.1f}" for r in results.values()) + " |"
    )
    for name, r in results.items():
        lines += ["", f"Top events, {name}: " + "; ".join(f"`{n[:60]}` {v:.1f}" for n, v in r["top"])]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"command": cmd, "cpu": host(), "results": results}, indent=2))
        out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
