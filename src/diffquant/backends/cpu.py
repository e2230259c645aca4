"""CPU integer execution: oneDNN u8 x s8 kernels with per-step activation scales.

:func:`lower` swaps every frozen :class:`~diffquant.nn.QuantConv2d` / :class:`~diffquant.nn.QuantLinear`
that integer kernels can run exactly for an :class:`Int8Conv2d` / :class:`Int8Linear`:

* weights: integer codes of 8 bits or fewer (``int2``..``int8``, ternary, binary) with one scale per
  output channel, unpacked once into oneDNN's prepacked int8 layout (packed int4 storage stays
  packed on disk; the kernel reads int8);
* input activations: an integer grid of 8 bits or fewer with one scale per tensor: ``static``,
  ``bucketed``, ``tdq`` (the frozen per-step table) or ``dynamic`` per tensor. The codes are held in
  ``uint8``; grids narrower than ``[0, 255]`` (fewer bits, symmetric) are clamped to their own range
  first, so the integers are exactly the fake-quant reference's integers.

Each layer runs as one opaque operator, ``diffquant::int8_layer``, that quantizes its input with the
scale of the current step (a Python list lookup: no tensor read, no recompilation per step) and
calls ``onednn::qconv2d_pointwise`` / ``onednn::qlinear_pointwise``, whose output is float32 with
the bias added. Under ``torch.compile`` the operator stays one graph node for every step, so
Inductor fuses the float ops around it (normalisations, activations, residual adds) once.

Layers the kernels cannot run exactly keep their float reference path and are listed, with the
reason, in the :class:`LoweringReport`: per-group weights, FP8, per-token dynamic activations,
float weights (weight-only recipes), learnable TDQ generators.

On the reference machine (AMD EPYC Zen 2, AVX2 without VNNI) oneDNN's int8 convolutions run at the
speed of its fp32 ones (``benchmarks/cpu_kernels.md``): integer arithmetic there saves memory, not time.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from diffquant import primitives as P
from diffquant.backends.common import HANDLES, LoweringError, LoweringReport, StepQuantizer, integer_obstacle
from diffquant.nn.modules import QuantConv2d, QuantLinear, QuantModule
from diffquant.nn.quantizer import ActQuantizer
from diffquant.timestep import require_step

__all__ = ["Int8Conv2d", "Int8Linear", "LoweringError", "LoweringReport", "StepQuantizer", "lower"]

# torch.quantize_per_tensor is the fast vectorised quantizer (20x the decomposed op); it warns that
# quantized dtypes are deprecated: we only use it to compute uint8 codes, read out with int_repr.
warnings.filterwarnings("ignore", message=r"torch.quantize_per_tensor.*deprecated", category=UserWarning)

_LAYERS: weakref.WeakValueDictionary[int, _Kernel] = weakref.WeakValueDictionary()


def available() -> bool:
    """Whether this PyTorch build has the oneDNN int8 operators the CPU backend needs."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")


class _ActCodes:
    """Per-tensor uint8 activation parameters of one input, looked up by time step.

    Holds Python floats and ints only, so the lookup costs nothing on the hot path.
    """

    def __init__(self, q: ActQuantizer):
        self.name = q.name
        self.dynamic = q.mode == "dynamic"
        self.qtype, self.symmetric = q.qtype, q.symmetric
        qmin, qmax = P.int_range(q.qtype, q.symmetric)
        # a signed grid [-(2^(b-1) - 1), 2^(b-1) - 1] is held in uint8 as q + 2^(b-1): codes in [1, 2^b - 1]
        self.shift = 2 ** (q.qtype.bits - 1) if q.symmetric else 0
        self.grid = (qmin + self.shift, qmax + self.shift)
        self.full_range = self.grid == (0, 255)
        if self.dynamic:
            return
        self.scales = [float(s) for s in q.scale.tolist()]
        self.zero_points = [round(z) + self.shift for z in q.zero_point.tolist()]
        self.bucket_of_t = q.bucket_of_t.tolist() if len(self.scales) > 1 else None

    def params(self, x: torch.Tensor) -> tuple[float, int]:
        """``(scale, zero point)`` of ``x`` at the current step (computed from ``x`` when dynamic)."""
        if self.dynamic:
            lo, hi = torch.aminmax(x.detach())
            scale, zp = P.scale_from_range(lo, hi, self.qtype, self.symmetric)
            return float(scale), int(zp) + self.shift
        if self.bucket_of_t is None:
            return self.scales[0], self.zero_points[0]
        b = self.bucket_of_t[require_step(self.name).timestep]
        return self.scales[b], self.zero_points[b]

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        """uint8 codes of ``x`` with their scale and zero point."""
        scale, zp = self.params(x)
        if not self.full_range:  # clamp to the format's own grid inside [0, 255]
            x = x.clamp((self.grid[0] - zp) * scale, (self.grid[1] - zp) * scale)
        # int_repr copies the codes out as plain uint8 (a view of the quint8 tensor misleads oneDNN)
        q = torch.quantize_per_tensor(x.float(), scale, zp, torch.quint8).int_repr()
        return q, scale, zp


@dataclass
class _Kernel:
    """One lowered layer: prepacked int8 weights per input part, their activation codes, the op."""

    kind: str  # "conv" or "linear"
    parts: list[tuple[_ActCodes, torch.Tensor, slice]]  # (codes, packed weight, input channels)
    weight_scale: torch.Tensor
    weight_zp: torch.Tensor
    bias: torch.Tensor | None
    out_features: int
    smooth: torch.Tensor | None = None
    conv: dict = field(default_factory=dict)  # stride, padding, dilation, groups

    def out_shape(self, x: torch.Tensor) -> list[int]:
        if self.kind == "linear":
            return [*x.shape[:-1], self.out_features]
        n, _, h, w = x.shape
        c = self.conv
        oh = (h + 2 * c["padding"][0] - c["dilation"][0] * (c["kernel_size"][0] - 1) - 1) // c["stride"][0] + 1
        ow = (w + 2 * c["padding"][1] - c["dilation"][1] * (c["kernel_size"][1] - 1) - 1) // c["stride"][1] + 1
        return [n, self.out_features, oh, ow]

    def run(self, x: torch.Tensor) -> torch.Tensor:
        dim = 1 if self.kind == "conv" else -1
        if self.smooth is not None:
            x = x / (self.smooth.view(-1, 1, 1) if self.kind == "conv" else self.smooth)
        y = None
        for i, (codes, packed, channels) in enumerate(self.parts):
            part = x if len(self.parts) == 1 else x.narrow(dim, channels.start, channels.stop - channels.start)
            bias = self.bias if i == 0 else None
            out = self._one(part, codes, packed, bias)
            y = out if y is None else y + out
        if self.kind == "conv":  # oneDNN writes NHWC; say so always (the compiled graph's contract)
            y = y.contiguous(memory_format=torch.channels_last)
        return y

    def _one(self, x, codes: _ActCodes, packed, bias):
        if self.kind == "conv":
            qx, scale, zp = codes.quantize(x)
            c = self.conv
            return torch.ops.onednn.qconv2d_pointwise(
                qx, scale, zp, packed, self.weight_scale, self.weight_zp, bias, c["stride"], c["padding"],
                c["dilation"], c["groups"], 1.0, 0, torch.float32, "none", [], "",
            )  # fmt: skip
        lead = x.shape[:-1]
        qx, scale, zp = codes.quantize(x.reshape(-1, x.shape[-1]))
        y = torch.ops.onednn.qlinear_pointwise(
            qx, scale, zp, packed, self.weight_scale, self.weight_zp, bias, 1.0, 0, torch.float32, "none", [], ""
        )
        return y.reshape(*lead, self.out_features)


@torch.library.custom_op("diffquant::int8_layer", mutates_args=())
def int8_layer(x: torch.Tensor, handle: int) -> torch.Tensor:
    """Run lowered layer ``handle`` on ``x`` (one opaque node under ``torch.compile``)."""
    return _LAYERS[handle].run(x)


@int8_layer.register_fake
def _(x: torch.Tensor, handle: int) -> torch.Tensor:
    kernel = _LAYERS[handle]
    if kernel.kind == "conv":
        return x.new_empty(kernel.out_shape(x)).contiguous(memory_format=torch.channels_last)
    return x.new_empty(kernel.out_shape(x))


class _Int8Layer(nn.Module):
    """Base of the lowered layers: holds its kernel and calls ``diffquant::int8_layer``."""

    def __init__(self, kernel: _Kernel, source: str):
        super().__init__()
        self.kernel = kernel
        self.handle = next(HANDLES)
        _LAYERS[self.handle] = kernel
        self.source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.diffquant.int8_layer(x, self.handle)

    def extra_repr(self) -> str:
        return f"{self.source}, handle={self.handle}"


class Int8Conv2d(_Int8Layer):
    """A frozen :class:`QuantConv2d` on oneDNN's int8 convolution."""


class Int8Linear(_Int8Layer):
    """A frozen :class:`QuantLinear` on oneDNN's int8 matmul."""


def vnni() -> bool:
    """Whether this CPU has an int8 dot-product instruction (AVX512-VNNI, AVX-VNNI or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def saturation_free(act_bits: int, weight_qmax: int) -> bool:
    """Whether u8 x s8 products summed in pairs fit int16, as AVX2 kernels without VNNI need.

    Without VNNI, oneDNN multiplies with ``vpmaddubsw``, which adds two u8 x s8 products into a
    saturating int16: exact only when ``2 * max_code * max|w| <= 32767``. Measured: 8-bit activations
    with a zero point near 128 lose 15-60 dB of SQNR per layer on this path; 7-bit activations (or
    weights of 6 bits or fewer) cannot saturate. PyTorch's x86 recipes use ``reduce_range`` for
    the same reason.
    """
    return 2 * (2**act_bits - 1) * weight_qmax <= 32767


def _why_not(m: QuantModule, exact: bool) -> str | None:
    """Why ``m`` cannot run on the int8 kernels, or ``None`` when it can."""
    why = integer_obstacle(m, "oneDNN on CPU")
    if why is None and exact:
        for q in (m.input_quantizer, m.input_quantizer_2):
            if q is not None and not saturation_free(q.qtype.bits, _weight_qmax(m)):
                return (
                    f"{q.qtype} activations x {m.weight_qtype} weights can saturate the int8 kernels of a CPU "
                    "without VNNI (use 7-bit activations, e.g. recipe w8a7, or lower(exact=False))"
                )
    return why


def _weight_qmax(m: QuantModule) -> int:
    return 1 if m.weight_qtype.kind in ("ternary", "binary") else m.weight_qtype.qmax


def _kernel(m: QuantModule) -> _Kernel:
    w = m.integer_weight()
    w_scale = m.weight_scale.reshape(-1).float().contiguous()
    w_zp = torch.zeros(w.shape[0], dtype=torch.long)
    bias = None if m.bias is None else m.bias.detach().float().contiguous()
    quantizers = [m.input_quantizer] + ([m.input_quantizer_2] if m.input_split else [])
    cin = w.shape[1]
    bounds = [0, m.input_split, cin] if m.input_split else [0, cin]
    parts = []
    for q, lo, hi in zip(quantizers, bounds[:-1], bounds[1:], strict=True):
        codes = _ActCodes(q)
        wp = w[:, lo:hi].contiguous()
        x_scale = codes.scales[0] if not codes.dynamic else 1.0
        x_zp = codes.zero_points[0] if not codes.dynamic else 0
        if isinstance(m, QuantConv2d):
            packed = torch.ops.onednn.qconv_prepack(
                wp, w_scale, x_scale, x_zp, list(m.stride), list(m.padding), list(m.dilation), m.groups, None
            )
        else:
            packed = torch.ops.onednn.qlinear_prepack(wp, None)
        parts.append((codes, packed, slice(lo, hi)))
    smooth = None if m.smooth is None else m.smooth.detach().float().clone()
    if isinstance(m, QuantConv2d):
        conv = dict(
            stride=list(m.stride), padding=list(m.padding), dilation=list(m.dilation), groups=m.groups,
            kernel_size=list(m.kernel_size),
        )  # fmt: skip
        return _Kernel("conv", parts, w_scale, w_zp, bias, m.out_channels, smooth, conv)
    return _Kernel("linear", parts, w_scale, w_zp, bias, m.out_features, smooth)


@torch.no_grad()
def lower(model: nn.Module, exact: bool | None = None) -> tuple[nn.Module, LoweringReport]:
    """Swap the model's quantized layers for int8-kernel layers (in place) where that is exact.

    Args:
        model: a quantized model (from :func:`diffquant.quantize` or :func:`diffquant.load_quantized`).
        exact: keep layers whose integer products could saturate (see :func:`saturation_free`) on
            the reference path. Default: on CPUs without VNNI, where that saturation happens.

    Returns:
        ``(model, report)``: the same model object, and which layers were lowered.

    Raises:
        LoweringError: when the model has no frozen quantized layer, or oneDNN is unavailable.
    """
    if not available():
        raise LoweringError("this PyTorch build has no oneDNN int8 kernels; use the reference backend")
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModule)]
    if not targets:
        raise LoweringError("the model has no quantized layers: quantize it first (diffquant.quantize)")
    exact = not vnni() if exact is None else exact
    report = LoweringReport(kernels="int8 kernels")
    for name, m in targets:
        why = _why_not(m, exact)
        if why is not None:
            m.quantized_weight()  # dequantize once now, so a compiled graph finds the cached weight
            report.kept[name] = why
            continue
        cls = Int8Conv2d if isinstance(m, QuantConv2d) else Int8Linear
        assert isinstance(m, (QuantConv2d, QuantLinear))
        model.set_submodule(name, cls(_kernel(m), m.extra_repr()))
        report.lowered.append(name)
    for name, q in [(n, q) for n, q in model.named_modules() if isinstance(q, ActQuantizer)]:
        if q.scale.numel() > 1 and q.mode != "dynamic":  # attention operands, inputs of kept layers
            model.set_submodule(name, StepQuantizer(q))
            report.step_quantizers.append(name)
    return model, report
