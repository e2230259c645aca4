"""What every integer backend checks before taking a quantized layer off the reference path."""

from __future__ import annotations

import math

from diffquant.nn.modules import QuantConv2d, QuantModule


def integer_obstacle(m: QuantModule, where: str) -> str | None:
    """Why ``m`` cannot run on integer kernels of ``where`` (e.g. "oneDNN"), or ``None`` when it can.

    Integer kernels take integer weights of at most 8 bits with one scale per output channel, and one
    integer activation scale per tensor (static, per step, or computed on the fly); backends add
    their own limits on top.
    """
    if not m.frozen:
        return "float weights (weight format none, or not frozen)"
    if m.weight_qtype.kind == "float":
        return f"fp8 weights (no fp8 kernel in {where})"
    if m.weight_qtype.bits > 8:
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
        if not q.qtype.is_int:
            return f"{q.qtype} activations (no such kernel in {where})"
        if q.granularity != "tensor":
            return f"per-token activation scales ({where} takes one scale per tensor)"
        if q.learnable:
            return "learnable TDQ generator (freeze it into its table first)"
        if not q._ready:
            return "uncalibrated activation scales"
    return None
