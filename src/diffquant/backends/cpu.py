"""CPU integer execution: oneDNN u8 x s8 kernels with per-step activation scales.

:func:`lower` swaps every frozen :class:`~diffquant.nn.QuantConv2d` / :class:`~diffquant.nn.QuantLinear`
that integer kernels can run exactly for an :class:`Int8Conv2d` / :class:`Int8Linear`:

* weights: integer codes of 8 bits or fewer (``int2``..``int8``, ternary, binary) with one scale per
  output channel, unpacked once into oneDNN's prepacked int8 layout (packed int4 storage stays
  packed on disk; the kernel reads int8);
* input activations: an integer grid of 8 bits or fewer with one scale per tensor: ``static``,
  ``bucketed``, ``tdq`` (the frozen per-step table) or ``dynamic`` per tensor; or ``dynamic`` per
  token (one scale and zero point per row of a Linear input, per pixel of a convolution's). The codes
  are held in ``uint8``; grids narrower than ``[0, 255]`` (fewer bits, symmetric) are clamped to their
  own range first, so the integers are exactly the fake-quant reference's integers. ``dynamic`` per
  group (one scale per token and per group of channels, for 4-bit activations) has no kernel of its
  own: the input is fake-quantized per group as the reference does, and those values are coded per
  token in 8 bits (7 without VNNI where 8 could saturate), which keeps the per-group accuracy at the
  speed of the per-token path; the images stay within a few dB of the 8-bit-per-token error of the
  reference path (``tests/backends/test_cpu.py``).

Per-token scales vary along the GEMM's rows, so they come out of the integer sum: the kernel runs
on the codes with scale 1 and zero point 0, and ``y = s_t * (acc - z_t * colsum(W)) + b`` per row. A
convolution's output pixel sums input pixels of different scales, so a per-token convolution runs as
one 1x1 int8 convolution per kernel tap (each on the shifted, strided input codes), every tap's
result scaled by its own input pixels' scales: exact, ``kh * kw`` kernel calls instead of one.

Each layer quantizes its input to uint8 codes with the ``[scale, zero point]`` of
:class:`~diffquant.backends.common.ActParams` (a buffer, the row of a per-step table at the current
step, or the input's own range) and runs ``onednn::qconv2d_pointwise`` /
``onednn::qlinear_pointwise`` (float32 output, bias added) once per input part. Compiled, the quantize
step is plain element-wise ops (``round(x / s) + z``, clamped, as uint8) and each GEMM one opaque
operator, ``diffquant::int8_gemm``: one graph serves every step, and Inductor fuses the quantize step
into the op that produces the activation (a LayerNorm, an activation function, a residual add),
which then writes uint8 codes instead of float, so the quantize step costs no pass of its own
(``benchmarks/results/fused_quantize_*.md``). Eager, one ``quantize_per_tensor`` call quantizes and
the kernel is called directly.

Compiled with Inductor's freezing on (what ``diffquant.bench.compile_forward`` does), a layer whose codes
fill ``[0, 255]`` (8-bit asymmetric activations with any per-tensor scale: static, per step, dynamic;
convolutions with a tensor scale through rescaled codes, :meth:`_Int8Layer._pattern_conv`) traces
PT2E's ``quantize -> dequantize -> GEMM`` pattern instead of the opaque op:
Inductor's x86 int8 passes replace it by oneDNN GEMMs on weights they prepack, fuse the op after a GEMM
into it (a GELU, a residual add) and the next layer's quantize step into its output, so int8 stays
between layers there. The integers are the same (a test compares with the eager path); fashion-dit
``w8a8`` compiled ran 1.26-1.30x faster than with the opaque op (``benchmarks/probes/pattern_gemm_ab.py``).

Attention the recipe left float (``attention=False``) runs as float32 scaled-dot-product attention,
or, with ``lower(model, attention="bfloat16")``, as bfloat16 SDPA (:class:`Bf16Attention`: AMX tiles
where the CPU has them; SD-1.5-shaped UNet ``w8a8-tdq`` compiled 1181 -> 755 ms on an AMX Xeon).

Layers the kernels cannot run exactly keep their float reference path and are listed, with the
reason, in the :class:`LoweringReport`: per-group weights, FP8, float weights (weight-only recipes),
learnable TDQ generators.

On the reference machine (AMD EPYC Zen 2, AVX2 without VNNI) oneDNN's int8 convolutions run at the
speed of its fp32 ones (``benchmarks/cpu_kernels.md``): integer arithmetic there saves memory, not time.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

try:  # registers torch.ops.quantized_decomposed, the pattern Inductor's x86 int8 passes match
    import torch.ao.quantization.fx._decomposed

    _QUANTIZED_DECOMPOSED = True
except ImportError:  # a PyTorch without it: compiled layers call the opaque GEMM op
    _QUANTIZED_DECOMPOSED = False

from diffquant import primitives as P
from diffquant.backends.common import (
    HANDLES,
    ActParams,
    LoweringError,
    LoweringReport,
    StepQuantizer,
    integer_obstacle,
)
from diffquant.nn.attention import QuantAttentionMatmuls
from diffquant.nn.modules import QuantConv2d, QuantLinear, QuantModule
from diffquant.nn.quantizer import ActQuantizer
from diffquant.qtypes import get_qtype

__all__ = ["Bf16Attention", "Int8Conv2d", "Int8Linear", "LoweringError", "LoweringReport", "StepQuantizer", "lower"]

# torch.quantize_per_tensor (the eager quantize step) warns that quantized dtypes are deprecated: it
# only computes uint8 codes here, read out with int_repr
warnings.filterwarnings("ignore", message=r"torch.quantize_per_tensor.*deprecated", category=UserWarning)

_LAYERS: weakref.WeakValueDictionary[int, _Kernel] = weakref.WeakValueDictionary()


def available() -> bool:
    """Whether this PyTorch build has the oneDNN int8 operators the CPU backend needs."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")


class _Input(ActParams):
    """One input part of a lowered layer: its quantizer's parameters and the uint8 grid of its codes.

    Per-group scales (``granularity="group"``) have no kernel: the input is fake-quantized per group
    first (the reference's values), and those values are then coded per token on a finer grid of
    ``code_bits`` (asymmetric), which the per-token kernel runs.
    """

    def __init__(self, q: ActQuantizer, code_bits: int = 8):
        super().__init__(q)
        self.group = None
        if q.granularity == "group":
            self.group = (q.qtype, q.symmetric, q.group_size)
            self.qtype, self.symmetric, self.granularity = get_qtype(f"int{code_bits}"), False, "token"
            q = self
        qmin, qmax = P.int_range(q.qtype, q.symmetric)
        # a signed grid [-(2^(b-1) - 1), 2^(b-1) - 1] is held in uint8 as q + 2^(b-1): codes in [1, 2^b - 1]
        self.shift = 2 ** (q.qtype.bits - 1) if q.symmetric else 0
        self.grid = (qmin + self.shift, qmax + self.shift)
        self.per_token = q.mode == "dynamic" and q.granularity == "token"

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` fake-quantized per group (per-group inputs), else ``x``."""
        if self.group is None:
            return x
        qtype, symmetric, size = self.group
        return P.dynamic_fake_quant(x, qtype, "group", symmetric, self.channel_dim, size)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compiled: uint8 codes of ``x`` (the reference's integers, shifted onto ``[0, 255]``), scale, zero point.

        Plain element-wise ops with the reference's own rounding, which Inductor fuses into the op
        producing ``x``, so the activation is written once, as uint8.
        """
        x = self.grouped(x)
        scale, zp = self.params(x)
        zp = zp + self.shift
        return P.quantize_int(x, scale, zp, *self.grid).to(torch.uint8), scale, zp

    def quantize_eager(self, x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        """Eager: the same codes from one vectorised ``quantize_per_tensor`` (unfused, the element-wise
        chain of :meth:`quantize` is five passes over ``x`` and made an eager forward slower); it may
        round an exact tie the other way than the reference."""
        s, zp = self.params_eager(x)
        z = round(zp) + self.shift
        if self.grid != (0, 255):  # clamp to the format's own grid inside [0, 255]
            x = x.clamp((self.grid[0] - z) * s, (self.grid[1] - z) * s)
        return torch.quantize_per_tensor(x, s, z, torch.quint8).int_repr(), s, z


@dataclass
class _Kernel:
    """One lowered layer's oneDNN side: prepacked int8 weights per input part and the op's arguments."""

    kind: str  # "conv" or "linear"
    parts: list[tuple[torch.Tensor, slice]]  # (packed weight, input channels)
    weight_scale: torch.Tensor
    weight_zp: torch.Tensor
    bias: torch.Tensor | None
    out_features: int
    conv: dict = field(default_factory=dict)  # stride, padding, dilation, groups
    # per part with per-token scales: (i, j, packed weight, w_scale * sum_c W[o, c, i, j]) per kernel tap
    # (a convolution's 1x1 kernels; one entry, the part's packed Linear weight, for a Linear); [] otherwise
    taps: list[list[tuple[int, int, torch.Tensor, torch.Tensor]]] = field(default_factory=list)

    def out_shape(self, codes: torch.Tensor) -> list[int]:
        if self.kind == "linear":
            return [codes.shape[0], self.out_features]
        n, _, h, w = codes.shape
        c = self.conv
        oh = (h + 2 * c["padding"][0] - c["dilation"][0] * (c["kernel_size"][0] - 1) - 1) // c["stride"][0] + 1
        ow = (w + 2 * c["padding"][1] - c["dilation"][1] * (c["kernel_size"][1] - 1) - 1) // c["stride"][1] + 1
        return [n, self.out_features, oh, ow]

    def gemm(self, codes: torch.Tensor, scale: float, zp: int, part: int) -> torch.Tensor:
        """Part ``part``'s codes through oneDNN: float32, the bias added with part 0 (NHWC for convolutions)."""
        packed = self.parts[part][0]
        bias = self.bias if part == 0 else None
        if self.kind == "linear":
            return torch.ops.onednn.qlinear_pointwise(
                codes, scale, zp, packed, self.weight_scale, self.weight_zp, bias, 1.0, 0, torch.float32,
                "none", [], "",
            )  # fmt: skip
        c = self.conv
        y = torch.ops.onednn.qconv2d_pointwise(
            codes, scale, zp, packed, self.weight_scale, self.weight_zp, bias, c["stride"], c["padding"],
            c["dilation"], c["groups"], 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        return y.contiguous(memory_format=torch.channels_last)  # oneDNN writes NHWC: say so always

    def gemm_tokens(self, codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, part: int) -> torch.Tensor:
        """Part ``part``'s codes with one ``scale, zp`` per token (row / pixel), through oneDNN with scale
        1 and zero point 0, the scales applied to the integer sums (see the module docstring)."""
        taps = self.taps[part]
        if self.kind == "linear":
            ((_, _, packed, colsum),) = taps
            acc = torch.ops.onednn.qlinear_pointwise(
                codes, 1.0, 0, packed, self.weight_scale, self.weight_zp, None, 1.0, 0, torch.float32, "none", [], "",
            )  # fmt: skip
            y = scale * (acc - zp * colsum)
        else:
            c = self.conv
            (ph, pw), (sh, sw), (dh, dw) = c["padding"], c["stride"], c["dilation"]
            _, _, oh, ow = self.out_shape(codes)
            pad = (pw, pw, ph, ph)  # padded pixels: scale 0, so they add nothing
            codes, scale, zp = F.pad(codes, pad), F.pad(scale, pad), F.pad(zp, pad)
            y = None
            for i, j, packed, colsum in taps:
                rows = slice(i * dh, i * dh + sh * (oh - 1) + 1, sh)
                cols = slice(j * dw, j * dw + sw * (ow - 1) + 1, sw)
                acc = torch.ops.onednn.qconv2d_pointwise(
                    codes[:, :, rows, cols].contiguous(), 1.0, 0, packed, self.weight_scale, self.weight_zp,
                    None, [1, 1], [0, 0], [1, 1], 1, 1.0, 0, torch.float32, "none", [], "",
                )  # fmt: skip
                tap = scale[:, :, rows, cols] * (acc - zp[:, :, rows, cols] * colsum)
                y = tap if y is None else y + tap
            y = y.contiguous(memory_format=torch.channels_last)
        if part == 0 and self.bias is not None:
            y = y + (self.bias if self.kind == "linear" else self.bias.view(1, -1, 1, 1))
        return y


@torch.library.custom_op("diffquant::int8_gemm_tokens", mutates_args=())
def int8_gemm_tokens(
    codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, handle: int, part: int
) -> torch.Tensor:
    """uint8 ``codes`` with one ``scale``, ``zp`` per token through lowered layer ``handle``'s kernel."""
    return _LAYERS[handle].gemm_tokens(codes, scale, zp, part)


@int8_gemm_tokens.register_fake
def _(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, handle: int, part: int) -> torch.Tensor:
    kernel = _LAYERS[handle]
    out = codes.new_empty(kernel.out_shape(codes), dtype=torch.float32)
    return out.contiguous(memory_format=torch.channels_last) if kernel.kind == "conv" else out


@torch.library.custom_op("diffquant::int8_gemm", mutates_args=())
def int8_gemm(codes: torch.Tensor, qparams: torch.Tensor, handle: int, part: int) -> torch.Tensor:
    """uint8 ``codes`` with ``qparams = [scale, zero point]`` through lowered layer ``handle``'s oneDNN kernel."""
    scale, zp = qparams.tolist()
    return _LAYERS[handle].gemm(codes, scale, round(zp), part)


@int8_gemm.register_fake
def _(codes: torch.Tensor, qparams: torch.Tensor, handle: int, part: int) -> torch.Tensor:
    kernel = _LAYERS[handle]
    out = codes.new_empty(kernel.out_shape(codes), dtype=torch.float32)
    return out.contiguous(memory_format=torch.channels_last) if kernel.kind == "conv" else out


class _Int8Layer(nn.Module):
    """Base of the lowered layers: the quantize step in the graph, the integer GEMM one opaque op per part."""

    def __init__(
        self,
        kernel: _Kernel,
        inputs: list[_Input],
        smooth: torch.Tensor | None,
        source: str,
        weights: list[torch.Tensor | None] | None = None,
    ):
        super().__init__()
        self.kernel = kernel
        self.inputs = nn.ModuleList(inputs)
        self.register_buffer("smooth", smooth)
        self.handle = next(HANDLES)
        _LAYERS[self.handle] = kernel
        self.source = source
        # The codes must fill [0, 255]: where Inductor fuses the next layer's quantize step into a GEMM's
        # output it saturates at 0 and 255 and drops a narrower grid's clamp (w8a7's [0, 127]: a random
        # DiT at 43 dB against the eager path, 136 dB with the op). Convolutions with a tensor scale go
        # through _pattern_conv (Inductor matches convolutions only with constant scales)
        self.pattern = (
            weights is not None and all(w is not None for w in weights) and all(inp.grid == (0, 255) for inp in inputs)
        )
        # the pattern's int8 weights (beside the prepacked ones eager calls use), only where it runs;
        # persistent=False: a lowered model is not saved
        for i, w in enumerate(weights if self.pattern else []):
            self.register_buffer(f"wq{i}", w, persistent=False)
            if kernel.kind == "conv" and inputs[i].static_numbers is None:  # sum of W per output channel
                wsum = (w.float().sum((1, 2, 3)) * kernel.weight_scale).view(1, -1, 1, 1)
                self.register_buffer(f"wsum{i}", wsum, persistent=False)
        self.register_buffer("w_zp", kernel.weight_zp if self.pattern else None, persistent=False)

    def _pattern_weight(self, i: int) -> torch.Tensor:
        """Part ``i``'s int8 weights dequantized per channel, as PT2E's pattern has them (Inductor folds it)."""
        qd = torch.ops.quantized_decomposed
        return qd.dequantize_per_channel(
            getattr(self, f"wq{i}"), self.kernel.weight_scale, self.w_zp, 0, -128, 127, torch.int8
        )

    def _pattern_gemm(self, part: torch.Tensor, inp: _Input, i: int) -> torch.Tensor:
        """Part ``i`` as PT2E's quantize -> dequantize -> float GEMM pattern, which Inductor's x86 freezing
        passes match and replace by oneDNN's int8 GEMM on weights it prepacks itself, fusing its
        neighbours into the GEMM as post-ops (a GELU, a residual add) or the next layer's quantize step
        into the GEMM's output (int8 between layers); the integers are the ones :meth:`_Input.quantize` gives."""
        qd = torch.ops.quantized_decomposed
        lo, hi = inp.grid  # per-group inputs are per-token codes: never here
        if inp.static_numbers is not None:  # static: Python numbers, PT2E's static pattern (a frozen 0-d
            s, z = inp.static_numbers  # tensor there trips Inductor's qlinear lowering)
            z = round(z) + inp.shift
            codes = qd.quantize_per_tensor.default(part, s, z, lo, hi, torch.uint8)
            x = qd.dequantize_per_tensor.default(codes, s, z, lo, hi, torch.uint8)
        elif self.kernel.kind == "conv":  # per step or dynamic: see _pattern_conv
            return self._pattern_conv(part, inp, i)
        else:  # per step (table row at the step tensor) or dynamic: 0-d tensors
            scale, zp = inp.params(part)
            zp = (zp + inp.shift).round().to(torch.long)
            codes = qd.quantize_per_tensor.tensor(part, scale, zp, lo, hi, torch.uint8)
            x = qd.dequantize_per_tensor.tensor(codes, scale, zp, lo, hi, torch.uint8)
        w = self._pattern_weight(i)
        bias = self.kernel.bias if i == 0 else None
        if self.kernel.kind == "linear":
            return F.linear(x, w, bias)
        c = self.kernel.conv
        return F.conv2d(x, w, bias, c["stride"], c["padding"], c["dilation"], c["groups"])

    def _pattern_conv(self, part: torch.Tensor, inp: _Input, i: int) -> torch.Tensor:
        """Part ``i`` of a convolution whose input scale is a tensor (per step, dynamic) as Inductor's
        static pattern, which it matches for convolutions only with constant scales.

        The codes ``clamp(round(x / s) + z)`` are those of ``x / s + z`` on the grid of scale 1 and zero
        point 0 (``z`` is an integer), and ``conv(codes - z) = conv(codes) - z * sum(W)`` once every tap
        sees an input value: the padding is applied to ``x`` first (a real 0, code ``z``) and the
        convolution runs unpadded. So ``y = s * (conv(codes) - z * sum(W)) + b``: the integer
        convolution on constant scales, its per-step factors applied to its output (fused by Inductor
        into the op after it).
        """
        qd = torch.ops.quantized_decomposed
        c = self.kernel.conv
        lo, hi = inp.grid
        scale, zp = inp.params(part)
        zp = (zp + inp.shift).round()
        ph, pw = c["padding"]
        if ph or pw:
            part = F.pad(part, (pw, pw, ph, ph))
        codes = qd.quantize_per_tensor.default(part * (1.0 / scale) + zp, 1.0, 0, lo, hi, torch.uint8)
        x = qd.dequantize_per_tensor.default(codes, 1.0, 0, lo, hi, torch.uint8)
        w = self._pattern_weight(i)
        y = F.conv2d(x, w, None, c["stride"], 0, c["dilation"], c["groups"])
        y = scale * (y - zp * getattr(self, f"wsum{i}"))
        return y + self.kernel.bias.view(1, -1, 1, 1) if i == 0 and self.kernel.bias is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.kernel.kind == "conv"
        x = x.float()
        if self.smooth is not None:
            x = x / (self.smooth.view(-1, 1, 1) if conv else self.smooth)
        lead = x.shape[:-1]
        # Inductor's own int8 GEMMs, on the input's own shape (a reshape between a GEMM and the op after
        # it keeps Inductor from fusing that op into the GEMM)
        pattern = self.pattern and torch.compiler.is_compiling() and _inductor_freezing()
        if not conv and not pattern:
            x = x.reshape(-1, x.shape[-1])
        dim = 1 if conv else -1
        y = None
        for i, (inp, (_, channels)) in enumerate(zip(self.inputs, self.kernel.parts, strict=True)):
            part = x if len(self.inputs) == 1 else x.narrow(dim, channels.start, channels.stop - channels.start)
            if pattern:
                out = self._pattern_gemm(part, inp, i)
            elif inp.per_token:  # element-wise codes (no per-token quantize_per_tensor), scales per row / pixel
                codes, scale, zp = inp.quantize(part)
                if torch.compiler.is_compiling():
                    out = torch.ops.diffquant.int8_gemm_tokens(codes, scale, zp, self.handle, i)
                else:
                    out = self.kernel.gemm_tokens(codes, scale, zp, i)
            elif torch.compiler.is_compiling():  # one opaque node per GEMM, the quantize step in the graph
                codes, scale, zp = inp.quantize(part)
                qparams = torch.stack([scale, zp])  # float32 already
                out = torch.ops.diffquant.int8_gemm(codes, qparams, self.handle, i)
            else:
                out = self.kernel.gemm(*inp.quantize_eager(part), i)
            y = out if y is None else y + out
        return y if conv or pattern else y.reshape(*lead, self.kernel.out_features)

    def extra_repr(self) -> str:
        return f"{self.source}, handle={self.handle}"


def _inductor_freezing() -> bool:
    """Whether Inductor freezes weights (``diffquant.bench.compile_forward`` turns it on): its int8 passes
    match the quantize / dequantize pattern only then; without, the opaque GEMM op runs."""
    import torch._inductor.config as inductor_config

    return _QUANTIZED_DECOMPOSED and bool(inductor_config.freezing)


class Int8Conv2d(_Int8Layer):
    """A frozen :class:`QuantConv2d` on oneDNN's int8 convolution."""


class Int8Linear(_Int8Layer):
    """A frozen :class:`QuantLinear` on oneDNN's int8 matmul."""


class Bf16Attention(nn.Module):
    """Float attention's two matmuls as one bfloat16 scaled-dot-product attention (oneDNN / AMX tiles on
    CPUs with AMX-BF16, AVX512-BF16 instructions otherwise), its output back in float32.

    Called as ``m(q, k, v, scale, mask)`` with ``(batch, heads, tokens, head_dim)`` operands, as a
    quantized attention's :class:`~diffquant.nn.attention.QuantAttentionMatmuls` is. bfloat16 rounds
    each operand to 8 significant bits: one attention's output about 48 dB from float32's (SD-1.5
    shapes, ``benchmarks/probes/attention_kernels.py``), 2.3-3.6x faster there on an AMX Xeon.
    """

    def forward(self, q, k, v, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
        dtype = torch.bfloat16
        mask = None if mask is None else mask.to(dtype)
        out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask, scale=scale)
        return out.to(q.dtype)


INT8_FLAGS = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8")  # the flags that decide int8 speed (docs/backends.md)


@functools.cache
def _cpuinfo() -> tuple[dict, tuple[str, ...]]:
    """The first core's ``/proc/cpuinfo`` fields and flags, read once (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().split("\n\n", 1)[0].splitlines()
    except OSError:
        lines = []
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return fields, tuple(fields.get("flags", "").split())


def host() -> dict:
    """This CPU as benchmarks record it: ``model`` (its name), ``family`` / ``model_id`` (``/proc/cpuinfo``
    numbers: AMD family 23 is Zen 2, 25 model 1 Zen 3, 25 model 17 Zen 4), ``isa`` (which of
    :data:`INT8_FLAGS` it has) and ``text``, one line of all of it. Where ``/proc/cpuinfo`` is missing,
    what :mod:`platform` says, and no flags."""
    import platform

    fields, flags = _cpuinfo()
    out = {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "family": fields.get("cpu family"),
        "model_id": fields.get("model"),
        "isa": [f for f in INT8_FLAGS if f in flags],
    }
    numbers = f", family {out['family']} model {out['model_id']}" if out["family"] else ""
    out["text"] = f"{out['model']} ({', '.join(out['isa'])}{numbers})"
    return out


def bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
    return any(f in _cpuinfo()[1] for f in ("avx512_bf16", "amx_bf16"))


def vnni() -> bool:
    """Whether this CPU has an int8 dot-product instruction (AVX512-VNNI, AVX-VNNI or AMX)."""
    return any(f in _cpuinfo()[1] for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


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
    why = integer_obstacle(m, "oneDNN on CPU", per_token=True, per_group=True)
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


def _layer(m: QuantModule) -> _Int8Layer:
    w = m.integer_weight()
    w_scale = m.weight_scale.reshape(-1).float().contiguous()
    w_zp = torch.zeros(w.shape[0], dtype=torch.long)
    bias = None if m.bias is None else m.bias.detach().float().contiguous()
    quantizers = [m.input_quantizer] + ([m.input_quantizer_2] if m.input_split else [])
    cin = w.shape[1]
    bounds = [0, m.input_split, cin] if m.input_split else [0, cin]
    parts, inputs, taps, weights = [], [], [], []
    # per-group inputs are coded per token: 8 bits where the kernel cannot saturate, else 7
    code_bits = 8 if vnni() or saturation_free(8, _weight_qmax(m)) else 7
    for q, lo, hi in zip(quantizers, bounds[:-1], bounds[1:], strict=True):
        inputs.append(_Input(q, code_bits))
        wp = w[:, lo:hi].contiguous()
        if inputs[-1].per_token:  # scale 1, zero point 0: the kernel returns the integer sums times w_scale
            if isinstance(m, QuantConv2d):
                kh, kw = m.kernel_size
                taps.append([
                    (i, j, torch.ops.onednn.qconv_prepack(
                        wp[:, :, i : i + 1, j : j + 1].contiguous(), w_scale, 1.0, 0, [1, 1], [0, 0], [1, 1], 1, None
                    ), (w_scale * wp[:, :, i, j].sum(1).float()).view(1, -1, 1, 1))
                    for i in range(kh) for j in range(kw)
                ])  # fmt: skip
                parts.append((None, slice(lo, hi)))
            else:
                packed = torch.ops.onednn.qlinear_prepack(wp, None)
                taps.append([(0, 0, packed, w_scale * wp.sum(1).float())])
                parts.append((packed, slice(lo, hi)))
            weights.append(None)
            continue
        taps.append([])
        weights.append(wp)
        # the activation scale given here only seeds the prepacking; every call passes its own
        static = q.mode != "dynamic"
        x_scale = float(q.scale.reshape(-1)[0]) if static else 1.0
        x_zp = round(float(q.zero_point.reshape(-1)[0])) + inputs[-1].shift if static else 0
        if isinstance(m, QuantConv2d):
            packed = torch.ops.onednn.qconv_prepack(
                wp, w_scale, x_scale, x_zp, list(m.stride), list(m.padding), list(m.dilation), m.groups, None
            )
        else:
            packed = torch.ops.onednn.qlinear_prepack(wp, None)
        parts.append((packed, slice(lo, hi)))
    smooth = None if m.smooth is None else m.smooth.detach().float().clone()
    if isinstance(m, QuantConv2d):
        conv = dict(
            stride=list(m.stride), padding=list(m.padding), dilation=list(m.dilation), groups=m.groups,
            kernel_size=list(m.kernel_size),
        )  # fmt: skip
        kernel = _Kernel("conv", parts, w_scale, w_zp, bias, m.out_channels, conv, taps)
        return Int8Conv2d(kernel, inputs, smooth, m.extra_repr(), weights)
    kernel = _Kernel("linear", parts, w_scale, w_zp, bias, m.out_features, taps=taps)
    return Int8Linear(kernel, inputs, smooth, m.extra_repr(), weights)


@torch.no_grad()
def lower(model: nn.Module, exact: bool | None = None, attention: str = "float32") -> tuple[nn.Module, LoweringReport]:
    """Swap the model's quantized layers for int8-kernel layers (in place) where that is exact.

    Args:
        model: a quantized model (from :func:`diffquant.quantize` or :func:`diffquant.load_quantized`).
        exact: keep layers whose integer products could saturate (see :func:`saturation_free`) on
            the reference path. Default: on CPUs without VNNI, where that saturation happens.
        attention: ``"bfloat16"`` runs the attention the recipe left float (``attention=False``) as
            bfloat16 scaled-dot-product attention (:class:`Bf16Attention`; diffusers attention modules),
            what OpenVINO does by default on CPUs with bf16 instructions; ``"float32"`` (default) keeps it.
            Quantized attention matmuls stay on the reference path either way.

    Returns:
        ``(model, report)``: the same model object, and which layers were lowered.

    Raises:
        LoweringError: when the model has no frozen quantized layer, or oneDNN is unavailable.
    """
    if not available():
        raise LoweringError("this PyTorch build has no oneDNN int8 kernels; use the reference backend")
    if attention not in ("float32", "bfloat16"):
        raise LoweringError(f"attention={attention!r}: choose float32 or bfloat16")
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
        assert isinstance(m, (QuantConv2d, QuantLinear))
        model.set_submodule(name, _layer(m))
        report.lowered.append(name)
    for name, q in [(n, q) for n, q in model.named_modules() if isinstance(q, ActQuantizer)]:
        if q.scale.numel() > 1 and q.mode != "dynamic":  # attention operands, inputs of kept layers
            model.set_submodule(name, StepQuantizer(q))
            report.step_quantizers.append(name)
    if attention == "bfloat16":
        from diffquant.integrations import uses_diffusers

        if uses_diffusers(model):
            from diffquant.integrations.diffusers import set_attention_matmuls

            def float_attention(name):  # quantized attention stays on the reference path
                return not isinstance(getattr(model.get_submodule(name), "quant_matmuls", None), QuantAttentionMatmuls)

            report.attention = set_attention_matmuls(model, lambda name: Bf16Attention(), float_attention)
        report.notes.append(
            f"{len(report.attention)} float attention modules in bfloat16"
            + ("" if bf16() else " (this CPU has no bf16 instructions: expect it slower than float32)")
        )
    return model, report
