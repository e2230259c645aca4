"""What every integer backend shares: the eligibility check for integer kernels, and the per-step
``[scale, zero_point]`` lookup that keeps one compiled graph for every step."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from diffquant import primitives as P
from diffquant.nn.modules import QuantConv2d, QuantModule
from diffquant.nn.quantizer import ActQuantizer
from diffquant.timestep import require_step, step_tensor


class LoweringError(ValueError):
    """A model cannot be lowered (e.g. it has no frozen quantized layers)."""


HANDLES = itertools.count()  # integer handles of lowered layers (custom-op arguments)


def integer_obstacle(
    m: QuantModule, where: str, per_token: bool = False, fp8: bool = False, per_group: bool = False
) -> str | None:
    """Why ``m`` cannot run on integer kernels of ``where`` (e.g. "oneDNN"), or ``None`` when it can.

    Integer kernels take integer weights of at most 8 bits with one scale per output channel, and one
    integer activation scale per tensor (static, per step, or computed on the fly); backends add
    their own limits on top. ``per_token=True``: the backend also takes dynamic per-token scales
    (one per row of a GEMM, applied after it). ``per_group=True``: it also takes dynamic per-group
    activation scales of integer formats (the CPU backend runs them as per-token codes of the
    group-quantized values). ``fp8=True``: it also takes FP8 E4M3 weights with FP8 activations (per
    tensor), the float counterpart of the same layout.
    """
    if not m.frozen:
        return "float weights (weight format none, or not frozen)"
    float_weights = m.weight_qtype.kind == "float"
    if float_weights and not fp8:
        return f"fp8 weights (no fp8 kernel in {where})"
    if not float_weights and m.weight_qtype.bits > 8:
        return f"{m.weight_qtype} weights"
    k = math.prod(m.weight_shape.tolist()[1:])
    if m.weight_scale.shape[1] != 1 or int(m.weight_group) < k:
        return f"per-group weight scales ({where} takes one scale per output channel)"
    if isinstance(m, QuantConv2d) and m.groups != 1:
        return "grouped convolution"
    if m.input_quantizer is None:
        return "float activations (the recipe leaves this layer's input unquantized)"
    for q in (m.input_quantizer, m.input_quantizer_2):
        if q is None:
            continue
        if q.qtype.is_int == float_weights:  # integer x integer, or fp8 x fp8
            return f"{m.weight_qtype} weights with {q.qtype} activations (no such kernel in {where})"
        if q.granularity == "group" and not (per_group and not float_weights):
            return f"per-group activation scales (no kernel for them in {where})"
        if q.granularity == "token" and not (per_token and not float_weights):
            return f"per-token activation scales ({where} takes one scale per tensor)"
        if q.learnable:
            return "learnable TDQ generator (freeze it into its table first)"
        if not q._ready:
            return "uncalibrated activation scales"
    return None


class StepQuantizer(nn.Module):
    """A per-step (bucketed / TDQ) activation quantizer left in float, compile-friendly.

    Its table lookup reads the current step in Python; traced by ``torch.compile`` that lookup would
    specialise the graph on every step (and fail on the tensor index). Traced, it indexes ``table``
    (``(T, 2)``: ``[scale, zero_point]`` of every time step) with
    :func:`~diffquant.timestep.step_tensor` instead, an indirect load Inductor fuses into the fake
    quant, and one compiled graph serves all steps.
    Used for the attention-matmul operands and the inputs of layers that stay on the reference path.
    """

    def __init__(self, quantizer: ActQuantizer):
        super().__init__()
        self.qtype, self.symmetric = quantizer.qtype, quantizer.symmetric
        self.name = quantizer.name
        self.bucket_list = quantizer.step_table().tolist()
        scales, zero_points = quantizer.scale.tolist(), quantizer.zero_point.tolist()
        self.param_list = [[float(s), float(z)] for s, z in zip(scales, zero_points, strict=True)]
        table = torch.tensor([self.param_list[b] for b in self.bucket_list], dtype=torch.float32)
        self.register_buffer("table", table.to(quantizer.scale.device), persistent=False)
        step_tensor(self.table.device)  # created now, eagerly: traced code only reads it

    def set_params(self, bucket: int, scale: float, zero_point: float) -> None:
        """Replace bucket ``bucket``'s ``[scale, zero_point]`` (the list eager calls read and the table)."""
        self.param_list[bucket] = [float(scale), float(zero_point)]
        rows = [t for t, b in enumerate(self.bucket_list) if b == bucket]
        self.table[rows] = torch.tensor([float(scale), float(zero_point)], device=self.table.device)

    def current(self) -> list[float]:
        """``[scale, zero_point]`` at the current step, as Python numbers (no tensor, no op)."""
        return self.param_list[self.bucket_list[require_step(self.name).timestep]]

    def params(self) -> torch.Tensor:
        """``[scale, zero_point]`` at the current step (float32), the table's row: traced, indexed by the
        step tensor; eager, by the step itself (a view, no copy to the table's device)."""
        if torch.compiler.is_compiling():
            return self.table.index_select(0, step_tensor(self.table.device))[0]
        return self.table[require_step(self.name).timestep]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params().to(x.dtype)
        return P.fake_quant(x, self.qtype, p[0], p[1], self.symmetric)


class ActParams(nn.Module):
    """The ``(scale, zero point)`` of one lowered input as graph tensors, for the quantize step.

    Static scales are float32 buffers (as the reference quantizer holds them, so ``x * (1 / s)``
    rounds identically); per-step ones (bucketed, TDQ table) from the table of a
    :class:`StepQuantizer`, indexed in traced code by the step tensor, a graph input; dynamic ones are
    computed from the input. No traced code reads the step as a Python number, so a compiled graph
    serves every step, and the quantize step that uses them stays in the graph, where Inductor fuses
    it into the op that produces the activation.
    """

    def __init__(self, q: ActQuantizer):
        super().__init__()
        self.name = q.name
        self.mode, self.granularity = q.mode, q.granularity
        self.qtype, self.symmetric = q.qtype, q.symmetric
        self.channel_dim = q.channel_dim  # per-token scales reduce over it (1: a convolution's channels)
        self.lookup = StepQuantizer(q) if q.mode != "dynamic" and q.scale.numel() > 1 else None
        static = q.mode != "dynamic" and self.lookup is None
        self.register_buffer("static_scale", q.scale.reshape(-1)[0].float().clone() if static else None)
        self.register_buffer("static_zp", q.zero_point.reshape(-1)[0].float().clone() if static else None)
        # the same as Python numbers, read once here instead of two tensor reads per eager call
        self.static_numbers = (float(self.static_scale), float(self.static_zp)) if static else None

    def params(self, x: torch.Tensor):
        """``(scale, zero point)`` for ``x``: 0-d float32 tensors, or one per token for per-token dynamic
        scales (``(M, 1)`` for a Linear input, ``(N, 1, H, W)`` for a convolution's)."""
        if self.mode == "dynamic":
            lo, hi = P.dynamic_range(x, self.granularity, self.channel_dim)
            return P.scale_from_range(lo, hi, self.qtype, self.symmetric)
        if self.lookup is not None:
            p = self.lookup.params()
            return p[0], p[1]
        return self.static_scale, self.static_zp

    def params_eager(self, x: torch.Tensor) -> tuple[float, float]:
        """The same ``(scale, zero point)`` as Python numbers, for eager hot paths: a per-step lookup
        is a list index here, not a tensor (an eager tensor op costs about as much as a small layer's
        quantize step; with one eager TDQ was measurably slower than static)."""
        if self.lookup is not None:
            s, z = self.lookup.current()
            return s, z
        if self.static_numbers is not None:
            return self.static_numbers
        scale, zp = self.params(x)  # dynamic: from x itself
        return float(scale), float(zp)


@dataclass
class LoweringReport:
    """What :func:`lower` did: layers on integer kernels, and the others with the reason."""

    kernels: str = "integer kernels"  # what the lowered layers run on, for the summary
    lowered: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    step_quantizers: list[str] = field(default_factory=list)  # float per-step quantizers behind one op
    attention: list[str] = field(default_factory=list)  # attention modules given a backend's kernel
    notes: list[str] = field(default_factory=list)  # one line each in the summary

    def summary(self) -> str:
        lines = [f"{len(self.lowered)} layers on {self.kernels}, {len(self.kept)} on the float reference path"]
        reasons: dict[str, int] = {}
        for r in self.kept.values():
            reasons[r] = reasons.get(r, 0) + 1
        lines += [f"  {n} x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
        if self.step_quantizers:
            lines.append(f"{len(self.step_quantizers)} per-step activation quantizers (attention operands...) in float")
        return "\n".join(lines + self.notes)
