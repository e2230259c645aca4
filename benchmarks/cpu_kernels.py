"""Does int8 beat fp32 on this CPU? Every kernel a backend could use, per real layer shape, side by side.

    python benchmarks/cpu_kernels.py                       # all shapes, 2 threads (machine quiet)
    python benchmarks/cpu_kernels.py --quick --threads 1   # a handful of shapes, a smoke run

Shapes: every Conv2d and Linear of the built-in ``fashion-unet`` and ``fashion-dit`` at batch 64 (read
with forward hooks on one forward, identical shapes merged), and a representative subset of a Stable
Diffusion 1.5 UNet at batch 1, 64x64 latents (3x3 convolutions at 320/640/1280 channels on 64/32/16/8,
1x1 shortcuts, and the attention / feed-forward Linear shapes).

Variants, timed in one process (median of ``--repeats`` runs after warm-up; a run repeats a fast
call until it lasts about ``--min-run-ms``):

    fp32 NCHW / CL   ``F.conv2d`` on contiguous / channels_last input and weight (``F.linear``)
    oneDNN int8      ``onednn::qconv2d_pointwise`` / ``qlinear_pointwise`` on uint8 codes already
                     quantized (channels_last), fp32 output with bias: the calls of ``backends/cpu.py``
    oneDNN int8 + q  the same, with ``quantize_per_tensor(x).int_repr()`` of the fp32 input inside
    fbgemm int8      ``quantized::conv2d`` / ``quantized::linear``: quint8 in, quint8 out, per-channel
                     qint8 weights, prepacked
    ORT fp32 / int8  ONNX Runtime on a one-layer model and on its ``quantize_static`` QDQ version
                     (per-channel s8 weights, u8 activations; QuantizeLinear / DequantizeLinear of
                     the input and output included)

Speed-up = fp32 time / int8 time (> 1: int8 faster); the fp32 time of torch's variants is the faster
of NCHW and channels_last, ORT's int8 is compared with ORT's fp32. GFLOP/s counts 2 x multiply-adds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message=r"torch.quantize_per_(tensor|channel).*deprecated", category=UserWarning)

RESULTS = Path(__file__).parent / "results" / "cpu_kernels"
BATCH = 64


@dataclass
class Shape:
    """One layer shape: a convolution (``n, cin, h, w -> cout, k x k``) or a Linear (``m x cin -> cout``)."""

    group: str
    kind: str  # "conv" or "linear"
    n: int  # batch (conv) or rows = tokens (linear)
    cin: int
    cout: int
    h: int = 1
    w: int = 1
    k: int = 1
    stride: int = 1
    padding: int = 0
    layers: list[str] = field(default_factory=list)

    def key(self) -> tuple:
        return (self.group, self.kind, self.n, self.cin, self.cout, self.h, self.w, self.k, self.stride, self.padding)

    def out_hw(self) -> tuple[int, int]:
        def size(s):
            return (s + 2 * self.padding - self.k) // self.stride + 1

        return size(self.h), size(self.w)

    def gflop(self) -> float:
        """2 x multiply-adds of one call, in GFLOP."""
        if self.kind == "linear":
            return 2 * self.n * self.cin * self.cout / 1e9
        oh, ow = self.out_hw()
        return 2 * self.n * self.cout * oh * ow * self.cin * self.k * self.k / 1e9

    def label(self) -> str:
        if self.kind == "linear":
            return f"{self.n}x{self.cin} -> {self.cout}"
        s = f" s{self.stride}" if self.stride != 1 else ""
        return f"{self.n}x{self.cin}x{self.h}x{self.w} -> {self.cout}, {self.k}x{self.k}{s}"


def _merge(shapes: list[Shape]) -> list[Shape]:
    """Merge identical shapes, keeping every layer name."""
    merged: dict[tuple, Shape] = {}
    for s in shapes:
        if s.key() in merged:
            merged[s.key()].layers += s.layers
        else:
            merged[s.key()] = s
    return list(merged.values())


@torch.no_grad()
def builtin_shapes(name: str, batch: int = BATCH) -> list[Shape]:
    """Conv2d (``fashion-unet``) or Linear (``fashion-dit``) shapes of one forward at ``batch``."""
    from torch import nn

    from diffquant.bench import example_inputs
    from diffquant.models import load_builtin

    model = load_builtin(name)
    found: list[Shape] = []

    def hook(module, args, _out, layer):
        x = args[0]
        if isinstance(module, nn.Conv2d):
            n, cin, h, w = x.shape
            found.append(
                Shape(name, "conv", n, cin, module.out_channels, h, w, module.kernel_size[0], module.stride[0],
                      module.padding[0], [layer])
            )  # fmt: skip
        else:
            found.append(
                Shape(name, "linear", math.prod(x.shape[:-1]), x.shape[-1], module.out_features, layers=[layer])
            )

    handles = [
        m.register_forward_hook(lambda mod, a, o, layer=n: hook(mod, a, o, layer))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    model(*example_inputs(model, batch))
    for h in handles:
        h.remove()
    return _merge(found)


def sd15_shapes() -> list[Shape]:
    """A representative subset of Stable Diffusion 1.5 UNet layers at batch 1, 64x64 latents."""
    g = "sd15"
    convs = [  # (cin, cout, resolution, kernel, stride, name)
        (4, 320, 64, 3, 1, "conv_in"),
        (320, 320, 64, 3, 1, "down0 resnet conv"),
        (320, 320, 64, 3, 2, "down0 downsampler"),
        (320, 640, 32, 3, 1, "down1 resnet conv1"),
        (640, 640, 32, 3, 1, "down1 resnet conv2"),
        (640, 1280, 16, 3, 1, "down2 resnet conv1"),
        (1280, 1280, 16, 3, 1, "down2 resnet conv2"),
        (1280, 1280, 8, 3, 1, "down3 / mid resnet conv"),
        (2560, 1280, 16, 3, 1, "up1 resnet conv1"),
        (1280, 640, 32, 3, 1, "up2 resnet conv1"),
        (640, 320, 64, 3, 1, "up3 resnet conv1"),
        (640, 320, 64, 1, 1, "up3 conv_shortcut"),
        (320, 320, 64, 1, 1, "proj_in / proj_out"),
        (320, 4, 64, 3, 1, "conv_out"),
    ]
    linears = [  # (tokens, cin, cout, name)
        (4096, 320, 320, "64x64 attn to_q/k/v/out"),
        (4096, 320, 2560, "64x64 ff GEGLU proj"),
        (4096, 1280, 320, "64x64 ff out"),
        (1024, 640, 640, "32x32 attn to_q/k/v/out"),
        (1024, 640, 5120, "32x32 ff GEGLU proj"),
        (1024, 2560, 640, "32x32 ff out"),
        (256, 1280, 1280, "16x16 attn to_q/k/v/out"),
        (64, 1280, 1280, "8x8 (mid) attn to_q/k/v/out"),
        (77, 768, 320, "cross-attn to_k/v (text tokens)"),
    ]
    out = [Shape(g, "conv", 1, ci, co, r, r, k, s, k // 2, [n]) for ci, co, r, k, s, n in convs]
    return out + [Shape(g, "linear", m, ci, co, layers=[n]) for m, ci, co, n in linears]


QUICK = {  # a handful of shapes for a smoke run: (group, label)
    ("fashion-unet", "64x64x14x14 -> 64, 3x3"),
    ("fashion-unet", "64x128x7x7 -> 128, 3x3"),
    ("fashion-dit", "3136x128 -> 512"),
    ("sd15", "1x320x64x64 -> 320, 3x3"),
    ("sd15", "4096x320 -> 320"),
}


def all_shapes(quick: bool) -> list[Shape]:
    shapes = builtin_shapes("fashion-unet") + builtin_shapes("fashion-dit") + sd15_shapes()
    return [s for s in shapes if (s.group, s.label()) in QUICK] if quick else shapes


def time_ms(fn, repeats: int, min_run_ms: float, warmup: int = 2) -> float:
    """Median ms per call of ``fn()``: ``warmup`` calls, then ``repeats`` runs of enough calls to last ``min_run_ms``."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    fn()
    once = (time.perf_counter() - start) * 1e3
    inner = max(1, math.ceil(min_run_ms / max(once, 1e-3)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) * 1e3 / inner)
    return statistics.median(times)


def _act_qparams(x: torch.Tensor) -> tuple[float, int]:
    """Asymmetric uint8 scale and zero point covering ``x``."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255 or 1.0
    return scale, round(-lo / scale)


def _int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 codes and scales of ``w``."""
    scale = w.abs().reshape(w.shape[0], -1).amax(1).clamp_min(1e-8) / 127
    codes = torch.round(w / scale.view(-1, *([1] * (w.dim() - 1)))).clamp(-127, 127).to(torch.int8)
    return codes, scale.float().contiguous()


def _fbgemm_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    zp = torch.zeros(codes.shape[0], dtype=torch.long)
    return torch.quantize_per_channel(
        codes.float() * scale.view(-1, *([1] * (codes.dim() - 1))), scale, zp, 0, torch.qint8
    )


def _tensors(s: Shape, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if s.kind == "conv":
        x = torch.randn(s.n, s.cin, s.h, s.w, generator=g)
        w = torch.randn(s.cout, s.cin, s.k, s.k, generator=g) / math.sqrt(s.cin * s.k * s.k)
    else:
        x = torch.randn(s.n, s.cin, generator=g)
        w = torch.randn(s.cout, s.cin, generator=g) / math.sqrt(s.cin)
    return x, w, torch.randn(s.cout, generator=g) * 0.1


def conv_variants(s: Shape) -> dict:
    """Callables of every torch convolution variant for ``s``."""
    x, w, b = _tensors(s)
    st, pad, dil = [s.stride] * 2, [s.padding] * 2, [1, 1]
    x_cl, w_cl = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    x_scale, x_zp = _act_qparams(x)
    codes, w_scale = _int8_weight(w)
    w_zp = torch.zeros(s.cout, dtype=torch.long)
    packed = torch.ops.onednn.qconv_prepack(codes, w_scale, x_scale, x_zp, st, pad, dil, 1, None)
    qx = torch.quantize_per_tensor(x_cl, x_scale, x_zp, torch.quint8)
    codes_x = qx.int_repr()

    def onednn(u8):
        return torch.ops.onednn.qconv2d_pointwise(
            u8, x_scale, x_zp, packed, w_scale, w_zp, b, st, pad, dil, 1, 1.0, 0, torch.float32, "none", [], ""
        )

    fb_packed = torch.ops.quantized.conv2d_prepack(_fbgemm_weight(codes, w_scale), b, st, pad, dil, 1)
    y_scale, y_zp = _act_qparams(F.conv2d(x, w, b, s.stride, s.padding))
    return {
        "fp32": lambda: F.conv2d(x, w, b, s.stride, s.padding),
        "fp32_cl": lambda: F.conv2d(x_cl, w_cl, b, s.stride, s.padding),
        "onednn_int8": lambda: onednn(codes_x),
        "onednn_int8_q": lambda: onednn(torch.quantize_per_tensor(x_cl, x_scale, x_zp, torch.quint8).int_repr()),
        "fbgemm_int8": lambda: torch.ops.quantized.conv2d(qx, fb_packed, y_scale, y_zp),
    }


def linear_variants(s: Shape) -> dict:
    """Callables of every torch Linear variant for ``s``."""
    x, w, b = _tensors(s)
    x_scale, x_zp = _act_qparams(x)
    codes, w_scale = _int8_weight(w)
    w_zp = torch.zeros(s.cout, dtype=torch.long)
    packed = torch.ops.onednn.qlinear_prepack(codes, None)
    qx = torch.quantize_per_tensor(x, x_scale, x_zp, torch.quint8)
    codes_x = qx.int_repr()

    def onednn(u8):
        return torch.ops.onednn.qlinear_pointwise(
            u8, x_scale, x_zp, packed, w_scale, w_zp, b, 1.0, 0, torch.float32, "none", [], ""
        )

    fb_packed = torch.ops.quantized.linear_prepack(_fbgemm_weight(codes, w_scale), b)
    y_scale, y_zp = _act_qparams(F.linear(x, w, b))
    return {
        "fp32": lambda: F.linear(x, w, b),
        "onednn_int8": lambda: onednn(codes_x),
        "onednn_int8_q": lambda: onednn(torch.quantize_per_tensor(x, x_scale, x_zp, torch.quint8).int_repr()),
        "fbgemm_int8": lambda: torch.ops.quantized.linear(qx, fb_packed, y_scale, y_zp),
    }


def _onnx_layer(s: Shape, path: str) -> dict:
    """Write a one-layer ONNX model of ``s``; return its input feed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x, w, b = (t.numpy() for t in _tensors(s))
    if s.kind == "conv":
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[s.padding] * 4, strides=[s.stride] * 2)
        nodes, inits = [node], [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    else:  # what torch.onnx exports for nn.Linear on a token tensor: MatMul + Add
        nodes = [helper.make_node("MatMul", ["x", "wt"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])]
        inits = [numpy_helper.from_array(w.T.copy(), "wt"), numpy_helper.from_array(b, "b")]
    graph = helper.make_graph(
        nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return {"x": x}


def ort_variants(s: Shape, threads: int, workdir: str) -> dict:
    """ONNX Runtime fp32 and int8 (QDQ, per-channel) sessions of a one-layer model of ``s``."""
    import logging

    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    fp_path, q_path = os.path.join(workdir, "fp32.onnx"), os.path.join(workdir, "int8.onnx")
    feed = _onnx_layer(s, fp_path)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([feed])

        def get_next(self):
            return next(self.items, None)

    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's "consider pre-processing" warnings
    quantize_static(
        fp_path, q_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    out = {}
    for name, path in (("ort_fp32", fp_path), ("ort_int8", q_path)):
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        out[name] = lambda sess=sess: sess.run(None, feed)
    return out


def measure(s: Shape, args, workdir: str) -> dict:
    """Time every variant of ``s``; return the row (ms, GFLOP/s, speed-ups)."""
    variants = conv_variants(s) if s.kind == "conv" else linear_variants(s)
    row = {**asdict(s), "label": s.label(), "gflop": round(s.gflop(), 4), "ms": {}, "errors": {}}
    if not args.no_ort:
        try:
            variants.update(ort_variants(s, args.threads, workdir))
        except Exception as e:  # an ORT failure costs its two columns, not the run
            row["errors"]["ort"] = f"{type(e).__name__}: {e}"
    for name, fn in variants.items():
        try:
            row["ms"][name] = round(time_ms(fn, args.repeats, args.min_run_ms), 4)
        except Exception as e:
            row["errors"][name] = f"{type(e).__name__}: {e}"
    _derive(row)
    return row


def _derive(row: dict) -> None:
    """Add the best fp32 time, GFLOP/s per variant and the int8 speed-ups to ``row``."""
    ms = row["ms"]
    fp = [ms[k] for k in ("fp32", "fp32_cl") if k in ms]
    row["fp32_best_ms"] = min(fp) if fp else None
    row["gflops"] = {k: round(row["gflop"] / (v / 1e3), 2) for k, v in ms.items() if v > 0}
    speedup = {}
    for k in ("onednn_int8", "onednn_int8_q", "fbgemm_int8"):
        if k in ms and row["fp32_best_ms"]:
            speedup[k] = round(row["fp32_best_ms"] / ms[k], 3)
    if "ort_int8" in ms and "ort_fp32" in ms:
        speedup["ort_int8"] = round(ms["ort_fp32"] / ms["ort_int8"], 3)
    row["speedup"] = speedup


def cpu_info() -> dict:
    """``lscpu`` model name and the SIMD flags that decide int8 speed."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("Flags", "").split()
    relevant = [f for f in flags if f in ("avx2", "fma") or f.startswith(("avx512", "amx")) or "vnni" in f]
    return {
        "model_name": fields.get("Model name", platform.processor() or "unknown"),
        "family_model": f"family {fields.get('CPU family', '?')}, model {fields.get('Model', '?')}",
        "cores": os.cpu_count(),
        "relevant_flags": relevant,
        "avx512": any(f.startswith("avx512") for f in flags),
        "vnni": any("vnni" in f or f == "amx_int8" for f in flags),
    }


def geomean(values: list[float]) -> float | None:
    return round(math.exp(statistics.fmean(math.log(v) for v in values)), 3) if values else None


def summarize(rows: list[dict], per_forward: bool = True) -> dict:
    """Speed-up per int8 variant (geometric mean, range, weighted by time), per group; per-forward layer totals."""
    variants = ("onednn_int8", "onednn_int8_q", "fbgemm_int8", "ort_int8")
    out: dict = {"geomean_speedup": {}, "range_speedup": {}, "time_weighted_speedup": {}, "per_group": {}}
    for v in variants:
        vals = [r["speedup"][v] for r in rows if v in r["speedup"]]
        out["geomean_speedup"][v] = geomean(vals)
        out["range_speedup"][v] = [min(vals), max(vals)] if vals else None
        base = "ort_fp32" if v == "ort_int8" else None
        pairs = [(r["ms"][base] if base else r["fp32_best_ms"], r["ms"][v]) for r in rows if v in r["speedup"]]
        out["time_weighted_speedup"][v] = (
            round(sum(a for a, _ in pairs) / sum(b for _, b in pairs), 3) if pairs else None
        )
    for g in sorted({r["group"] for r in rows}):
        out["per_group"][g] = {
            v: geomean([r["speedup"][v] for r in rows if r["group"] == g and v in r["speedup"]]) for v in variants
        }
    for g in ("fashion-unet", "fashion-dit") if per_forward else ():  # all the model's layers of one forward
        grp = [r for r in rows if r["group"] == g]
        if grp:
            totals = {}
            for k in ("fp32_best_ms", "onednn_int8", "onednn_int8_q", "fbgemm_int8"):
                per = [(r[k] if k == "fp32_best_ms" else r["ms"].get(k)) for r in grp]
                if all(p is not None for p in per):
                    totals[k] = round(sum(p * len(r["layers"]) for p, r in zip(per, grp, strict=True)), 2)
            out[f"{g}_layers_per_forward_ms"] = totals
    return out


def _fmt(v, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def meaning(record: dict) -> str:
    """A short paragraph on what the numbers say, written from them."""
    s, cpu = record["summary"], record["cpu"]
    g, w = s["geomean_speedup"], s["time_weighted_speedup"]
    lo, hi = s["range_speedup"].get("onednn_int8") or (None, None)
    isa = "AVX-512" if cpu["avx512"] else "AVX2, no AVX-512"
    parts = [
        f"On this CPU ({cpu['model_name']}, {isa}, {'with' if cpu['vnni'] else 'without'} VNNI), over "
        f"{len(record['rows'])} layer shapes, oneDNN int8 on an input already in uint8 runs at {_fmt(g.get('onednn_int8'))}x "
        f"the speed of the faster fp32 layout (geometric mean, range {_fmt(lo)}-{_fmt(hi)}x; {_fmt(w.get('onednn_int8'))}x "
        f"weighted by time), and at {_fmt(g.get('onednn_int8_q'))}x ({_fmt(w.get('onednn_int8_q'))}x weighted) when the "
        "layer quantizes its own fp32 input, as a backend that keeps float tensors between layers must; fbgemm "
        f"gives {_fmt(g.get('fbgemm_int8'))}x, and ONNX Runtime's QDQ int8 {_fmt(g.get('ort_int8'))}x over ORT's own fp32."
    ]
    unet = s.get("fashion-unet_layers_per_forward_ms", {})
    if "fp32_best_ms" in unet and "onednn_int8_q" in unet:
        parts.append(
            f"All fashion-unet convolutions and Linears of one batch-{BATCH} forward take {unet['fp32_best_ms']} ms in "
            f"fp32 and {unet['onednn_int8_q']} ms on oneDNN int8 with the quantize step."
        )
    if (w.get("onednn_int8_q") or 0) < 1.25:
        parts.append(
            "That is the ceiling for any int8 backend on this machine, diffquant's or a peer's: integer kernels buy "
            "no meaningful compute speed-up here, and what int8 saves is weight memory (4x), not time."
        )
        if not cpu["vnni"]:
            parts.append(
                "Without VNNI the integer inner loop needs three AVX2 instructions (vpmaddubsw, vpmaddwd, vpaddd) per "
                "32 multiply-adds against one FMA per 8 fp32 multiply-adds, so the 4x narrower type buys little "
                "arithmetic, and the quantize step and layout reorders eat the rest."
            )
    else:
        parts.append("Integer kernels are measurably faster than fp32 here; the speed-up with the quantize step is "
                     "what a backend can realise per layer.")  # fmt: skip
    return " ".join(parts)


def markdown(record: dict) -> str:
    cpu = record["cpu"]
    lines = [
        "# CPU kernels: int8 vs fp32 per layer shape (same run)",
        "",
        *(["**Quick smoke run: a few shapes, few repeats; not a measurement.**", ""] if record["quick"] else []),
        f"Command: `{record['command']}`",
        "",
        f"torch {record['torch']}, onnxruntime {record['onnxruntime']}, {record['threads']} thread(s), median of "
        f"{record['repeats']} runs after warm-up (each run >= {record['min_run_ms']} ms of calls).",
        f"CPU (`lscpu`): **{cpu['model_name']}** ({cpu['family_model']}, {cpu['cores']} cores); relevant flags: "
        f"`{' '.join(cpu['relevant_flags']) or 'none'}`; AVX-512: {cpu['avx512']}; VNNI: {cpu['vnni']}.",
        "",
        meaning(record),
        "",
        "Times in ms per call. Speed-up = fp32 / int8 (torch variants against the faster fp32 layout; ORT int8 "
        "against ORT fp32). GFLOP/s of the faster fp32 and of oneDNN int8 (pre-quantized input).",
        "",
        "| group | layers | shape | GFLOP | fp32 NCHW | fp32 CL | oneDNN int8 | oneDNN int8+q | fbgemm int8 "
        "| ORT fp32 | ORT int8 | fp32 GFLOP/s | int8 GFLOP/s | x oneDNN | x oneDNN+q | x fbgemm | x ORT |",
        "|---|---:|---|---:|" + "---:|" * 13,
    ]
    for r in record["rows"]:
        ms, sp = r["ms"], r["speedup"]
        best = "fp32_cl" if ms.get("fp32_cl", math.inf) < ms.get("fp32", math.inf) else "fp32"
        cells = [r["group"], str(len(r["layers"])), r["label"], f"{r['gflop']:.3f}"]
        cells += [_fmt(ms.get(k), 3) for k in ("fp32", "fp32_cl", "onednn_int8", "onednn_int8_q", "fbgemm_int8")]
        cells += [_fmt(ms.get(k), 3) for k in ("ort_fp32", "ort_int8")]
        cells += [_fmt(r["gflops"].get(best), 1), _fmt(r["gflops"].get("onednn_int8"), 1)]
        cells += [_fmt(sp.get(k)) for k in ("onednn_int8", "onednn_int8_q", "fbgemm_int8", "ort_int8")]
        lines.append("| " + " | ".join(cells) + " |")
    s = record["summary"]
    lines += [
        "",
        "Speed-up per group (geometric mean over shapes; the weighted row is total fp32 time / total int8 time):",
        "",
        "| group | oneDNN | oneDNN+q | fbgemm | ORT |",
        "|---|---:|---:|---:|---:|",
    ]
    groups = [("all", s["geomean_speedup"]), ("all, weighted by time", s["time_weighted_speedup"])]
    for g, v in [*groups, *s["per_group"].items()]:
        keys = ("onednn_int8", "onednn_int8_q", "fbgemm_int8", "ort_int8")
        lines.append(f"| {g} | " + " | ".join(_fmt(v.get(k)) for k in keys) + " |")
    for g in ("fashion-unet", "fashion-dit"):
        t = s.get(f"{g}_layers_per_forward_ms")
        if t:
            parts = ", ".join(f"{k.removesuffix('_ms')} {v} ms" for k, v in t.items())
            lines.append(f"\nAll {g} layers of one batch-{BATCH} forward (shape time x layer count): {parts}.")
    errors = [(r["label"], k, e) for r in record["rows"] for k, e in r["errors"].items()]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {lbl} / {k}: {e}" for lbl, k, e in errors]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 9; quick 3)")
    parser.add_argument("--min-run-ms", type=float, default=None, help="shortest timed run (default 20; quick 5)")
    parser.add_argument("--quick", action="store_true", help="a handful of shapes, few repeats (smoke run)")
    parser.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime columns")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output stem (.md and .json are written)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 9)
    args.min_run_ms = args.min_run_ms or (5.0 if args.quick else 20.0)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "fbgemm"
    import onnxruntime

    record = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "cpu": cpu_info(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "threads": args.threads,
        "repeats": args.repeats,
        "min_run_ms": args.min_run_ms,
        "quick": args.quick,
        "rows": [],
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        for s in all_shapes(args.quick):
            row = measure(s, args, workdir)
            record["rows"].append(row)
            print(json.dumps({k: row[k] for k in ("group", "label", "ms", "speedup", "errors")}), flush=True)
    record["summary"] = summarize(record["rows"], per_forward=not args.quick)  # quick: not every layer
    record["seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(record))
    print(meaning(record))
    print(f"wrote {out.with_suffix('.md')} and .json in {record['seconds']} s")


if __name__ == "__main__":
    main()
