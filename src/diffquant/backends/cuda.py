"""NVIDIA GPU execution: int8 GEMMs through ``torch._int_mm``, FP8 E4M3 GEMMs through ``torch._scaled_mm``.

:func:`lower` swaps every frozen :class:`~diffquant.nn.QuantLinear` / :class:`~diffquant.nn.QuantConv2d`
that these GEMMs can run exactly for a :class:`GemmLinear` / :class:`GemmConv2d`:

* **int8**: integer weight codes of 8 bits or fewer with one scale per output channel (int8, int4
  unpacked, ternary, binary), and integer input activations with one scale per tensor (``static``,
  ``bucketed``, ``tdq`` table, ``dynamic``) or, for Linear layers, one per token (``dynamic``).
  An unsigned 8-bit activation code ``q`` in ``[0, 255]`` enters the GEMM as ``q - 128`` (int8);
  the shift and the zero point ``z`` come out afterwards through the weight's column sums::

      y = s_x * s_w * (int_mm(q - 128, W) - (z - 128) * colsum(W)) + bias

  which is the reference's integer sum ``sum_k (q_k - z) w_k`` exactly (int32 accumulation).
* **FP8 E4M3**: ``fp8_e4m3`` weights (per channel) and activations (per tensor, any mode but
  per-token): ``y = _scaled_mm(x8, W8, s_x, 1) * s_w + bias`` with float32 output.
* Convolutions run as a GEMM over ``unfold``-ed input codes (im2col); the zero padding of the
  convolution becomes the zero point, so padded positions are exact too.

The per-step scale of a ``bucketed`` / ``tdq`` quantizer comes from its ``(T, 2)`` table indexed by
the current step as a tensor (:func:`~diffquant.timestep.step_tensor`, shared with the CPU
backend), so under ``torch.compile`` one graph serves every
step and the quantize step fuses into the op that produces the activation.

Everything here also runs on the CPU (``_int_mm`` and ``_scaled_mm`` have slow CPU kernels), which
is how the test suite checks the numerics against the reference path on machines without a GPU;
the speed only means something on a GPU (``torch.cuda.is_available()``). Shapes are padded to
the kernels' alignment (``_int_mm``: more than 16 rows, K and N multiples of 8; FP8: K and N
multiples of 16) with zeros, which changes no sum.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from diffquant import primitives as P
from diffquant.backends.common import (
    ActParams,
    LoweringError,
    LoweringReport,
    StepQuantizer,
    integer_obstacle,
)
from diffquant.nn.modules import QuantConv2d, QuantLinear, QuantModule
from diffquant.nn.quantizer import ActQuantizer

__all__ = ["GemmConv2d", "GemmLinear", "LoweringError", "LoweringReport", "lower"]


def _fp8(m: QuantModule) -> bool:
    return m.frozen and m.weight_qtype is not None and m.weight_qtype.kind == "float"


def why_not(m: QuantModule) -> str | None:
    """Why ``m`` cannot run on this backend's GEMMs, or ``None`` when it can."""
    return integer_obstacle(m, "the CUDA GEMMs", per_token=isinstance(m, QuantLinear), fp8=True)


class _Input(ActParams):
    """One input part of a lowered layer: its activation quantizer's parameters and its weight columns."""

    def __init__(self, q: ActQuantizer, w: torch.Tensor, colsum: torch.Tensor | None):
        super().__init__(q)
        self.fp8 = q.qtype.kind == "float"
        if not self.fp8:
            self.qmin, self.qmax = P.int_range(q.qtype, q.symmetric)
            self.shift = 128 if self.qmax > 127 else 0  # unsigned 8-bit codes enter the GEMM as q - 128
        self.register_buffer("weight", w)  # (N_padded, K_padded): int8 codes or float8_e4m3fn
        self.register_buffer("colsum", colsum)  # (N_padded,) float32 column sums of the int8 codes
        self.register_buffer("one", torch.ones(()) if self.fp8 else None)  # _scaled_mm's weight scale


def _pad(t: torch.Tensor, dim: int, multiple: int, minimum: int = 0) -> torch.Tensor:
    size = t.shape[dim]
    target = max(-(-size // multiple) * multiple, minimum)
    if target == size:
        return t
    pad = [0, 0] * (t.ndim - 1 - (dim % t.ndim)) + [0, target - size]
    return F.pad(t, pad)


def _quantize(part: _Input, x: torch.Tensor, scale, zp) -> torch.Tensor:
    """The part's codes of ``x`` as float: integer codes on the grid, or E4M3 values (as the reference rounds)."""
    if part.fp8:
        return torch.clamp(x / scale, -448.0, 448.0).to(torch.float8_e4m3fn).to(torch.float32)
    return P.quantize_int(x, scale, zp, part.qmin, part.qmax)


def _gemm(part: _Input, codes: torch.Tensor, scale, zp) -> torch.Tensor:
    """Codes ``(M, K)`` (from :func:`_quantize`) times the part's weight: float32 ``(M, N_padded)``, before weight scales."""
    if part.fp8:
        x8 = _pad(codes.to(torch.float8_e4m3fn).view(torch.uint8), 1, 16).view(torch.float8_e4m3fn)  # F.pad has no fp8
        s = torch.as_tensor(scale, dtype=torch.float32, device=codes.device)
        return torch._scaled_mm(x8, part.weight.t(), scale_a=s, scale_b=part.one, out_dtype=torch.float32)
    q = _pad(_pad((codes - part.shift).to(torch.int8), 1, 8), 0, 1, minimum=17)
    acc = torch._int_mm(q, part.weight.t())[: codes.shape[0]]
    return (acc.to(torch.float32) - (zp - part.shift) * part.colsum) * scale


class _GemmLayer(nn.Module):
    """Base of the lowered layers: input parts (one, or two for a shortcut split), weight scales, bias."""

    def __init__(self, m: QuantModule, source: str):
        super().__init__()
        self.source = source
        # (out, in) or (out, in, kh, kw): the input-channel dim stays whole for the shortcut split
        w = m.qweight.reshape(m.weight_shape.tolist()) if _fp8(m) else m.integer_weight()
        self.out_features = w.shape[0]
        quantizers = [m.input_quantizer] + ([m.input_quantizer_2] if m.input_split else [])
        cin = w.shape[1]
        bounds = [0, m.input_split, cin] if m.input_split else [0, cin]
        self.splits = list(itertools.pairwise(bounds))
        parts = []
        for q, (lo, hi) in zip(quantizers, self.splits, strict=True):
            wp = w[:, lo:hi].reshape(w.shape[0], -1)
            if _fp8(m):
                wp = _pad(_pad(wp.view(torch.uint8), 1, 16), 0, 16).view(torch.float8_e4m3fn).contiguous()
                parts.append(_Input(q, wp, None))
            else:
                wp = _pad(_pad(wp, 1, 8), 0, 8).contiguous()
                parts.append(_Input(q, wp, wp.to(torch.float32).sum(1)))
        self.parts = nn.ModuleList(parts)
        self.register_buffer("weight_scale", m.weight_scale.reshape(-1).float().clone())
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().float().clone())
        self.register_buffer("smooth", None if m.smooth is None else m.smooth.detach().float().clone())

    def _finish(self, acc: torch.Tensor) -> torch.Tensor:
        y = acc[:, : self.out_features] * self.weight_scale
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        kind = "fp8 _scaled_mm" if self.parts[0].fp8 else "int8 _int_mm"
        return f"{self.source}, {kind}"


class GemmLinear(_GemmLayer):
    """A frozen :class:`QuantLinear` on ``torch._int_mm`` / ``torch._scaled_mm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).float()
        if self.smooth is not None:
            x2 = x2 / self.smooth
        acc = 0
        for part, (lo, hi) in zip(self.parts, self.splits, strict=True):
            xp = x2[:, lo:hi]
            scale, zp = part.params(xp)
            acc = acc + _gemm(part, _quantize(part, xp, scale, zp), scale, zp)
        return self._finish(acc).reshape(*lead, self.out_features).to(x.dtype)


class GemmConv2d(_GemmLayer):
    """A frozen :class:`QuantConv2d` as a GEMM over unfolded input (im2col)."""

    def __init__(self, m: QuantConv2d, source: str):
        super().__init__(m, source)
        self.conv = dict(kernel_size=m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        c = self.conv
        oh = (h + 2 * c["padding"][0] - c["dilation"][0] * (c["kernel_size"][0] - 1) - 1) // c["stride"][0] + 1
        ow = (w + 2 * c["padding"][1] - c["dilation"][1] * (c["kernel_size"][1] - 1) - 1) // c["stride"][1] + 1
        x = x.float()
        if self.smooth is not None:
            x = x / self.smooth.view(-1, 1, 1)
        acc = 0
        for part, (lo, hi) in zip(self.parts, self.splits, strict=True):
            acc = acc + self._part(part, x[:, lo:hi])
        y = self._finish(acc)  # (n * oh * ow, out)
        return y.reshape(n, oh * ow, -1).transpose(1, 2).reshape(n, -1, oh, ow)

    def _part(self, part: _Input, x: torch.Tensor) -> torch.Tensor:
        # quantize the image once, then unfold the codes. The convolution's zero padding must mean the
        # value 0, i.e. the zero point: unfold the codes centred on it and add it back (fp8: 0 is 0)
        scale, zp = part.params(x)
        codes = _quantize(part, x, scale, zp)
        centre = 0.0 if part.fp8 else zp
        cols = F.unfold(codes - centre, **self.conv).transpose(1, 2).reshape(-1, x.shape[1] * _taps(self.conv))
        return _gemm(part, cols + centre, scale, zp)


def _taps(conv: dict) -> int:
    return conv["kernel_size"][0] * conv["kernel_size"][1]


@torch.no_grad()
def lower(model: nn.Module) -> tuple[nn.Module, LoweringReport]:
    """Swap the model's quantized layers for GEMM layers (in place), on the device the model is on.

    Returns:
        ``(model, report)``: the same model object, and which layers were lowered.

    Raises:
        LoweringError: when the model has no frozen quantized layer.
    """
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModule)]
    if not targets:
        raise LoweringError("the model has no quantized layers: quantize it first (diffquant.quantize)")
    report = LoweringReport(kernels="int8/fp8 GEMMs")
    for name, m in targets:
        why = why_not(m)
        if why is not None:
            m.quantized_weight()
            report.kept[name] = why
            continue
        assert isinstance(m, (QuantConv2d, QuantLinear))
        cls = GemmConv2d if isinstance(m, QuantConv2d) else GemmLinear
        model.set_submodule(name, cls(m, m.extra_repr()).to(m.weight_scale.device))
        report.lowered.append(name)
    for name, q in [(n, q) for n, q in model.named_modules() if isinstance(q, ActQuantizer)]:
        if q.scale.numel() > 1 and q.mode != "dynamic":
            model.set_submodule(name, StepQuantizer(q))
            report.step_quantizers.append(name)
    return model, report
