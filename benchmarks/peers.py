"""The built-in models through other tools' int8 paths, beside diffquant's: latency and FD, same run.

Pins used (``bench`` extra; none of them pulls or upgrades torch, checked with ``pip install --dry-run``):
    torchao==0.18.0  optimum-quanto==0.2.7  onnxruntime==1.32.0  onnx==1.23.2  onnxscript==0.7.2
    openvino==2026.4.1  nncf==3.4.0

    python benchmarks/peers.py                         # both models, N = 500, 2 threads (machine quiet)
    python benchmarks/peers.py --quick --threads 1     # fashion-unet, N = 64, DDIM-10, 3 repeats: a smoke run

Every tool gets the same model, the same batch-64 inputs for latency (``diffquant.bench.example_inputs``,
t = 500), and the same calibration data: the FP model's own DDIM-20 trajectories (seed 1234, 64 of
them, every 2nd step; the selection diffquant's ``uniform`` calibration observes). Each quantized model
is wrapped as ``model(x, t, class_labels) -> eps`` with the source model's ``config``, ``num_classes``
and ``sample_shape``, and sampled by ``diffquant.sampling.sample`` (DDIM, ``--steps`` 20, seed 0,
balanced classes, batches of 64: the last one padded, since exported graphs have a static batch);
FD against the shipped ``fashion-features`` training-set statistics, PSNR against the FP images of
identical noise.

Rows (a tool that fails to install, export, quantize or run gets a row with its error):
    FP32 eager / torch.compile     the model itself; ``diffquant.bench.compile_forward``
    ORT FP32                       ONNX Runtime on the ``torch.onnx.export(dynamo=True)`` graph
    ORT quantize_static            QDQ, per-channel s8 weights, u8 activations (MinMax), on Conv /
                                   MatMul / Gemm; ``reduce_range`` (7-bit weights) on CPUs without VNNI,
                                   as ORT recommends for AVX2
    ORT quantize_dynamic           per-channel s8 weights, activations quantized per call, default op types
    PT2E X86InductorQuantizer      torchao's PT2E flow: ``torch.export`` -> ``prepare_pt2e`` -> calibrate
                                   -> ``convert_pt2e`` -> ``torch.compile`` (freezing); static per-tensor
                                   u8 activations, per-channel s8 weights (``reduce_range`` without VNNI)
    optimum-quanto W8A8            ``quantize(weights=qint8, activations=qint8)``, ``Calibration``, ``freeze``
    torchao int8 dyn act + weight  ``Int8DynamicActivationInt8WeightConfig`` (Linear layers only), eager
                                   and ``torch.compile``
    OpenVINO FP32                  ``openvino.convert_model`` of the model, compiled for the CPU with the
                                   f32 precision hint (OpenVINO's default is bf16 on AVX512-BF16 / AMX CPUs)
    OpenVINO + NNCF int8           ``nncf.quantize`` (defaults) of the converted model on the same batches,
                                   at OpenVINO's default precision and with the f32 hint
    diffquant w8a8 / w8a7          ``diffquant.quantize(model, recipe)`` on the same calibration (w8a8 on
                                   VNNI CPUs, w8a7 without: 8-bit codes saturate AVX2's int16 pair sums):
                                   the fake-quant reference, and the CPU backend (``lower(.., "cpu")``)
                                   eager and ``compile_forward``

Weight bytes: the parameters (and for PT2E the graph's constants) as each tool stores them, quantization
scales included, activation-observer state excluded; ONNX: the initializers; diffquant:
``diffquant.serialization.weight_bytes`` (what a saved model holds; the CPU backend's prepacked copies
are not counted).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

warnings.filterwarnings("ignore", message=r"torch.quantize_per_(tensor|channel).*deprecated", category=UserWarning)

RESULTS = Path(__file__).parent / "results" / "peers"
BATCH = 64
CAL_SEED = 1234
CAL_STEPS = 20
TOOLS = ("fp32", "ort", "openvino", "pt2e", "quanto", "torchao", "diffquant")


@dataclass
class Variant:
    """One row: a callable ``fn(x, t, labels) -> eps`` at batch 64, or the error that stopped it."""

    tool: str
    name: str
    fn: Callable | None = None
    weight_bytes: int | None = None
    notes: str = ""
    build_s: float | None = None
    quality_from: str | None = None  # reuse another row's FD (same numerics), else sample this one
    error: str | None = None


@dataclass
class Context:
    """What every tool shares: the FP model, the latency inputs, the calibration batches, the evaluator."""

    model_name: str
    fp: nn.Module
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    calibration: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    args: argparse.Namespace
    workdir: str
    evaluator: object = None
    fp_out: torch.Tensor | None = None
    fp_images: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)


class Denoiser:
    """A peer's ``fn(x, t, labels)`` at a static batch, as ``diffquant.sampling.sample`` calls a model.

    Smaller batches are padded with copies of their last row and the padding is cut from the output.
    """

    def __init__(self, fn: Callable, source: nn.Module, batch: int = BATCH):
        self.fn, self.batch = fn, batch
        self.config, self.num_classes, self.sample_shape = source.config, source.num_classes, source.sample_shape

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n == self.batch:
            return self.fn(x, t, labels)
        pad = self.batch - n
        x, t, labels = (torch.cat([a, a[-1:].expand(pad, *a.shape[1:])]) for a in (x, t, labels))
        return self.fn(x, t, labels)[:n]


class Forward(nn.Module):
    """``forward(x, t, labels)`` of a built-in denoiser, positional only (for export)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, t, labels):
        return self.model(x, t, labels)


def vnni() -> bool:
    from diffquant.backends.cpu import vnni as has_vnni

    return has_vnni()


# ---------------------------------------------------------------- sizes


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage of a tensor; a tensor subclass (torchao, quanto) counts its inner tensors."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def module_weight_bytes(module: nn.Module) -> int:
    """Parameters, or for a converted graph the tensor constants it reads (``get_attr``), each counted once.

    A PT2E-converted graph keeps the float parameters it no longer reads; only its constants count.
    """
    seen, total = set(), 0
    tensors = [] if isinstance(module, torch.fx.GraphModule) else [p for _, p in module.named_parameters()]
    if isinstance(module, torch.fx.GraphModule):
        for node in module.graph.nodes:
            if node.op == "get_attr":
                obj = module
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                if isinstance(obj, torch.Tensor):
                    tensors.append(obj)
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def onnx_weight_bytes(path: str) -> int:
    """Bytes of an ONNX model's initializers."""
    import onnx
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(i).nbytes for i in onnx.load(path).graph.initializer)


# ---------------------------------------------------------------- shared data


def calibration_batches(fp: nn.Module, n: int, every: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(x_t, t, labels)`` at every ``every``-th step of ``n`` FP DDIM-20 trajectories (seed 1234), in batches of 64."""
    from diffquant.sampling import SamplerConfig, balanced_labels, sample_batch

    config = SamplerConfig(sampler="ddim", steps=CAL_STEPS, seed=CAL_SEED)
    out = []
    for lo in range(0, n, BATCH):
        hi = min(n, lo + BATCH)
        labels = balanced_labels(hi - lo, fp.num_classes, lo)

        def on_step(k, t, x_in, _eps, labels=labels):
            if k % every == 0:
                out.append((x_in.clone(), torch.full((x_in.shape[0],), t, dtype=torch.long), labels.clone()))

        sample_batch(
            fp, range(lo, hi), labels, config, fp.config["scheduler"], fp.sample_shape, fp.num_classes,
            on_step=on_step,
        )  # fmt: skip
    return out


def diffquant_calibration(args):
    from diffquant.recipe import CalibrationConfig

    return CalibrationConfig(
        selection="uniform", n_samples=args.cal_n, steps=CAL_STEPS, every=args.cal_every, batch_size=BATCH,
        seed=CAL_SEED,
    )  # fmt: skip


# ---------------------------------------------------------------- tools


def tool_fp32(ctx: Context) -> list[Variant]:
    from diffquant.bench import compile_forward
    from diffquant.serialization import weight_bytes

    fp = ctx.fp
    size = weight_bytes(fp)
    rows = [Variant("FP32", "eager (baseline)", fp, size)]
    if ctx.args.quick:  # the same compile_forward the diffquant rows use; skipped to keep a smoke run short
        return rows
    start = time.perf_counter()
    try:
        compiled = compile_forward(copy.deepcopy(fp))
        compiled(*ctx.inputs)
    except Exception as e:  # keep the baseline row whatever happens to the compiled one
        return [*rows, Variant("FP32", "torch.compile", error=_error(e))]
    rows.append(
        Variant("FP32", "torch.compile", compiled, size, "diffquant.bench.compile_forward (Inductor, freezing)",
                time.perf_counter() - start, quality_from="FP32 / eager (baseline)")
    )  # fmt: skip
    return rows


def export_onnx(ctx: Context) -> str:
    """The FP model as ONNX (dynamo exporter, opset 18, static batch 64), written once per model."""
    if "onnx" in ctx.cache:
        return ctx.cache["onnx"]
    path = os.path.join(ctx.workdir, f"{ctx.model_name}.onnx")
    torch.onnx.export(
        Forward(ctx.fp).eval(), ctx.inputs, path, input_names=["x", "t", "labels"], output_names=["eps"],
        opset_version=18, dynamo=True, verbose=False,
    )  # fmt: skip
    ctx.cache["onnx"] = path
    return path


def ort_session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    def fn(x, t, labels):
        feed = {"x": x.contiguous().numpy(), "t": t.contiguous().numpy(), "labels": labels.contiguous().numpy()}
        return torch.from_numpy(sess.run(None, feed)[0])

    return fn


def tool_ort(ctx: Context) -> list[Variant]:
    import onnxruntime  # noqa: F401  (an ImportError becomes the row's error)
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    logging.getLogger().setLevel(logging.ERROR)  # quantize_*'s "consider pre-processing" warnings
    start = time.perf_counter()
    src = export_onnx(ctx)
    rows = [Variant("ONNX Runtime", "FP32", ort_session(src, ctx.args.threads), onnx_weight_bytes(src),
                    "torch.onnx.export(dynamo=True, opset 18)", time.perf_counter() - start,
                    quality_from="FP32 / eager (baseline)")]  # fmt: skip
    pre = os.path.join(ctx.workdir, "pre.onnx")
    try:
        quant_pre_process(src, pre)
    except Exception:  # pre-processing is advice, not a requirement
        pre = src
    reduce = not vnni()

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter({"x": x.numpy(), "t": t.numpy(), "labels": y.numpy()} for x, t, y in ctx.calibration)

        def get_next(self):
            return next(self.items, None)

    rows.append(_ort_quantized(ctx, "quantize_static (QDQ)", lambda out: quantize_static(
        pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, reduce_range=reduce, op_types_to_quantize=["Conv", "MatMul", "Gemm"],
    ), f"per-channel s8 weights, u8 static activations (MinMax), Conv/MatMul/Gemm, reduce_range={reduce}"))  # fmt: skip
    rows.append(_ort_quantized(ctx, "quantize_dynamic", lambda out: quantize_dynamic(
        pre, out, per_channel=True, reduce_range=reduce, weight_type=QuantType.QInt8,
    ), f"per-channel s8 weights, dynamic u8 activations, default op types, reduce_range={reduce}"))  # fmt: skip
    return rows


def _ort_quantized(ctx: Context, name: str, quantize: Callable[[str], None], notes: str) -> Variant:
    start = time.perf_counter()
    out = os.path.join(ctx.workdir, name.split()[0] + ".onnx")
    try:
        quantize(out)
        fn = ort_session(out, ctx.args.threads)
        fn(*ctx.inputs)
    except Exception as e:
        return Variant("ONNX Runtime", name, error=_error(e), notes=notes)
    return Variant("ONNX Runtime", name, fn, onnx_weight_bytes(out), notes, time.perf_counter() - start)


def _float_only_x86_quantizer():
    """``X86InductorQuantizer`` that leaves ops on integer tensors alone.

    It annotates ``aten.mul`` of diffusers' ``timesteps * torch.ones(..., dtype=int64)`` for
    quantization, and its HistogramObserver then fails on int64 ("histogram_cpu not implemented for
    'Long'"); dropping annotations of nodes with an integer input is the workaround.
    """
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    class FloatOnly(X86InductorQuantizer):
        def annotate(self, model):
            model = super().annotate(model)
            for node in model.graph.nodes:
                vals = [a.meta.get("val") for a in node.all_input_nodes]
                if any(isinstance(v, torch.Tensor) and not v.dtype.is_floating_point for v in vals):
                    node.meta.pop("quantization_annotation", None)
            return model

    return FloatOnly()


def openvino_fn(model, threads: int, precision: str | None):
    """``fn(x, t, labels)`` of an OpenVINO model compiled for the CPU (``precision``: the inference
    precision hint, ``None`` for OpenVINO's default: bf16 where the CPU has AVX512-BF16 or AMX)."""
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()

    def fn(x, t, labels):
        request.infer([x.contiguous().numpy(), t.contiguous().numpy(), labels.contiguous().numpy()])
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return fn


def openvino_weight_bytes(model, workdir: str, name: str) -> int:
    import openvino as ov

    path = os.path.join(workdir, f"{name}.xml")
    ov.save_model(model, path, compress_to_fp16=False)
    return os.path.getsize(path[:-4] + ".bin")


def tool_openvino(ctx: Context) -> list[Variant]:
    """OpenVINO FP32 and OpenVINO + NNCF post-training int8 (``nncf.quantize`` on the converted model, the
    calibration batches every tool gets; what optimum-intel's quantization runs for a denoiser)."""
    import nncf
    import openvino as ov

    start = time.perf_counter()
    model = ov.convert_model(Forward(copy.deepcopy(ctx.fp)).eval(), example_input=ctx.inputs)
    threads = ctx.args.threads
    rows = [Variant("OpenVINO", "FP32 (f32 precision hint)", openvino_fn(model, threads, "f32"),
                    openvino_weight_bytes(model, ctx.workdir, "fp32"), "openvino.convert_model",
                    time.perf_counter() - start)]  # fmt: skip
    start = time.perf_counter()
    dataset = nncf.Dataset(ctx.calibration, lambda b: [a.numpy() for a in b])
    quantized = nncf.quantize(model, dataset, subset_size=len(ctx.calibration))
    size = openvino_weight_bytes(quantized, ctx.workdir, "int8")
    build = time.perf_counter() - start
    notes = (f"nncf.quantize defaults (preset performance: symmetric per-tensor activations, per-channel s8 "
             f"weights), {len(ctx.calibration)} calibration batches")  # fmt: skip
    for name, precision, where in (
        ("default precision", None, "float parts at OpenVINO's default precision"),
        ("f32 precision hint", "f32", "float parts in f32"),
    ):  # each compiled on its own: the CPU plugin can refuse one (fashion-dit at bf16: "No suitable implementations")
        try:
            rows.append(Variant("OpenVINO + NNCF int8", name, openvino_fn(quantized, threads, precision), size,
                                f"{notes}; {where}", build))  # fmt: skip
        except Exception as e:
            rows.append(Variant("OpenVINO + NNCF int8", name, notes=f"{notes}; {where}", error=_error(e)))
    return rows


def tool_pt2e(ctx: Context) -> list[Variant]:
    import torch._inductor.config as inductor_config
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import get_default_x86_inductor_quantization_config

    start = time.perf_counter()
    reduce = not vnni()
    exported = torch.export.export(Forward(copy.deepcopy(ctx.fp)).eval(), ctx.inputs).module()
    quantizer = _float_only_x86_quantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config(reduce_range=reduce))
    prepared = prepare_pt2e(exported, quantizer)
    for batch in ctx.calibration:
        prepared(*batch)
    converted = convert_pt2e(prepared)
    move_exported_model_to_eval(converted)
    size = module_weight_bytes(converted)
    inductor_config.freezing = True
    torch._dynamo.reset()
    compiled = torch.compile(converted)
    compiled(*ctx.inputs)
    notes = (f"torchao.quantization.pt2e, static per-tensor u8 activations (histogram), per-channel s8 weights, "
             f"reduce_range={reduce}; int64 time-step mul unannotated (see _float_only_x86_quantizer)")  # fmt: skip
    return [Variant("PT2E X86InductorQuantizer", "torch.compile", compiled, size, notes, time.perf_counter() - start)]


def tool_quanto(ctx: Context) -> list[Variant]:
    from optimum.quanto import Calibration, freeze, qint8, quantize

    start = time.perf_counter()
    model = copy.deepcopy(ctx.fp)
    quantize(model, weights=qint8, activations=qint8)
    with Calibration(momentum=0.9):
        for batch in ctx.calibration:
            model(*batch)
    freeze(model)
    notes = "qint8 per-channel weights, qint8 static per-tensor activations (Calibration, momentum 0.9), eager"
    return [Variant("optimum-quanto W8A8", "eager", model, module_weight_bytes(model), notes,
                    time.perf_counter() - start)]  # fmt: skip


def tool_torchao(ctx: Context) -> list[Variant]:
    import torch._inductor.config as inductor_config
    import torchao.quantization as tq

    config_cls = getattr(tq, "Int8DynamicActivationInt8WeightConfig", None)
    start = time.perf_counter()
    model = copy.deepcopy(ctx.fp)
    if config_cls is not None:
        tq.quantize_(model, config_cls())
    else:  # older torchao names
        tq.quantize_(model, tq.int8_dynamic_activation_int8_weight())
    size = module_weight_bytes(model)
    notes = "Linear layers only (convolutions stay FP32); per-token dynamic activations, per-channel weights"
    rows = [Variant("torchao int8 dyn act + int8 weight", "eager", model, size, notes, time.perf_counter() - start)]
    try:
        start = time.perf_counter()
        inductor_config.freezing = True
        torch._dynamo.reset()
        compiled = torch.compile(model)
        compiled(*ctx.inputs)
        rows.append(Variant(rows[0].tool, "torch.compile", compiled, size, notes + " (Inductor, freezing)",
                            time.perf_counter() - start))  # fmt: skip
    except Exception as e:
        rows.append(Variant(rows[0].tool, "torch.compile", error=_error(e)))
    return rows


def tool_diffquant(ctx: Context) -> list[Variant]:
    from diffquant import quantize
    from diffquant.backends import lower
    from diffquant.bench import compile_forward
    from diffquant.serialization import weight_bytes

    start = time.perf_counter()
    recipe = "w8a8" if vnni() else "w8a7"  # 8-bit codes saturate AVX2's int16 pair sums (docs/backends.md)
    quantized = quantize(copy.deepcopy(ctx.fp), recipe, diffquant_calibration(ctx.args), progress=False)
    size = weight_bytes(quantized)
    tool = f"diffquant {recipe}"
    rows = [Variant(tool, "reference (fake quant)", quantized, size, "same calibration trajectories as the peers",
                    time.perf_counter() - start)]  # fmt: skip
    start = time.perf_counter()
    runner, report = lower(copy.deepcopy(quantized), "cpu")  # lowered layers hold oneDNN handles: never deepcopy them
    lowered = f"CPU backend: {len(report.lowered)} layers on oneDNN int8, {len(report.kept)} on the reference path"
    eager_s = time.perf_counter() - start
    try:
        start = time.perf_counter()
        torch._dynamo.reset()
        compiled = compile_forward(lower(copy.deepcopy(quantized), "cpu")[0])
        compiled(*ctx.inputs)
        rows.append(Variant(tool, "CPU backend, compile_forward", compiled, size, lowered,
                            eager_s + time.perf_counter() - start))  # fmt: skip
        share = f"{tool} / CPU backend, compile_forward"
    except Exception as e:
        rows.append(Variant(tool, "CPU backend, compile_forward", error=_error(e)))
        share = None
    rows.append(Variant(tool, "CPU backend, eager", runner, size, lowered, eager_s, quality_from=share))
    return rows


BUILDERS = {
    "fp32": tool_fp32,
    "ort": tool_ort,
    "openvino": tool_openvino,
    "pt2e": tool_pt2e,
    "quanto": tool_quanto,
    "torchao": tool_torchao,
    "diffquant": tool_diffquant,
}
TOOL_NAMES = {
    "fp32": "FP32",
    "ort": "ONNX Runtime",
    "openvino": "OpenVINO",
    "pt2e": "PT2E X86InductorQuantizer",
    "quanto": "optimum-quanto W8A8",
    "torchao": "torchao int8 dyn act + int8 weight",
    "diffquant": "diffquant",
}


# ---------------------------------------------------------------- measuring


def _error(e: BaseException) -> str:
    last = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" (at {Path(last.filename).name}:{last.lineno})" if last else ""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = " / ".join(
        lines[-2:] if lines and lines[0].startswith("Exception from") else lines[:1]
    )  # OpenVINO: the cause last
    return f"{type(e).__name__}: {text[:300]}{where}"


def quality(ctx: Context, fn: Callable) -> dict:
    """FD / class consistency of ``fn``'s samples (DDIM, seed 0), and PSNR against the FP images."""
    from diffquant.eval import psnr_per_image
    from diffquant.sampling import sample

    start = time.perf_counter()
    images, labels = sample(
        Denoiser(fn, ctx.fp), n=ctx.args.n, steps=ctx.args.steps, sampler="ddim", seed=0, batch_size=BATCH,
        progress=False,
    )  # fmt: skip
    score = ctx.evaluator.score(images, labels)
    out = {"fd": round(score["fd"], 4), "class_consistency": round(score["class_consistency"], 4)}
    if ctx.fp_images is None:
        ctx.fp_images = images
    else:
        out["psnr_vs_fp"] = round(float(psnr_per_image(images, ctx.fp_images).mean()), 2)
    out["quality_s"] = round(time.perf_counter() - start, 1)
    return out


def measure(ctx: Context, v: Variant, done: dict[str, dict]) -> dict:
    """Latency, SQNR against the FP output and quality of one variant; an error row if any step fails."""
    from diffquant.bench import sqnr_db, time_ms

    row = {"tool": v.tool, "variant": v.name, "notes": v.notes, "weight_bytes": v.weight_bytes}
    row["build_s"] = None if v.build_s is None else round(v.build_s, 1)
    if v.error is not None:
        return {**row, "error": v.error}
    try:
        out = v.fn(*ctx.inputs)
        if ctx.fp_out is None:
            ctx.fp_out = out
        sqnr = sqnr_db(ctx.fp_out, out)
        row["sqnr_vs_fp_db"] = None if math.isinf(sqnr) else round(sqnr, 2)
        row["latency_ms"] = round(time_ms(lambda: v.fn(*ctx.inputs), ctx.args.repeats, ctx.args.warmup), 2)
        shared = done.get(v.quality_from or "")
        if shared is not None and "fd" in shared:
            row.update({k: shared[k] for k in ("fd", "class_consistency", "psnr_vs_fp") if k in shared})
            row["quality_of"] = v.quality_from
        elif not ctx.args.no_quality:
            row.update(quality(ctx, v.fn))
    except Exception as e:
        row["error"] = _error(e)
    return row


def run_model(name: str, args, evaluator) -> list[dict]:
    """All tools on one built-in model; rows in the order measured."""
    from diffquant.bench import example_inputs
    from diffquant.models import load_builtin

    fp = load_builtin(name).eval()
    calib = calibration_batches(fp, args.cal_n, args.cal_every)
    rows: list[dict] = []
    done: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as workdir:
        ctx = Context(name, fp, example_inputs(fp, BATCH), calib, args, workdir, evaluator)
        for key in args.tools:
            start = time.perf_counter()
            try:
                variants = BUILDERS[key](ctx)
            except Exception as e:  # the tool failed to import, export, quantize or compile
                variants = [Variant(TOOL_NAMES[key], "—", error=_error(e))]
            for v in variants:
                row = {"model": name, **measure(ctx, v, done)}
                done[f"{v.tool} / {v.name}"] = row
                rows.append(row)
                print(json.dumps(row), flush=True)
            del variants
            print(f"# {name} {key}: {time.perf_counter() - start:.0f} s", flush=True)
    fp_ms = next((r.get("latency_ms") for r in rows if r["tool"] == "FP32" and r["variant"].startswith("eager")), None)
    for r in rows:
        if fp_ms and r.get("latency_ms"):
            r["speedup_vs_fp32_eager"] = round(fp_ms / r["latency_ms"], 3)
    return rows


# ---------------------------------------------------------------- output


def versions() -> dict:
    """Versions of every tool (``None`` when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in (
        "torch", "diffquant", "onnxruntime", "onnx", "onnxscript", "openvino", "nncf", "torchao", "optimum-quanto",
        "diffusers",
    ):  # fmt: skip
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _cell(v, fmt: str = "{}") -> str:
    return "—" if v is None else fmt.format(v)


def markdown(record: dict) -> str:
    a = record["args"]
    floor = record.get("fd_floor")
    lines = [
        "# Peers: the built-in models through other tools' int8 paths (same run)",
        "",
        *(["**Quick smoke run (small N, few steps and repeats): not a measurement.**", ""] if a["quick"] else []),
        f"Command: `{record['command']}`",
        "",
        f"{record.get('cpu', record['machine'])}; {record['threads']} thread(s); VNNI: {record['vnni']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v)
        + ".",
        f"Latency: one batch-{BATCH} forward, median of {a['repeats']} after {a['warmup']} warm-up call(s). Quality: "
        f"N = {a['n']}, DDIM-{a['steps']}, seed 0, FD against the `fashion-features` training-set statistics"
        + (f" (real-data FD floor at this N: {floor:.3f})" if floor else "")
        + f"; calibration: {a['cal_n']} FP DDIM-{CAL_STEPS} trajectories (seed {CAL_SEED}), every {a['cal_every']}"
        f"{'nd' if a['cal_every'] == 2 else 'th'} step.",
        "",
        "| model | tool | variant | latency (ms) | speed-up vs FP32 eager | weights (MB) | SQNR vs FP (dB) | FD "
        "| class cons. | PSNR vs FP (dB) | build (s) | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in record["rows"]:
        mb = None if r.get("weight_bytes") is None else r["weight_bytes"] / 2**20
        notes = f"**error**: {r['error']}" if r.get("error") else r.get("notes", "")
        if r.get("quality_of"):
            notes += f" (quality: same numerics as {r['quality_of']})"
        cells = [
            r["model"], r["tool"], r["variant"], _cell(r.get("latency_ms")), _cell(r.get("speedup_vs_fp32_eager"), "{}x"),
            _cell(mb, "{:.2f}"), _cell(r.get("sqnr_vs_fp_db")), _cell(r.get("fd")), _cell(r.get("class_consistency")),
            _cell(r.get("psnr_vs_fp")), _cell(r.get("build_s")), notes.replace("|", "/"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    from diffquant.models import DENOISERS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", choices=DENOISERS, default=None,
                        help="built-in models (default: both; with --quick: fashion-unet)")  # fmt: skip
    parser.add_argument("--n", type=int, default=None, help="samples per FD (default 500; quick 64)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps of the quality runs (default 20; quick 10)")
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed forwards per row (default 7; quick 3)")
    parser.add_argument("--cal-n", type=int, default=64, help="calibration trajectories (default 64)")
    parser.add_argument("--cal-every", type=int, default=None, help="calibration step stride (default 2; quick 5)")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS), help="which tools (default all)")
    parser.add_argument("--no-quality", action="store_true", help="latency only, no FD")
    parser.add_argument(
        "--quick", action="store_true",
        help="a smoke run: fashion-unet, N = 64, DDIM-10, 3 repeats, calibration every 5th step, no FP32 compile row",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS, help="output stem (.md and .json are written)")
    args = parser.parse_args(argv)
    args.model = args.model or (["fashion-unet"] if args.quick else list(DENOISERS))
    args.n = args.n or (64 if args.quick else 500)
    args.steps = args.steps or (10 if args.quick else 20)
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.warmup = 1 if args.quick else 2
    args.cal_every = args.cal_every or (5 if args.quick else 2)
    if "fp32" not in args.tools:  # the baseline row is what every ratio and PSNR is against
        args.tools.insert(0, "fp32")
    return args


def main(argv=None) -> None:
    from diffquant.backends.cpu import host as cpu_host

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffquant.eval import Evaluator
    from diffquant.eval.evaluate import load_reference

    record = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu": cpu_host()["text"],
        "threads": args.threads,
        "vnni": vnni(),
        "versions": versions(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": [],
    }
    try:
        record["fd_floor"] = load_reference()["fd_test_vs_train"].get(str(args.n))
    except (FileNotFoundError, KeyError):
        record["fd_floor"] = None
    start = time.perf_counter()
    evaluator = Evaluator()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for name in args.model:  # written after every model: a long run stopped midway keeps what it measured
            record["rows"] += run_model(name, args, evaluator)
            record["seconds"] = round(time.perf_counter() - start, 1)
            for suffix, text in ((".json", json.dumps(record, indent=2) + "\n"), (".md", markdown(record))):
                tmp = out.with_suffix(suffix + ".tmp")
                tmp.write_text(text)
                tmp.replace(out.with_suffix(suffix))
            print(f"wrote {out.with_suffix('.md')} and .json ({name} done) at {record['seconds']} s")


if __name__ == "__main__":
    main()
