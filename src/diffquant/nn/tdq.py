"""The TDQ generator (Temporal Dynamic Quantization, So et al., NeurIPS 2023): ``t -> (lo(t), hi(t))``.

``g(t) = softplus(MLP(fourier(t / T)))`` (3 layers of 64 hidden units with ReLU, as in the paper)
gives the negative and positive extents of an activation quantizer's clipping range. Fitting it is
:mod:`diffquant.methods.tdq`; once fitted it is evaluated at every ``t`` into its quantizer's per-step
table, which is what a forward reads and what is saved (a loaded model has no generator).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TDQGenerator(nn.Module):
    """``t -> (extent below 0, extent above 0)``, both positive.

    Args:
        num_timesteps: ``T``; inputs are scaled to ``t / T``.
        n_freqs: Fourier frequencies ``pi * 2^k``, ``k < n_freqs``, as sin and cos features.
        hidden: hidden width.
        depth: number of Linear layers.
        seed: seed of the initial weights (PyTorch's default initialisation, drawn from a generator of
            its own: a fit that starts here gives the same ``g`` whatever the process drew before).
    """

    def __init__(self, num_timesteps: int = 1000, n_freqs: int = 8, hidden: int = 64, depth: int = 3, seed: int = 0):
        super().__init__()
        self.num_timesteps = num_timesteps
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freqs, dtype=torch.float32), persistent=False)
        dims = [2 * n_freqs + 1, *([hidden] * (depth - 1)), 2]
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < depth - 1:
                layers.append(nn.ReLU())
        self.mlp = nn.Sequential(*layers)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """``nn.Linear``'s own initialisation (Kaiming-uniform weights, uniform biases), from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=g)
                bound = 1 / math.sqrt(m.in_features)
                nn.init.uniform_(m.bias, -bound, bound, generator=g)

    def features(self, t: torch.Tensor) -> torch.Tensor:
        x = t.float().reshape(-1, 1) / self.num_timesteps
        ang = x * self.freqs
        return torch.cat([x, ang.sin(), ang.cos()], dim=1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Extents ``(N, 2)``: ``[-lo(t), hi(t)]``."""
        return F.softplus(self.mlp(self.features(t)))

    def ranges(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo(t), hi(t))``."""
        e = self(t)
        return -e[:, 0], e[:, 1]
