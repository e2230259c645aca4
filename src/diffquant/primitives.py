"""Pure quantization math: scales, (fake) quantization, weight formats, int4 packing.

Integer grid (``x`` real, ``s`` scale, ``z`` zero point)::

    q = clamp(round(x / s) + z, qmin, qmax)        x_hat = (q - z) * s

Symmetric grids use ``z = 0`` and ``qmax = 2^(b-1) - 1 = -qmin``; asymmetric (activation) grids use
``qmin = 0, qmax = 2^b - 1`` and ``z = round(-lo / s)``. FP8 E4M3 divides by ``s = amax / 448`` and
rounds by casting to ``torch.float8_e4m3fn``.

All fake-quant functions are differentiable: rounding uses the straight-through estimator, so
the gradient w.r.t. ``x`` is 1 inside the clipping range and 0 outside, and the gradient w.r.t.
``s`` is LSQ's (Esser et al. 2020) — what quantization-aware fine-tuning needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffquant.qtypes import QType

EPS = 1e-12


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def int_range(qtype: QType, symmetric: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of an integer grid: restricted signed for symmetric, unsigned for asymmetric."""
    if not qtype.is_int:
        raise ValueError(f"{qtype} is not an integer format")
    return (qtype.qmin, qtype.qmax) if symmetric else (0, 2**qtype.bits - 1)


def scale_from_range(
    lo: torch.Tensor, hi: torch.Tensor, qtype: QType, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map the range ``[lo, hi]`` onto the grid of ``qtype``.

    Returns float ``scale`` and float ``zero_point`` tensors (``zero_point`` is 0 for symmetric and
    float formats); the range is widened to contain 0 so that 0 is exact.
    """
    lo = torch.as_tensor(lo, dtype=torch.float32)
    hi = torch.as_tensor(hi, dtype=torch.float32)
    if qtype.kind == "float":
        amax = torch.maximum(lo.abs(), hi.abs())
        return (amax / qtype.max_value).clamp_min(EPS), torch.zeros_like(amax)
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return (amax / qtype.qmax).clamp_min(EPS), torch.zeros_like(amax)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    qmin, qmax = int_range(qtype, symmetric=False)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point


def quantize_int(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / s) + z, qmin, qmax)`` as a float tensor holding integers.

    ``x / s`` is computed as ``x * (1 / s)``, as PyTorch's fused fake-quant kernels do, so every
    path (these functions, the fused kernel, the STE path) rounds identically.
    """
    return torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, qmin, qmax)


def dequantize_int(q: torch.Tensor, scale, zero_point=0.0) -> torch.Tensor:
    """``(q - z) * s``."""
    return (q.to(torch.float32) - zero_point) * scale


def fake_quant_int(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize-dequantize on an integer grid, differentiable (STE for x, LSQ for scale).

    Bit-identical to PyTorch's ``fake_quantize_per_tensor_affine``, which is not used: on the
    reference CPU it was slower than these element-wise ops (``benchmarks/fake_quant_kernel.md``).
    With gradients on, one fused autograd node (:class:`_FakeQuantInt`) instead of the chain of
    element-wise ones: the same values and gradients, fine-tuning steps 1.07-1.20x faster
    (``benchmarks/results/finetune_step_ab.md``).
    """
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (x, scale, zero_point)):
        return _FakeQuantInt.apply(x, scale, zero_point, qmin, qmax)
    q = torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``grad`` summed over the dims a tensor of ``shape`` was broadcast along to meet it."""
    return grad.sum_to_size(shape) if grad.shape != shape else grad


class _FakeQuantInt(torch.autograd.Function):
    """:func:`fake_quant_int` as one autograd node, with the straight-through gradients:

    ``dx = g * m`` (``m``: inside the clamp, bounds included, as ``clamp``'s own backward; the chain
    of ops gave ``g * s * m / s``, the same to a rounding of the last bit), ``ds = sum(g * (q - z)) -
    sum(g * s * m * x) / s^2`` (LSQ), ``dz = -sum(g * s * (1 - m))``, each reduced to its input's
    shape. On CPU, when nothing was clipped (dynamic scales: the common case) no mask is kept and
    ``dx = g``. Saves ``x`` only when a scale needs its gradient (the next layer keeps it anyway).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int):
        inv = 1.0 / scale
        u = torch.round(x * inv) + zero_point
        # a data-dependent branch costs a device sync on GPUs: there the mask is always kept
        clipped = x.device.type != "cpu" or bool(u.amin() < qmin) or bool(u.amax() > qmax)
        mask = ((u >= qmin) & (u <= qmax)) if clipped else None
        q = u.clamp_(qmin, qmax)
        out = (q - zero_point) * scale
        need_scale = ctx.needs_input_grad[1]  # False for a Python number
        s = scale if isinstance(scale, torch.Tensor) else torch.tensor(scale)
        z = zero_point if isinstance(zero_point, torch.Tensor) else torch.tensor(zero_point)
        ctx.save_for_backward(mask, s, z, x if need_scale else None, q if need_scale else None)
        return out

    @staticmethod
    def backward(ctx, g):
        mask, s, z, x, q = ctx.saved_tensors
        inside = g if mask is None else torch.where(mask, g, 0.0)
        dx = inside if ctx.needs_input_grad[0] else None
        ds = dz = None
        if ctx.needs_input_grad[1]:
            ds = _reduce_to(g * (q - z), s.shape) - _reduce_to(inside * x, s.shape) * (1.0 / s)
        if ctx.needs_input_grad[2]:
            dz = _reduce_to(inside - g, z.shape) * s if mask is not None else g.new_zeros(z.shape)
        return dx, ds, dz, None, None


def fake_quant_fp8(x: torch.Tensor, scale) -> torch.Tensor:
    """Quantize-dequantize through ``torch.float8_e4m3fn`` with a scale, differentiable (STE)."""
    y = torch.clamp(x / scale, -448.0, 448.0)
    y = y + (y.to(torch.float8_e4m3fn).to(y.dtype) - y).detach()
    return y * scale


def fake_quant(x: torch.Tensor, qtype: QType, scale, zero_point=0.0, symmetric: bool = True) -> torch.Tensor:
    """Quantize-dequantize ``x`` in ``qtype`` with the given scale (and zero point)."""
    if qtype.kind == "float":
        return fake_quant_fp8(x, scale)
    if qtype.is_int:
        qmin, qmax = int_range(qtype, symmetric)
        return fake_quant_int(x, scale, zero_point, qmin, qmax)
    raise ValueError(f"{qtype} has no activation fake-quant; ternary and binary are weight formats")


def dynamic_range(x: torch.Tensor, granularity: str, channel_dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` per tensor (shape ``()``) or per token.

    Per token reduces over ``channel_dim`` only (the features of a Linear input, the channels of a
    Conv2d input), keeping it as a size-1 dim for broadcasting. (Per-group ranges:
    :func:`dynamic_fake_quant` with ``granularity="group"``.)
    """
    if granularity == "tensor":
        return x.detach().amin(), x.detach().amax()
    if granularity == "token":
        x = x.detach()
        n = x.shape[channel_dim]
        if channel_dim % x.dim() == x.dim() - 1 and 4 <= n <= 64 and n % 2 == 0:
            # a short contiguous row (an activation group): PyTorch's inner reductions over a few
            # elements are slow; one element-wise halving first makes them 1.6-1.8x faster (exact:
            # min and max only pick values; benchmarks/probes/short_row_minmax.py)
            lo, hi = x[..., : n // 2], x[..., n // 2 :]
            return torch.minimum(lo, hi).amin(-1, keepdim=True), torch.maximum(lo, hi).amax(-1, keepdim=True)
        return x.amin(channel_dim, keepdim=True), x.amax(channel_dim, keepdim=True)
    raise ValueError(f"granularity must be 'tensor' or 'token', got {granularity!r}")


def dynamic_fake_quant(
    x: torch.Tensor,
    qtype: QType,
    granularity: str = "token",
    symmetric: bool = True,
    channel_dim: int = -1,
    group_size: int = 0,
) -> torch.Tensor:
    """Fake-quantize with a scale computed from ``x`` itself (dynamic quantization).

    ``granularity="group"``: one scale per token and per ``group_size`` consecutive channels of it (as
    NVFP4 / MXFP4 block activations); when ``group_size`` does not divide the channels the last group
    is shorter (padded with copies of its last channel, which change neither its min nor its max).
    """
    if granularity == "group":
        return _group_fake_quant(x, qtype, symmetric, channel_dim, group_size)
    lo, hi = dynamic_range(x, granularity, channel_dim)
    scale, zero_point = scale_from_range(lo, hi, qtype, symmetric)
    return fake_quant(x, qtype, scale.to(x.dtype), zero_point.to(x.dtype), symmetric)


def _group_fake_quant(
    x: torch.Tensor, qtype: QType, symmetric: bool, channel_dim: int, group_size: int
) -> torch.Tensor:
    if group_size < 1:
        raise ValueError(f"per-group activation scales need group_size >= 1, got {group_size}")
    # the channel dim split in place into (groups, group_size), a view of x: moving the channels last
    # first made every reduction and element-wise op strided (a convolution input's groups: 4x slower)
    cd = channel_dim % x.dim()
    c = x.shape[cd]
    pad = -c % group_size
    if pad:
        last = x.narrow(cd, c - 1, 1)
        x = torch.cat([x, last.expand(*x.shape[:cd], pad, *x.shape[cd + 1 :])], cd)
    grouped = x.unflatten(cd, (-1, group_size))
    y = dynamic_fake_quant(grouped, qtype, "token", symmetric, cd + 1).flatten(cd, cd + 1)
    return y.narrow(cd, 0, c) if pad else y


# ----------------------------------------------------------------------------------------- weights


@dataclass
class QuantizedWeight:
    """An integer (or FP8 / ternary / binary) weight with its scales.

    ``qdata`` has the original weight's shape for 8-bit formats, and is packed along the flattened
    input for narrower ones: two values per byte for int3 / int4, four for int2 and ternary (2 bits),
    eight for binary (1 bit) (:func:`pack_bits`, ``pack_bits`` of them per code). ``scale`` has shape
    ``(out, n_groups)``; a group covers ``group_size`` consecutive entries of the flattened
    ``(out, k)`` weight (``k`` zero-padded to a multiple of ``group_size``).
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    shape: torch.Size
    qtype: QType
    group_size: int
    packed: bool = False
    pack_bits: int = 4  # bits per code when ``packed``

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight these integers stand for."""
        out, k = self.shape[0], self.shape[1:].numel()
        n_groups = self.scale.shape[1]
        q = unpack_bits(self.qdata, self.pack_bits) if self.packed else self.qdata.reshape(out, -1)
        q = q[:, : n_groups * self.group_size].to(torch.float32).reshape(out, n_groups, self.group_size)
        w = (q * self.scale.to(torch.float32).unsqueeze(-1)).reshape(out, -1)[:, :k]
        return w.reshape(self.shape).to(dtype)


def _grouped(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, int]:
    """View a weight as ``(out, n_groups, group_size)``, zero-padding ``k``; None = per channel."""
    out = w.shape[0]
    flat = w.reshape(out, -1)
    k = flat.shape[1]
    g = k if group_size is None else group_size
    if g < 1:
        raise ValueError(f"group size must be >= 1, got {g}")
    pad = (-k) % g
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(out, -1, g), g


def weight_scale(w: torch.Tensor, qtype: QType, group_size: int | None = None) -> torch.Tensor:
    """Symmetric per-channel (``group_size=None``) or per-group absmax scales, shape ``(out, n_groups)``."""
    grouped, _ = _grouped(w.detach(), group_size)
    if qtype.kind == "ternary":
        a = grouped.abs()
        keep = a > 0.7 * a.mean(-1, keepdim=True)  # TWN threshold (Li et al. 2016)
        return half_representable(((a * keep).sum(-1) / keep.sum(-1).clamp_min(1)).clamp_min(EPS))
    if qtype.kind == "binary":
        return half_representable(grouped.abs().mean(-1).clamp_min(EPS))  # XNOR-Net (Rastegari et al. 2016)
    amax = grouped.abs().amax(-1)
    limit = qtype.max_value if qtype.kind == "float" else qtype.qmax
    return half_representable((amax / limit).clamp_min(EPS))


CLIP_GRID = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1.0 .. 0.5 of the absmax


def search_weight_scale(
    w: torch.Tensor, qtype: QType, group_size: int | None = None, grid: tuple[float, ...] = CLIP_GRID
) -> torch.Tensor:
    """Per-group scales that minimise the squared rounding error, clipping the absmax by a factor in ``grid``.

    A data-free alternative to the absmax scale (as in AWQ's and GPTQ's clipping searches): at 4 bits
    clipping the few largest weights of a group lowers its error. Integer formats only; other
    formats get :func:`weight_scale`.
    """
    if qtype.kind != "int":
        return weight_scale(w, qtype, group_size)
    grouped, _ = _grouped(w.detach().float(), group_size)
    amax = grouped.abs().amax(-1)
    best_err = torch.full_like(amax, float("inf"))
    best = weight_scale(w, qtype, group_size)
    for f in grid:
        s = half_representable((amax * f / qtype.qmax).clamp_min(EPS))
        codes = torch.clamp(torch.round(grouped / s.unsqueeze(-1)), qtype.qmin, qtype.qmax)
        err = (codes * s.unsqueeze(-1) - grouped).pow(2).sum(-1)
        better = err < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, err, best_err)
    return best


def half_representable(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` rounded to float16 when all of it lies in float16's normal range, else unchanged.

    Weight scales are stored in float16 (half the bytes of per-group scales); the codes are computed
    with the rounded scale, so storage loses nothing. Scales outside the range stay float32.
    """
    if scale.numel() and bool((scale >= 2**-14).all()) and bool((scale <= 65504).all()):
        return scale.half().float()
    return scale


def _weight_codes(grouped: torch.Tensor, scale: torch.Tensor, qtype: QType, ste: bool) -> torch.Tensor:
    s = scale.unsqueeze(-1)
    if qtype.kind == "ternary":
        a = grouped.abs()
        keep = (a > 0.7 * a.detach().mean(-1, keepdim=True)).to(grouped.dtype)
        codes = torch.sign(grouped) * keep
        return grouped / s + (codes - grouped / s).detach() if ste else codes
    if qtype.kind == "binary":
        codes = torch.where(grouped >= 0, 1.0, -1.0).to(grouped.dtype)
        return grouped / s + (codes - grouped / s).detach() if ste else codes
    if qtype.kind == "float":
        y = torch.clamp(grouped / s, -qtype.max_value, qtype.max_value)
        return y + (y.to(torch.float8_e4m3fn).to(y.dtype) - y).detach()
    rnd = round_ste if ste else torch.round
    return torch.clamp(rnd(grouped * (1.0 / s)), qtype.qmin, qtype.qmax)


def fake_quant_weight(
    w: torch.Tensor, qtype: QType, group_size: int | None = None, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize-dequantize a weight (symmetric, per channel or per group), differentiable (STE/LSQ)."""
    grouped, _ = _grouped(w, group_size)
    if scale is None:
        scale = weight_scale(w, qtype, group_size)
    codes = _weight_codes(grouped, scale, qtype, ste=True)
    out = (codes * scale.unsqueeze(-1)).reshape(w.shape[0], -1)[:, : w[0].numel()]
    return out.reshape(w.shape)


def quantize_weight(
    w: torch.Tensor, qtype: QType, group_size: int | None = None, scale: torch.Tensor | None = None
) -> QuantizedWeight:
    """Quantize a weight for storage: int8/fp8 codes, or int4-and-below codes packed two per byte.

    ``scale`` (shape ``(out, n_groups)``) replaces the absmax scales, e.g. searched or GPTQ's ones.
    """
    w = w.detach().float()
    grouped, g = _grouped(w, group_size)
    scale = weight_scale(w, qtype, group_size) if scale is None else scale.float()
    codes = _weight_codes(grouped, scale, qtype, ste=False)
    if qtype.kind == "float":
        qdata = codes.to(torch.float8_e4m3fn).reshape(w.shape[0], -1)
        packed = False
    elif qtype.bits <= 4:
        qdata = pack_bits(codes.reshape(w.shape[0], -1).to(torch.int8), packing_bits(qtype))
        packed = True
    else:
        qdata = codes.reshape(w.shape[0], -1).to(torch.int8)
        packed = False
    if not packed and qdata.shape[1] == w[0].numel():
        qdata = qdata.reshape(w.shape)
    exact_half = bool((scale.half().float() == scale).all())
    scale = scale.to(torch.float16 if exact_half else torch.float32)
    return QuantizedWeight(qdata, scale, w.shape, qtype, g, packed, packing_bits(qtype) if packed else 8)


def packing_bits(qtype: QType) -> int:
    """Bits per stored code of a packed format: 1 (binary), 2 (int2, ternary) or 4 (int3, int4)."""
    if qtype.kind == "binary":
        return 1
    return 2 if qtype.bits <= 2 else 4


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int8 codes ``bits`` (1, 2 or 4) at a time into bytes along the last dim, lowest first.

    Codes are stored in two's complement of ``bits`` bits (4: ``[-8, 7]``, 2: ``[-2, 1]``); with 1
    bit, ``+1`` is stored as 1 and ``-1`` as 0 (binary weights have no zero). The last dim is
    zero-padded to whole bytes. Returns ``uint8`` of shape ``(..., ceil(n * bits / 8))``.
    """
    if bits == 4:
        return pack_int4(q)
    if bits not in (1, 2):
        raise ValueError(f"pack_bits packs 1, 2 or 4 bits per code, got {bits}")
    if q.dtype != torch.int8:
        raise ValueError(f"pack_bits expects int8 codes, got {q.dtype}")
    lo, hi = (-1, 1) if bits == 1 else (-2, 1)
    if q.numel() and (q.min() < lo or q.max() > hi or (bits == 1 and bool((q == 0).any()))):
        raise ValueError(f"pack_bits({bits}) needs codes in {'{-1, +1}' if bits == 1 else '[-2, 1]'}")
    per = 8 // bits
    if q.shape[-1] % per:
        q = torch.nn.functional.pad(q, (0, per - q.shape[-1] % per), value=1 if bits == 1 else 0)
    u = ((q > 0) if bits == 1 else (q.to(torch.int16) & 0x3)).to(torch.uint8)
    out = torch.zeros(*u.shape[:-1], u.shape[-1] // per, dtype=torch.uint8, device=u.device)
    for i in range(per):
        out |= u[..., i::per] << (bits * i)
    return out


def unpack_bits(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits` (returns the padded length): ``uint8`` -> ``int8`` codes."""
    if bits == 4:
        return unpack_int4(p)
    per, mask = 8 // bits, (1 << bits) - 1
    parts = torch.stack([((p >> (bits * i)) & mask).to(torch.int8) for i in range(per)], -1)
    v = parts.reshape(*p.shape[:-1], -1)
    return 2 * v - 1 if bits == 1 else torch.where(v > 1, v - 4, v)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in ``[-8, 7]`` two per byte along the last dim (low nibble first).

    An odd last dim is zero-padded. Returns ``uint8`` of shape ``(..., ceil(n / 2))``.
    """
    if q.dtype != torch.int8:
        raise ValueError(f"pack_int4 expects int8 codes, got {q.dtype}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("pack_int4 needs values in [-8, 7]")
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4` (returns the padded length): ``uint8`` -> ``int8`` in ``[-8, 7]``."""
    lo = (p & 0xF).to(torch.int8)
    hi = (p >> 4).to(torch.int8)
    both = torch.stack([lo, hi], -1).reshape(*p.shape[:-1], -1)
    return torch.where(both > 7, both - 16, both)
