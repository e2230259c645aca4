"""QALoRA: a low-rank update of a quantized layer's float weight, added *before* the weight fake-quant.

    W_q = fake_quant(W + (alpha / r) B A)      A: (r, k), B: (out, r), B = 0 at the start

The rounding passes gradients straight through, so training ``A, B`` moves the integer weights;
:func:`merge` adds ``(alpha / r) B A`` into ``W`` and removes the adapter, so the saved model is
integer weights and scales as before: no adapter, no inference cost, every backend unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRA(nn.Module):
    """The two factors of one layer's update (``k`` = the weight's flattened input size)."""

    def __init__(self, out_features: int, k: int, rank: int, alpha: float | None = None, generator=None):
        super().__init__()
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        self.down = nn.Parameter(torch.empty(rank, k))
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        bound = 1 / math.sqrt(k)  # nn.Linear's (Kaiming-uniform, a = sqrt(5)) range for A
        with torch.no_grad():
            self.down.uniform_(-bound, bound, generator=generator)

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """``(alpha / r) B A`` in the weight's shape."""
        return ((self.up @ self.down) * self.scale).reshape(shape)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, out={self.up.shape[0]}, k={self.down.shape[1]}"


def attach(model: nn.Module, rank: int, seed: int = 0) -> list[LoRA]:
    """Give every quantized layer with quantized weights a zero-initialised adapter; returns them."""
    from diffquant.nn.modules import QuantModule

    g = torch.Generator().manual_seed(seed)
    out = []
    for m in model.modules():
        if isinstance(m, QuantModule) and m.weight_qtype is not None and not m.frozen:
            w = m.weight
            m.lora = LoRA(w.shape[0], w[0].numel(), min(rank, w.shape[0], w[0].numel()), generator=g).to(w.device)
            out.append(m.lora)
    return out


@torch.no_grad()
def merge(model: nn.Module) -> int:
    """Add every adapter's update into its layer's float weight and remove the adapter; returns how many."""
    from diffquant.nn.modules import QuantModule

    n = 0
    for m in model.modules():
        if isinstance(m, QuantModule) and m.lora is not None:
            m.weight.add_(m.lora.delta(m.weight.shape).to(m.weight.dtype))
            m.lora = None
            n += 1
    return n
