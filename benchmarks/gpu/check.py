"""The GPU check: an SDXL-shaped UNet at 1024 px, batch 2 (classifier-free guidance), on one NVIDIA GPU.

    bash benchmarks/gpu/check.sh                     # on the GPU machine (wheels carried in .whl/)
    python benchmarks/gpu/check.py --dry-run         # here: a tiny UNet on the CPU, same code path

Rows, each timed side by side in this process (``diffquant.bench.time_ms``: median of ``--repeats``
synchronised forwards after warm-up): bf16 eager, bf16 ``torch.compile`` (the baseline the
acceptance counts), W8A8-TDQ lowered to
int8 GEMMs (``torch._int_mm``, per-step scale tables) eager and compiled, FP8 E4M3 lowered to
``torch._scaled_mm`` eager and compiled. The quantized rows are calibrated on a short FP
trajectory recorded on the GPU (``--samples`` x DDIM-``--steps`` with guidance; round-to-nearest
weights, so no Hessian pass: the check is about speed) and compared with the FP32 output on one
input (PSNR). JSON goes to ``--out`` after every row, so a run stopped at its time limit still
reports what it measured. The UNet has random weights (seed 0): speed and numerics, not images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def unet(dry_run: bool):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from scale import sdxl_unet

    if dry_run:  # SDXL's block layout, shrunk
        return sdxl_unet(
            sample_size=16, cross_attention_dim=32, block_out_channels=(16, 32, 32), layers_per_block=1,
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=56, norm_num_groups=8,
        )  # fmt: skip
    return sdxl_unet()


def inputs(model, batch: int, device, dtype, g: torch.Generator):
    cfg = model.config
    size = cfg.sample_size
    width = cfg.cross_attention_dim
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    x = torch.randn(batch, 4, size, size, generator=g)
    text = torch.randn(batch, 77, width, generator=g)
    extra = {
        "text_embeds": torch.randn(batch, pooled, generator=g),
        "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(batch, 1),
    }
    move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return move(x), move(text), {k: move(v) for k, v in extra.items()}


def sampler(steps: int, n: int, device):
    """A short DDIM loop with guidance 5, as a pipeline calls the UNet (the calibration trajectory)."""
    from diffusers import DDIMScheduler

    def run(model):
        sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
        sched.set_timesteps(steps)
        g = torch.Generator().manual_seed(1)
        x, text, extra = inputs(model, 2 * n, device, torch.float32, g)
        latents = x[:n]
        for t in sched.timesteps:
            out = model(
                torch.cat([latents, latents]), t.to(device), encoder_hidden_states=text, added_cond_kwargs=extra
            )
            uncond, cond = out.sample.chunk(2)
            latents = sched.step(uncond + 5.0 * (cond - uncond), t, latents).prev_sample

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="a tiny UNet on the CPU (what CI runs)")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument(
        "--tdq-iters", type=int, default=100, help="TDQ generator fit steps (speed, not accuracy, is checked)"
    )
    args = ap.parse_args()
    import diffquant
    from diffquant.backends import cuda as gemm
    from diffquant.bench import time_ms
    from diffquant.eval.metrics import psnr
    from diffquant.recipe import CalibrationConfig, get_recipe

    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.dry_run:
        raise SystemExit("Error: no CUDA device here; run with --dry-run for the CPU check")
    repeats, warmup = (2, 1) if args.dry_run else (args.repeats, 3)
    record = {
        "torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dry_run": args.dry_run, "batch": args.batch, "rows": {}, "errors": {},
    }  # fmt: skip

    def save():
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(args.out)

    def row(name, fn):
        start = time.perf_counter()
        try:
            record["rows"][name] = fn()
            record["rows"][name]["seconds"] = round(time.perf_counter() - start, 1)
        except Exception as e:  # a row that fails is reported, the others still run
            record["errors"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        print(name, record["rows"].get(name) or record["errors"][name], flush=True)
        save()

    fp = unet(args.dry_run).to(device)
    record["params"] = sum(p.numel() for p in fp.parameters())
    g = torch.Generator().manual_seed(0)
    x, text, extra = inputs(fp, args.batch, device, torch.float32, g)
    t = torch.full((args.batch,), 501, device=device)
    with torch.no_grad():
        reference = fp(x, t, encoder_hidden_states=text, added_cond_kwargs=extra).sample.float()

    def call(model, dtype):
        xs, ts, es = x.to(dtype), text.to(dtype), {k: v.to(dtype) for k, v in extra.items()}

        @torch.no_grad()
        def fn():
            return model(xs, t, encoder_hidden_states=ts, added_cond_kwargs=es).sample

        return fn

    def bench(model, dtype, compiled: bool) -> dict:
        fn = call(torch.compile(model) if compiled else model, dtype)
        out = fn().float()
        peak = float(reference.abs().max())  # the output's own range: a noise prediction, not an image
        return {
            "ms": round(time_ms(fn, repeats, warmup), 3),
            "psnr_vs_fp32": round(psnr(reference, out, data_range=peak), 2),
        }

    compile_rows = [False] if args.no_compile or args.dry_run else [False, True]
    half = torch.bfloat16 if device.type == "cuda" else torch.float32
    bf16 = __import__("copy").deepcopy(fp).to(half)
    for compiled in compile_rows:
        row(f"bf16{'-compiled' if compiled else ''}", lambda c=compiled, m=bf16: bench(m, half, c))
    del bf16
    cal = CalibrationConfig(selection="all", n_samples=args.samples, steps=args.steps, batch_size=args.samples)
    for recipe_name in ("w8a8-tdq", "fp8"):
        try:
            recipe = get_recipe(recipe_name).replace(weight_method="rtn", calibration=cal, tdq_iters=args.tdq_iters)
            start = time.perf_counter()
            q = diffquant.quantize(
                __import__("copy").deepcopy(fp), recipe, sampler(args.steps, args.samples, device), progress=False
            )
            q, report = gemm.lower(q)
            record["rows"][f"{recipe_name}-quantize"] = {
                "seconds": round(time.perf_counter() - start, 1), "lowered": len(report.lowered), "kept": len(report.kept),
                "step_quantizers": len(report.step_quantizers),
            }  # fmt: skip
        except Exception as e:
            record["errors"][f"{recipe_name}-quantize"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            save()
            continue
        for compiled in compile_rows:
            row(f"{recipe_name}{'-compiled' if compiled else ''}", lambda c=compiled, m=q: bench(m, torch.float32, c))
        del q
    base = record["rows"].get("bf16-compiled", record["rows"].get("bf16", {})).get("ms")
    if base:
        record["speedup_vs_bf16"] = {
            k: round(base / v["ms"], 3) for k, v in record["rows"].items() if isinstance(v, dict) and v.get("ms")
        }
    save()
    print(json.dumps(record.get("speedup_vs_bf16", {})), flush=True)
    if record["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
