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

SCORE_CHUNK_ELEMENTS = 1 << 24  # attention scores computed at once (64 MB in float32: one 4096 x 4096 head)


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
        """``q, k, v``: ``(batch, heads, tokens, head_dim)``; returns ``(batch, heads, tokens, head_dim)``.

        The ``tokens x tokens`` scores are computed for a few (batch, head) pairs at a time when the
        whole would pass :data:`SCORE_CHUNK_ELEMENTS` (64x64 latents: 4096 x 4096 per head); every
        operand's quantization is per element or per row, so chunks give the same result.
        """
        q, k, v = self.q_quantizer(q), self.k_quantizer(k), self.v_quantizer(v)
        b, h, n, m = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        per_pair = n * m
        p = self.p_quantizer
        # a per-tensor dynamic scale needs the whole tensor (backends' quantizers may have no mode: per step)
        whole_tensor_p = getattr(p, "mode", None) == "dynamic" and getattr(p, "granularity", None) == "tensor"
        if b * h * per_pair <= SCORE_CHUNK_ELEMENTS or whole_tensor_p:
            return self._attend(q, k, v, scale, mask)
        step = max(1, SCORE_CHUNK_ELEMENTS // per_pair)
        pairs = [(i, j) for i in range(b) for j in range(0, h, step)]
        out = torch.empty(*q.shape[:3], v.shape[-1], dtype=torch.result_type(q, v), device=q.device)
        for i, j in pairs:
            sl = (slice(i, i + 1), slice(j, j + step))
            part_mask = None
            if mask is not None:
                part_mask = mask[tuple(slice(None) if mask.shape[d] == 1 else sl[d] for d in range(2))]
            out[sl] = self._attend(q[sl], k[sl], v[sl], scale, part_mask)
        return out

    def _attend(self, q, k, v, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
        """``softmax(q k^T * scale + mask) v`` with the softmax output quantized (operands already are)."""
        scores = q @ k.transpose(-1, -2)
        scores.mul_(scale)  # in place: one tokens x tokens buffer before the softmax, not three
        if mask is not None:
            scores = scores.add_(mask) if mask.dtype == scores.dtype else scores + mask
        probs = scores.softmax(-1)
        del scores
        if self.p_quantizer is not None:
            probs = self.p_quantizer(probs)
        return probs @ v
