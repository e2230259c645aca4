"""ONNX export of quantized models, run by ONNX Runtime (ORT) on its integer kernels.

:func:`export_onnx` writes one ``.onnx`` file computing ``eps = f(x, t, class_labels)`` (inputs ``x``
float ``[B, C, H, W]``, ``t`` and ``class_labels`` int64 ``[B]``; output ``eps``); :class:`OnnxDenoiser`
runs it as a denoiser that :func:`diffquant.sampling.sample` takes like the source model.

Every frozen :class:`~diffquant.nn.QuantConv2d` / :class:`~diffquant.nn.QuantLinear` with one weight scale
per output channel and an integer activation grid with one scale per tensor (``static``, ``bucketed``,
``tdq``, ``dynamic`` per tensor) becomes, in the default ``form="integer"``::

    QuantizeLinear(x, s_x[t], z_x[t]) -> uint8 codes  (+ Clip to the format's grid when narrower than 0..255)
    ConvInteger / MatMulInteger(codes, W + 128 as uint8, z_x, 128) -> int32  (exact integer sums)
    Cast -> Mul(s_x[t] * s_w per channel) -> Add(bias)

Why this form and not plain QDQ, measured with ORT 1.32 on the reference CPU (AMD EPYC Zen 2, AVX2,
no VNNI; ``benchmarks/results/onnx_export.md``):

* ORT fuses a QDQ convolution (``DequantizeLinear`` on int8 weights, axis 0, and on the activation) into
  ``QLinearConv`` only when the convolution's output is quantized too. Here the layer outputs stay
  float (GroupNorm, SiLU, residual adds follow), as in the reference, so for ``form="qdq"`` ORT
  dequantizes the weights on every call and runs a float ``Conv`` (1.5x a float conv); quantizing the
  outputs would add a rounding the reference does not have. QDQ Linear layers do become integer
  ``MatMulIntegerToFloat`` (with runtime scales as well).
* Weight codes are stored as ``uint8`` ``w + 128`` with zero point 128: ORT's u8 x u8 kernels are exact
  even with 8-bit activations (w8a8), while its u8 x s8 ``MatMulInteger`` saturates int16 pair sums
  (error 3e6 on sums of 7e6) and its u8 x s8 ``ConvInteger`` is exact but 5x slower than u8 x u8.
  So the integer form reproduces the reference for 8-bit activations, unlike the oneDNN backend.

Per-step scales (``bucketed``, ``tdq``) are tables with one entry per training time step
(``scale[bucket_of_t]``), read with a ``Gather`` on ``t[0]``. Chosen by measurement against the
alternative, one graph per step bucket with constant scales (``step=``): ORT's integer ops take scale
and zero point as run-time inputs, so constants fuse into nothing faster; fashion-unet, batch 64, one
thread, median of 9 interleaved rounds: 746 ms with tables, 750 ms with constant scales (another run:
502 vs 503). One table graph serves every step of every sampler with one session. ``step=`` stays for
runtimes whose own QDQ fusion needs constant scales.

Latency on that CPU (same runs): the integer graph takes 1.28-1.31x the float ONNX export and
1.05-1.10x PyTorch eager FP32; the QDQ graph 1.35-1.44x the float export. ORT's u8 x u8 ``ConvInteger``
runs at 1.37x its float ``Conv`` (64x64x14x14, 3x3); on this CPU, as with oneDNN, integer execution
saves memory (int8 weights), not time.

Exactness: single layers match the fake-quant reference to 130-140 dB SQNR (float rounding) with
8-bit activations. Whole models match to about 40 dB: ORT's float ops (GroupNorm, softmax...) differ
from PyTorch's in the last bits, which moves values sitting at a rounding boundary to the next code
(the reference itself drops to 53 dB under a 1e-7 relative perturbation of its input).

Layers the integer ops cannot run exactly are exported as float ops on their dequantized weights,
with their activation quantizer still applied (FP8 as ``QuantizeLinear`` to ``float8e4m3fn``, opset 19+;
per-token scales as the reference's float formula), and listed with the reason in the
:class:`ExportReport`: per-group weights, FP8 weights or activations, per-token activation scales,
float activations, grouped convolutions. Attention matmul operands get ``QuantizeLinear`` /
``DequantizeLinear`` around float matmuls, which ORT fuses into ``QLinearMatMul`` /
``MatMulIntegerToFloat`` (u8 x u8).

The export traces a deep copy of the model with the TorchScript exporter (``dynamo=False``); the
caller's model is not modified.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffquant import primitives as P
from diffquant.backends.common import integer_obstacle
from diffquant.nn.modules import QuantConv2d, QuantEmbedding, QuantLinear, QuantModule
from diffquant.nn.output_gain import ATTR as OC_ATTR
from diffquant.nn.quantizer import ActQuantizer

FORMS = ("integer", "qdq")
DEFAULT_OPSET = 19
_WEIGHT_SHIFT = 128  # integer form: int8 weight codes w are stored as uint8 w + 128 with zero point 128
_FP8_OP = "Fp8QuantDequant"  # placeholder node, expanded into QuantizeLinear/DequantizeLinear after export
_DOMAIN = "diffquant"


class ExportError(ValueError):
    """A model cannot be exported (not quantized, uncalibrated, or a setting ONNX cannot express)."""


# ------------------------------------------------------------------------------------- graph ops


def _u8(g, value: int):
    return g.op("Constant", value_t=torch.tensor(value, dtype=torch.uint8))


class _Quantize(torch.autograd.Function):
    """``clamp(round(x / s) + z, lo, hi)`` as uint8: ``QuantizeLinear`` (+ ``Clip`` on a narrower grid)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, lo: int, hi: int):
        q = torch.round(x * (1.0 / scale)) + zero_point.float()
        return q.clamp(lo, hi).to(torch.uint8)

    @staticmethod
    def symbolic(g, x, scale, zero_point, lo, hi):
        q = g.op("QuantizeLinear", x, scale, zero_point)
        if (lo, hi) != (0, 255):
            q = g.op("Clip", q, _u8(g, lo), _u8(g, hi))
        return q


class _Dequantize(torch.autograd.Function):
    """``(q - z) * s``, per tensor or per channel along ``axis``: ``DequantizeLinear``."""

    @staticmethod
    def forward(ctx, q, scale, zero_point, axis: int):
        shape = [1] * q.dim()
        if scale.dim():
            shape[axis] = -1
        return (q.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis):
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=axis)


class _ConvInteger(torch.autograd.Function):
    """Exact integer convolution of uint8 codes (int32 out): ``ConvInteger``."""

    @staticmethod
    def forward(ctx, q, w, x_zp, w_zp, stride, padding, dilation):
        y = F.conv2d(q.double() - x_zp.double(), w.double() - w_zp.double(), None, stride, padding, dilation)
        return y.round().to(torch.int32)

    @staticmethod
    def symbolic(g, q, w, x_zp, w_zp, stride, padding, dilation):
        return g.op(
            "ConvInteger", q, w, x_zp, w_zp, strides_i=list(stride), pads_i=list(padding) * 2,
            dilations_i=list(dilation),
        )  # fmt: skip


class _MatMulInteger(torch.autograd.Function):
    """Exact integer matmul of uint8 codes with a uint8 ``(in, out)`` weight (int32 out): ``MatMulInteger``."""

    @staticmethod
    def forward(ctx, q, w, x_zp, w_zp):
        return ((q.double() - x_zp.double()) @ (w.double() - w_zp.double())).round().to(torch.int32)

    @staticmethod
    def symbolic(g, q, w, x_zp, w_zp):
        return g.op("MatMulInteger", q, w, x_zp, w_zp)


class _Fp8QuantDequant(torch.autograd.Function):
    """FP8 E4M3 quantize-dequantize with a per-tensor scale (expanded to Q/DQ after export)."""

    @staticmethod
    def forward(ctx, x, scale):
        return P.fake_quant_fp8(x, scale)

    @staticmethod
    def symbolic(g, x, scale):
        out = g.op(f"{_DOMAIN}::{_FP8_OP}", x, scale)
        out.setType(x.type())
        return out


# ------------------------------------------------------------------------------- export modules


class _Clock:
    """Holds the graph's time-step input while tracing, for the quantizers' per-step tables."""

    t: torch.Tensor | None = None


class _ExportQuantizer(nn.Module):
    """An :class:`ActQuantizer` as graph ops: its scale table indexed by the ``t`` input, or computed.

    Args:
        q: the quantizer.
        clock: where the traced ``t`` input is found.
        step: export the scale of this time step as a constant (``None``: the whole table).
    """

    def __init__(self, q: ActQuantizer, clock: _Clock, step: int | None):
        super().__init__()
        if q.learnable:
            raise ExportError(f"{q.name}: a learnable TDQ generator; freeze it into its table first (write_tdq_table)")
        if q.observing or not q.enabled:
            raise ExportError(f"{q.name}: the quantizer is observing or disabled; export after calibration has ended")
        if q.mode != "dynamic" and not q._ready:
            raise ExportError(f"{q.name}: activation scales are not calibrated; quantize the model with calibration")
        if q.qtype.kind == "float" and q.granularity != "tensor":
            raise ExportError(f"{q.name}: per-{q.granularity} fp8 activations have no ONNX form; use per-tensor scales")
        self.name, self.qtype, self.symmetric = q.name, q.qtype, q.symmetric
        self.mode, self.granularity, self.channel_dim = q.mode, q.granularity, q.channel_dim
        self.group_size = q.group_size
        self.clock = clock
        self.codes_exact = q.qtype.is_int and q.granularity == "tensor"  # uint8 codes + one scale
        self.shift = 2 ** (q.qtype.bits - 1) if q.symmetric and q.qtype.is_int else 0
        if q.qtype.is_int:
            qmin, qmax = P.int_range(q.qtype, q.symmetric)
            self.grid = (qmin + self.shift, qmax + self.shift)
        self.per_step = False
        if q.mode == "dynamic":
            return
        scale, zp = q.scale.detach().float(), q.zero_point.detach().float()
        if scale.numel() > 1:  # one entry per time step t in [0, T)
            scale, zp = scale[q.step_table()], zp[q.step_table()]
            if step is not None:
                scale, zp = scale[step], zp[step]
            self.per_step = step is None
        else:
            scale, zp = scale[0], zp[0]
        self.register_buffer("scale", scale.clone())
        self.register_buffer("zero_point", (zp.round() + self.shift).clamp(0, 255).to(torch.uint8))

    def params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, uint8 zero point)`` for ``x``: from the table at the graph's ``t``, or from ``x``."""
        if self.mode == "dynamic":
            lo, hi = P.dynamic_range(x, self.granularity, self.channel_dim)
            scale, zp = P.scale_from_range(lo, hi, self.qtype, self.symmetric)
            return scale, (zp + self.shift).to(torch.uint8)
        if self.per_step:
            i = self.clock.t.reshape(-1)[0]
            return self.scale[i], self.zero_point[i]
        return self.scale, self.zero_point

    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 codes of ``x`` with their scale and zero point."""
        scale, zp = self.params(x)
        return _Quantize.apply(x, scale, zp, *self.grid), scale, zp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.codes_exact:
            q, scale, zp = self.codes(x)
            return _Dequantize.apply(q, scale, zp, 0)
        if self.qtype.kind == "float":
            return _Fp8QuantDequant.apply(x, self.params(x)[0])
        return P.dynamic_fake_quant(x, self.qtype, self.granularity, self.symmetric, self.channel_dim, self.group_size)


class _LayerBase(nn.Module):
    """Shared parts of the exported layers: bias, SmoothQuant factors, input split, op settings."""

    def __init__(self, m: QuantModule, quantizers: list[_ExportQuantizer | None]):
        super().__init__()
        self.conv = isinstance(m, QuantConv2d)
        self.dim = 1 if self.conv else -1
        self.quantizers = nn.ModuleList([q for q in quantizers if q is not None])
        self.split = m.input_split
        if self.conv:
            self.stride, self.padding, self.dilation, self.groups = m.stride, m.padding, m.dilation, m.groups
        bias = None if m.bias is None else m.bias.detach().float().clone()
        smooth = None if m.smooth is None else m.smooth.detach().float().clone()
        self.register_buffer("bias", bias)
        self.register_buffer("smooth", smooth)

    def _view(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(-1, 1, 1) if self.conv else v

    def _parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.smooth is not None:
            x = x / self._view(self.smooth)
        if not self.split:
            return [x]
        return list(x.split([self.split, x.shape[self.dim] - self.split], dim=self.dim))


class _IntegerLayer(_LayerBase):
    """A quantized layer as exact integer ops (form ``integer``) or as QDQ float ops (form ``qdq``).

    ``integer``: ``QuantizeLinear -> ConvInteger / MatMulInteger (uint8 x uint8 -> int32) -> Cast -> Mul
    (x_scale * w_scale) -> Add (bias)``; ``qdq``: ``QuantizeLinear -> DequantizeLinear -> Conv / MatMul``
    with the weight ``DequantizeLinear(int8, per-channel scale)``.
    """

    def __init__(self, m: QuantModule, quantizers: list[_ExportQuantizer], form: str):
        super().__init__(m, quantizers)
        self.form = form
        w = m.integer_weight()
        cin = w.shape[1]
        bounds = [0, self.split, cin] if self.split else [0, cin]
        for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            part = w[:, lo:hi] if self.conv else w[:, lo:hi].t()  # linear: (in, out) for MatMul
            if form == "integer":
                part = (part.to(torch.int16) + _WEIGHT_SHIFT).to(torch.uint8)
            self.register_buffer(f"weight_{i}", part.contiguous())
        w_scale = m.weight_scale.detach().reshape(-1).float().clone()
        self.register_buffer("weight_scale", w_scale)
        zp = (
            torch.tensor(_WEIGHT_SHIFT, dtype=torch.uint8)
            if form == "integer"
            else torch.zeros(len(w_scale), dtype=torch.int8)
        )
        self.register_buffer("weight_zero_point", zp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        for i, (part, q) in enumerate(zip(self._parts(x), self.quantizers, strict=True)):
            w = getattr(self, f"weight_{i}")
            out = self._integer(part, q, w) if self.form == "integer" else self._qdq(part, q, w)
            y = out if y is None else y + out
        return y if self.bias is None else y + self._view(self.bias)

    def _integer(self, x, q: _ExportQuantizer, w) -> torch.Tensor:
        codes, scale, zp = q.codes(x)
        if self.conv:
            acc = _ConvInteger.apply(codes, w, zp, self.weight_zero_point, self.stride, self.padding, self.dilation)
        else:
            acc = _MatMulInteger.apply(codes, w, zp, self.weight_zero_point)
        return acc.float() * (scale * self._view(self.weight_scale))

    def _qdq(self, x, q: _ExportQuantizer, w) -> torch.Tensor:
        xh = q(x)
        wh = _Dequantize.apply(w, self.weight_scale, self.weight_zero_point, 0 if self.conv else 1)
        if self.conv:
            return F.conv2d(xh, wh, None, self.stride, self.padding, self.dilation)
        return xh @ wh


class _FloatLayer(_LayerBase):
    """A quantized layer the integer ops cannot run exactly: float op on its dequantized weight."""

    def __init__(self, m: QuantModule, quantizers: list[_ExportQuantizer | None]):
        super().__init__(m, quantizers)
        self.register_buffer("weight", m.quantized_weight().detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._parts(x)
        if self.quantizers:
            parts = [q(p) for p, q in zip(parts, self.quantizers, strict=True)]
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)
        if self.conv:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, self.weight, self.bias)


class _Graph(nn.Module):
    """The exported function ``(x, t, class_labels) -> eps``; publishes ``t`` to the quantizers."""

    def __init__(self, model: nn.Module, clock: _Clock, step: int | None = None):
        super().__init__()
        self.model = model
        self.clock = clock
        self.step = step

    def forward(self, x, t, class_labels):
        self.clock.t = t
        out = self.model.forward(x, t, class_labels)  # .forward: the eager hooks are not needed
        out = out.sample if hasattr(out, "sample") else out  # diffusers models return an output object
        oc = getattr(self.model, OC_ATTR, None)
        if oc is not None:  # the per-step output gain (its eager forward hook is skipped above)
            gain = oc.gain[self.step].reshape(1) if self.step is not None else oc.gain[t.long().reshape(-1)]
            out = oc.scale(out, gain, x.shape[1])
        return out


# ------------------------------------------------------------------------------------ the export


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote: layers on integer ops, the others with the reason."""

    path: Path
    form: str
    scales: str
    integer: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    operands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        op = "integer ops" if self.form == "integer" else "QDQ ops"
        head = f"{self.path}: {len(self.integer)} layers on {op}, {len(self.kept)} as float ops"
        lines = [f"{head}; activation scales: {self.scales}"]
        if self.operands:
            lines.append(f"  {len(self.operands)} attention matmul operands through QuantizeLinear/DequantizeLinear")
        reasons: dict[str, int] = {}
        for r in self.kept.values():
            reasons[r] = reasons.get(r, 0) + 1
        lines += [f"  {n} x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _saturation_note(model: nn.Module, report: ExportReport) -> str | None:
    """For the QDQ form: Linear layers whose u8 x s8 products can saturate ORT's kernels without VNNI."""
    risky = [
        n for n in report.integer
        if isinstance(m := model.get_submodule(n), QuantLinear)
        and 2 * (2**m.input_quantizer.qtype.bits - 1) * m.weight_qtype.qmax > 32767
    ]  # fmt: skip
    if not risky:
        return None
    return (
        f"{len(risky)} Linear layers: ORT runs QDQ Linear as u8 x s8 MatMulIntegerToFloat, which saturates on "
        "CPUs without VNNI with 8-bit activations; use form='integer' or 7-bit activations (e.g. recipe w8a7)"
    )


def _why_float(m: QuantModule) -> str | None:
    """Why ``m`` cannot be exported as exact integer ops, or ``None`` when it can."""
    return integer_obstacle(m, "ONNX Runtime's integer ops")


def _replace_layers(model: nn.Module, form: str, clock: _Clock, step: int | None, report: ExportReport) -> None:
    """Swap every quantized layer and activation quantizer of ``model`` (a copy) for its export module."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModule)]:
        if isinstance(m, QuantEmbedding):  # an index lookup: a float Gather on the dequantized table
            w = m.quantized_weight().detach().float()
            model.set_submodule(name, nn.Embedding.from_pretrained(w, freeze=True, padding_idx=m.padding_idx))
            report.kept[name] = "embedding table (weight-only: a float Gather on the dequantized rows)"
            continue
        quantizers = [
            None if q is None else _ExportQuantizer(q, clock, step)
            for q in (m.input_quantizer, m.input_quantizer_2 if m.input_split else None)
        ]
        why = _why_float(m)
        if why is None:
            model.set_submodule(name, _IntegerLayer(m, quantizers, form))
            report.integer.append(name)
        else:
            model.set_submodule(name, _FloatLayer(m, quantizers))
            report.kept[name] = why
    for name, q in [(n, m) for n, m in model.named_modules() if isinstance(m, ActQuantizer)]:
        model.set_submodule(name, _ExportQuantizer(q, clock, step))  # attention matmul operands
        report.operands.append(name)


def _example_inputs(model: nn.Module, batch: int, t: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *model.sample_shape, generator=g)
    return x, torch.full((batch,), t), torch.zeros(batch, dtype=torch.long)


def _num_timesteps(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    if isinstance(cfg, dict) and "scheduler" in cfg:
        return int(cfg["scheduler"]["num_train_timesteps"])
    return 1000


def _metadata(model: nn.Module, report: ExportReport, per_step: bool, step: int | None) -> dict[str, str]:
    """What :class:`OnnxDenoiser` (or any reader) needs besides the graph, as ONNX metadata strings."""
    meta = {
        "diffquant.form": report.form,
        "diffquant.per_step": json.dumps(per_step),
        "diffquant.step": json.dumps(step),
        "diffquant.num_timesteps": str(_num_timesteps(model)),
        "diffquant.num_classes": json.dumps(getattr(model, "num_classes", None)),
        "diffquant.sample_shape": json.dumps(list(getattr(model, "sample_shape", ()))),
        "diffquant.integer_layers": json.dumps(report.integer),
        "diffquant.float_layers": json.dumps(report.kept),
    }
    recipe = getattr(model, "diffquant_recipe", None)
    if recipe is not None:
        meta["diffquant.recipe"] = recipe.to_json()
    cfg = getattr(model, "config", None)
    if isinstance(cfg, dict):
        with contextlib.suppress(TypeError):  # a config JSON cannot hold: pass sample(schedule=...) instead
            meta["diffquant.config"] = json.dumps(dict(cfg))
    return meta


def _expand_fp8(proto) -> None:
    """Replace the FP8 placeholder nodes by ``QuantizeLinear``/``DequantizeLinear`` with a float8 zero point."""
    from onnx import TensorProto, helper

    nodes = list(proto.graph.node)
    if not any(n.op_type == _FP8_OP for n in nodes):
        return
    zp = helper.make_tensor("diffquant_fp8_zero_point", TensorProto.FLOAT8E4M3FN, [], [0.0])
    proto.graph.initializer.append(zp)
    out = []
    for n in nodes:
        if n.op_type != _FP8_OP:
            out.append(n)
            continue
        q = n.output[0] + "_fp8"
        out.append(helper.make_node("QuantizeLinear", [n.input[0], n.input[1], zp.name], [q], saturate=1))
        out.append(helper.make_node("DequantizeLinear", [q, n.input[1], zp.name], list(n.output)))
    del proto.graph.node[:]
    proto.graph.node.extend(out)
    kept = [o for o in proto.opset_import if o.domain != _DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)


def _keep_inputs(proto, batch: int | None) -> None:
    """Declare ``t`` and ``class_labels`` even where the graph does not read them (the exporter drops those)."""
    from onnx import TensorProto, helper

    present = {i.name for i in proto.graph.input}
    dim = "batch" if batch is None else batch
    for name in ("t", "class_labels"):
        if name not in present:
            proto.graph.input.append(helper.make_tensor_value_info(name, TensorProto.INT64, [dim]))


def _check_writable(path: Path) -> Path:
    """The directory ``path`` goes into (created), or a ``PermissionError`` that says what to do."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"cannot create the directory {parent} for {path.name} ({e}); choose another path") from e
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write into {parent}: the directory is read-only; choose another path")
    if path.is_dir():
        raise PermissionError(f"{path} is a directory; pass a file name such as {path / 'model.onnx'}")
    return parent


def _write_atomic(data: bytes, path: Path, parent: Path) -> None:
    """Write to a temporary sibling and rename it into place: no half-written file under ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _trace(graph: _Graph, args: tuple, opset: int, dynamic_batch: bool) -> bytes:
    """The TorchScript exporter's ONNX bytes for ``graph`` (its deprecation and tracer warnings silenced)."""
    names = ["x", "t", "class_labels"]
    dynamic = {n: {0: "batch"} for n in [*names, "eps"]} if dynamic_batch else None
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, args, buf, dynamo=False, opset_version=opset, input_names=names, output_names=["eps"],
            dynamic_axes=dynamic,
        )  # fmt: skip
    return buf.getvalue()


def _validate(qmodel: nn.Module, form: str, opset: int, step: int | None) -> None:
    if form not in FORMS:
        raise ExportError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    if not any(isinstance(m, QuantModule) for m in qmodel.modules()):
        raise ExportError("the model has no quantized layers: quantize it first (diffquant.quantize)")
    if not tuple(getattr(qmodel, "sample_shape", ())):
        raise ExportError("the model has no sample_shape attribute; set model.sample_shape = (C, H, W)")
    if not 13 <= opset <= 20:
        raise ExportError(f"opset must be in 13..20 (the TorchScript exporter's range), got {opset}")
    T = _num_timesteps(qmodel)
    if step is not None and not 0 <= step < T:
        raise ExportError(f"step must be a time step in [0, {T}), got {step}")


@torch.no_grad()
def export_onnx(
    qmodel: nn.Module,
    path: str | os.PathLike,
    *,
    batch: int | None = None,
    opset: int = DEFAULT_OPSET,
    form: str = "integer",
    step: int | None = None,
) -> ExportReport:
    """Export a quantized denoiser to one ONNX file: ``eps = f(x, t, class_labels)``.

    Args:
        qmodel: a quantized model (from :func:`diffquant.quantize` or :func:`diffquant.load_quantized`)
            with ``sample_shape``; it is not modified (the export works on a copy).
        path: the ``.onnx`` file to write; replaced if it exists, never left half-written.
        batch: a fixed batch size, or ``None`` for a dynamic batch dimension.
        opset: ONNX opset, 13..20 (19 or later for FP8 activations).
        form: ``integer`` (exact integer ops that ONNX Runtime runs on its integer kernels) or
            ``qdq`` (standard QuantizeLinear/DequantizeLinear around float ops, for runtimes that fuse
            QDQ themselves).
        step: bake the activation scales of this one time step in as constants; the file then
            serves that step only. ``None`` (default): per-step tables indexed by the ``t`` input,
            one file for every step of every sampler.

    Returns:
        An :class:`ExportReport`: which layers run on integer ops and why the others do not.

    Raises:
        ExportError: the model is not quantized, or holds a setting ONNX cannot express.
        PermissionError: ``path`` cannot be written.
    """
    import onnx

    _validate(qmodel, form, opset, step)
    path = Path(path)
    parent = _check_writable(path)
    model = copy.deepcopy(qmodel).eval().float()
    clock = _Clock()
    report = ExportReport(path, form, "tables indexed by t" if step is None else f"constants of time step {step}")
    _replace_layers(model, form, clock, step, report)
    if form == "qdq" and (note := _saturation_note(qmodel, report)) is not None:
        report.notes.append(note)
    quantizers = [m for m in model.modules() if isinstance(m, _ExportQuantizer)]
    if opset < 19 and any(q.qtype.kind == "float" for q in quantizers):
        raise ExportError(f"FP8 activations need opset 19 or later (QuantizeLinear to float8); got opset {opset}")
    per_step = any(q.per_step for q in quantizers)
    T = _num_timesteps(qmodel)
    args = _example_inputs(qmodel, batch or 2, T - 1 if step is None else step)
    proto = onnx.load_from_string(_trace(_Graph(model, clock, step), args, opset, batch is None))
    _expand_fp8(proto)
    _keep_inputs(proto, batch)
    for k, v in _metadata(qmodel, report, per_step, step).items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto)
    _write_atomic(proto.SerializeToString(), path, parent)
    return report


# --------------------------------------------------------------------------------- running it


def session_options(threads: int | None = None, optimized_model: str | os.PathLike | None = None):
    """ONNX Runtime session options: ``threads`` intra-op threads (``None``: ORT's default, all cores).

    Args:
        threads: intra-op threads.
        optimized_model: also write the graph ORT runs after its optimizations to this file.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3  # ORT warns on every optimized-model write; keep errors only
    if optimized_model is not None:
        so.optimized_model_filepath = str(optimized_model)
    return so


def ort_op_types(path: str | os.PathLike) -> Counter:
    """How many nodes of each op type the graph ONNX Runtime actually runs for ``path`` holds.

    This is the graph after ORT's optimizations (QDQ fusion, layout changes), on the CPU provider.
    """
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "optimized.onnx"
        ort.InferenceSession(str(path), session_options(1, out), providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(str(out)).graph.node)


class OnnxDenoiser(nn.Module):
    """An exported model as a denoiser ``model(x, t, class_labels) -> eps`` on ONNX Runtime.

    Carries ``config``, ``num_classes`` and ``sample_shape`` (from the export's metadata), so
    :func:`diffquant.sampling.sample` takes it like the source model.

    Args:
        path: a file written by :func:`export_onnx`.
        threads: intra-op threads of the session (``None``: ONNX Runtime's default, all cores).
        providers: ONNX Runtime execution providers.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, providers=("CPUExecutionProvider",)):
        super().__init__()
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist; write it with diffquant.backends.onnx.export_onnx")
        self.session = ort.InferenceSession(str(self.path), session_options(threads), providers=list(providers))
        meta = self.session.get_modelmeta().custom_metadata_map
        if "diffquant.sample_shape" not in meta:
            raise ValueError(f"{self.path} was not written by diffquant's export_onnx (no diffquant metadata)")
        self.metadata = meta
        self.config = json.loads(meta["diffquant.config"]) if "diffquant.config" in meta else None
        self.num_classes = json.loads(meta["diffquant.num_classes"])
        self.sample_shape = tuple(json.loads(meta["diffquant.sample_shape"]))
        self.num_timesteps = int(meta["diffquant.num_timesteps"])
        self.per_step = json.loads(meta["diffquant.per_step"])
        self.step = json.loads(meta["diffquant.step"])

    def _timesteps(self, t, n: int) -> torch.Tensor:
        """``t`` as int64 ``[n]``, checked against what the graph can serve."""
        t = torch.as_tensor(t).detach().cpu().round().long().reshape(-1)
        t = t.expand(n) if t.numel() == 1 else t
        if t.numel() != n:
            raise ValueError(f"t has {t.numel()} entries for a batch of {n}")
        if bool(((t < 0) | (t >= self.num_timesteps)).any()):
            raise ValueError(f"time steps must be in [0, {self.num_timesteps}), got {t.unique().tolist()}")
        if self.per_step and bool((t != t[0]).any()):
            raise ValueError(
                "a quantized model with per-step scales needs one time step per call; got a batch of "
                "different time steps (sample them in separate calls)"
            )
        if self.step is not None and bool((t != self.step).any()):
            raise ValueError(
                f"{self.path} holds the activation scales of time step {self.step} only, got t = {t.unique().tolist()}; "
                "export without step= for a file that serves every step"
            )
        return t.contiguous()

    def forward(self, x: torch.Tensor, t, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        if class_labels is None:
            class_labels = torch.full((n,), self.num_classes, dtype=torch.long)
        feeds = {
            "x": x.detach().float().contiguous().cpu().numpy(),
            "t": self._timesteps(t, n).numpy(),
            "class_labels": torch.as_tensor(class_labels).long().reshape(-1).contiguous().cpu().numpy(),
        }
        (eps,) = self.session.run(["eps"], feeds)
        return torch.from_numpy(eps).to(x.device)

    def extra_repr(self) -> str:
        return f"{self.path}, form={self.metadata.get('diffquant.form')}"
