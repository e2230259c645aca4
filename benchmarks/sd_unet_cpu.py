"""A Stable-Diffusion-1.5-shaped UNet on the CPU: FP32 eager vs diffquant's int8 backend vs PyTorch PT2E
and OpenVINO + NNCF.

    python benchmarks/sd_unet_cpu.py                  # 2 threads, w8a7-tdq, the peers (machine quiet)
    python benchmarks/sd_unet_cpu.py --no-pt2e --no-openvino --repeats 3

One denoiser call of a ``UNet2DConditionModel`` with SD-1.5's configuration and random weights (seed 0),
batch 1, 64x64 latents, 77x768 text states, timed side by side in one process (median of
``--repeats`` after warm-up):

    FP32 eager                   the model as built
    FP32 torch.compile           Inductor with freezing
    diffquant cpu, eager         ``diffquant.quantize`` (per-step TDQ scales calibrated on 4 time steps of
    diffquant cpu, compiled      random latents, fitted for ``--tdq-iters``), then ``backends.lower(.., "cpu")``
    ..., attention bf16          the same, lowered with ``attention="bfloat16"`` (the float attention as
                                 bfloat16 SDPA; by default where the CPU has bf16 instructions)
    PT2E X86InductorQuantizer    torchao's static int8 flow (one scale for all steps), torch.compile
    OpenVINO FP32                ``openvino.convert_model``, compiled for the CPU with the f32 precision hint
    OpenVINO + NNCF int8         ``nncf.quantize`` (defaults) of that model on the calibration calls, at
                                 OpenVINO's default precision (bf16 where the CPU has it) and at f32
                                 (the ``bench`` extra: openvino, nncf)

Attention matmuls are not quantized (``attention=False``): the CPU backend has no int8 attention kernel,
and PT2E's x86 recipe does not quantize them either; they run in float32, or bfloat16 in the bf16 row. Calibration content does not
change speed; the SQNR column compares each quantized model with its own fake-quant reference (diffquant)
or the FP32 model (PT2E), to show the integers are what was asked for.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

from diffquant import get_recipe, quantize
from diffquant.backends import lower
from diffquant.backends.cpu import bf16 as cpu_bf16
from diffquant.backends.cpu import host as cpu_host
from diffquant.bench import compile_forward, sqnr_db, time_ms
from diffquant.serialization import weight_bytes
from diffquant.timestep import denoising_step

CAL_STEPS = (999, 700, 400, 100)


def sd15_unet(tiny: bool = False) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if tiny:  # a smoke test of the script: SD-1.5's block types at a fraction of the width
        return UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768, block_out_channels=(32, 64, 64, 64), attention_head_dim=4,
            norm_num_groups=16, layers_per_block=1,
        ).eval()  # fmt: skip
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval()


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 64, 64, generator=g), torch.tensor([500]), torch.randn(1, 77, 768, generator=g)


def calibration_calls() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(x, t, ehs)`` of every calibration call: one random latent per time step in CAL_STEPS."""
    return [(inputs(seed=100 + i)[0], torch.tensor([t]), inputs(seed=100 + i)[2]) for i, t in enumerate(CAL_STEPS)]


def runner(model):
    """Calibration for ``quantize`` (it records the calls), each call at its own step."""
    for i, (x, t, ehs) in enumerate(calibration_calls()):
        with denoising_step(i, int(t), len(CAL_STEPS)):
            model(x, t, ehs)


class Sample(torch.nn.Module):
    """The UNet returning its ``.sample`` tensor, what export and OpenVINO's converter take."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x, t, ehs):
        return self.m(x, t, ehs).sample


def pt2e_model(fp, args):
    """torchao's PT2E static int8 flow for x86 (as in benchmarks/peers.py), compiled."""
    import torch._inductor.config as inductor_config

    sys.path.insert(0, str(Path(__file__).parent))
    from peers import _float_only_x86_quantizer
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import get_default_x86_inductor_quantization_config

    from diffquant.backends.cpu import vnni

    exported = torch.export.export(Sample(fp), inputs()).module()
    quantizer = _float_only_x86_quantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config(reduce_range=not vnni()))
    prepared = prepare_pt2e(exported, quantizer)
    for call in calibration_calls():
        prepared(*call)
    converted = convert_pt2e(prepared)
    move_exported_model_to_eval(converted)
    inductor_config.freezing = True
    return torch.compile(converted)


def openvino_rows(fp, row, fp_out, rows, threads: int) -> None:
    """OpenVINO FP32 and OpenVINO + NNCF int8 rows (as in benchmarks/peers.py), each compiled on its own."""
    import nncf
    import openvino as ov

    sys.path.insert(0, str(Path(__file__).parent))
    from peers import openvino_fn

    start = time.perf_counter()
    model = ov.convert_model(Sample(fp).eval(), example_input=inputs())
    convert_s = time.perf_counter() - start
    x, t, ehs = inputs()
    fn = openvino_fn(model, threads, "f32")
    row("OpenVINO FP32 (f32 hint)", lambda: fn(x, t, ehs), fp_out, f"convert_model {convert_s:.0f} s")
    fn = None
    calibration = calibration_calls()
    start = time.perf_counter()
    dataset = nncf.Dataset(calibration, lambda b: [a.numpy() for a in b])
    quantized = nncf.quantize(model, dataset, subset_size=len(calibration))
    note = f"nncf.quantize defaults, {len(calibration)} calibration calls, {time.perf_counter() - start:.0f} s"
    model = None
    gc.collect()
    for name, precision in (("default precision", None), ("f32 hint", "f32")):
        try:
            fn = openvino_fn(quantized, threads, precision)
            row(f"OpenVINO + NNCF int8 ({name})", lambda fn=fn: fn(x, t, ehs), fp_out, f"{note}; vs FP32 output")
        except Exception as e:  # the CPU plugin can refuse one precision (the int8 DiT at bf16)
            rows.append({"variant": f"OpenVINO + NNCF int8 ({name})", "error": f"{type(e).__name__}: {e}"[:300]})
        fn = None
        gc.collect()


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--recipe", default="w8a7-tdq")
    ap.add_argument("--tdq-iters", type=int, default=100)
    ap.add_argument("--no-pt2e", action="store_true")
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument(
        "--attention-bf16", action=argparse.BooleanOptionalAction, default=cpu_bf16(),
        help="a diffquant row with the float attention in bfloat16 (default: where the CPU has bf16 instructions)",
    )  # fmt: skip
    ap.add_argument("--tiny", action="store_true", help="a narrow UNet of the same blocks: a quick check of the script")
    ap.add_argument("--out", default="benchmarks/results/sd_unet_cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, t, ehs = inputs()
    rows, info = [], {}

    def row(name, fn, ref=None, note=""):
        start = time.perf_counter()
        out = fn()  # first call: compiles where compiled
        first = time.perf_counter() - start
        ms = time_ms(fn, args.repeats, warmup=1)
        r = {"variant": name, "ms": round(ms, 1), "first_call_s": round(first, 1), "note": note}
        if ref is not None:
            r["sqnr_db"] = round(sqnr_db(ref, out.sample if hasattr(out, "sample") else out), 1)
        rows.append(r)
        print(json.dumps(r), flush=True)
        return out

    fp = sd15_unet(args.tiny)
    info["fp_weight_bytes"] = weight_bytes(fp)
    fp_out = row("FP32 eager", lambda: fp(x, t, ehs)).sample
    fp_c = compile_forward(copy.deepcopy(fp))
    row("FP32 torch.compile", lambda: fp_c(x, t, ehs), fp_out)
    fp_c = None  # free it before the quantized copies
    gc.collect()

    # round-to-nearest weights: the named recipes round with GPTQ, which on this UNet had reached 17 GB RSS
    # after 14 minutes without finishing (Zen 4 host, 2026-12-03; GPTQ at this size is separate work)
    recipe = get_recipe(args.recipe).replace(
        attention=False, tdq_iters=args.tdq_iters, weight_method="rtn", name=f"{args.recipe}-noattn"
    )
    start = time.perf_counter()
    q = quantize(copy.deepcopy(fp), recipe, runner, progress=False)
    info["quantize_s"] = round(time.perf_counter() - start, 1)
    info["q_weight_bytes"] = weight_bytes(q)
    with denoising_step(0, 500, 1):
        ref = q(x, t, ehs).sample
    q_bf16 = copy.deepcopy(q) if args.attention_bf16 else None
    low, report = lower(q, "cpu")  # in place: the reference is not needed any more
    info["lowering"] = report.summary()
    row("diffquant cpu, eager", lambda: low(x, t, ehs), ref, recipe.name)
    low_c = compile_forward(low)
    row("diffquant cpu, torch.compile", lambda: low_c(x, t, ehs), ref, recipe.name)
    low = low_c = q = None
    gc.collect()
    if q_bf16 is not None:  # the float attention as bfloat16 SDPA, as OpenVINO's default precision runs it
        low, report = lower(q_bf16, "cpu", attention="bfloat16")
        note = f"{recipe.name}, attention bfloat16 ({len(report.attention)} modules)"
        low_c = compile_forward(low)
        row("diffquant cpu, torch.compile, attention bf16", lambda: low_c(x, t, ehs), ref, note)
        low = low_c = q_bf16 = None
        gc.collect()

    if not args.no_pt2e:
        try:
            pt = pt2e_model(fp, args)
            row("PT2E X86InductorQuantizer, torch.compile", lambda: pt(x, t, ehs), fp_out, "vs FP32 output")
        except Exception as e:  # a peer that fails gets a row, not a crash
            rows.append({"variant": "PT2E X86InductorQuantizer", "error": f"{type(e).__name__}: {e}"[:300]})
        pt = None
        gc.collect()
    if not args.no_openvino:
        try:
            openvino_rows(fp, row, fp_out, rows, args.threads)
        except Exception as e:
            rows.append({"variant": "OpenVINO", "error": f"{type(e).__name__}: {e}"[:300]})

    base, compiled = rows[0]["ms"], rows[1]["ms"]
    for r in rows:
        if "ms" in r:
            r["speedup_vs_fp32_eager"] = round(base / r["ms"], 3)
            r["speedup_vs_fp32_compiled"] = round(compiled / r["ms"], 3)
    info.update(
        command="python " + " ".join(sys.argv), torch=torch.__version__, threads=args.threads,
        machine=platform.processor() or platform.machine(), cpu=cpu_host()["text"], repeats=args.repeats,
    )  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    lines = [
        "# SD-1.5-shaped UNet, batch 1, 64x64 latents: FP32 vs int8 on the CPU",
        "",
        f"Command: `{info['command']}` (torch {info['torch']}, {args.threads} threads, median of {args.repeats}), "
        f"{info['cpu']}.",
        f"Weights: FP32 {info['fp_weight_bytes'] / 1e6:.0f} MB, diffquant int8 {info['q_weight_bytes'] / 1e6:.0f} MB.",
        f"Lowering: {info['lowering']}".replace("\n", "; "),
        "",
        "| variant | ms | vs FP32 compiled | vs FP32 eager | first call (s) | SQNR (dB) | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | error | | | | | {r['error']} |")
        else:
            lines.append(
                f"| {r['variant']} | {r['ms']} | {r['speedup_vs_fp32_compiled']}x | {r['speedup_vs_fp32_eager']}x | "
                f"{r['first_call_s']} | "
                f"{r.get('sqnr_db', '')} | {r['note']} |"
            )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.md / .json")


if __name__ == "__main__":
    main()
