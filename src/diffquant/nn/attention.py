"""Quantized attention matmuls: ``softmax(Q Kᵀ · scale) V`` with quantized Q, K, P and V.

The two matmuls of attention carry activations on both sides, so each operand gets an
:class:`~diffquant.nn.quantizer.ActQuantizer`. The softmax output ``P`` lies in ``[0, 1]`` and
gets its own format (``softmax_qtype``; ``None`` keeps it in float). The reference path is the
same math in float, eagerly.
"""

from __future__ import annotations

import torch
from torch import nn

from diffquant.nn.quantizer import ActQuantizer


class QuantAttentionMatmuls(nn.Module):
    """Holds the quantizers of ``Q``, ``K``, ``P`` (softmax output) and ``V``; computes attention.

    Args:
        make: ``make(role, channel_dim) -> ActQuantizer`` for role in ``q, k, v``.
        make_softmax: ``make_softmax() -> ActQuantizer | None`` for ``P``.
    """

    def __init__(self, make, make_softmax):
        super().__init__()
        self.q_quantizer: ActQuantizer = make("q")
        self.k_quantizer: ActQuantizer = make("k")
        self.v_quantizer: ActQuantizer = make("v")
        self.p_quantizer: ActQuantizer | None = make_softmax()

    def forward(self, q, k, v, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``q, k, v``: ``(batch, heads, tokens, head_dim)``; returns ``(batch, heads, tokens, head_dim)``."""
        scores = self.q_quantizer(q) @ self.k_quantizer(k).transpose(-1, -2) * scale
        if mask is not None:
            scores = scores + mask
        probs = scores.softmax(-1)
        if self.p_quantizer is not None:
            probs = self.p_quantizer(probs)
        return probs @ self.v_quantizer(v)
