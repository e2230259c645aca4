"""Temporal Dynamic Quantization (So et al., NeurIPS 2023): activation ranges as a function of t.

Each activation quantizer gets a tiny generator ``g(t) = softplus(MLP(fourier(t / T)))`` (3 layers
of 64 hidden units with ReLU, as in the paper) that outputs the negative and positive extents of
the clipping range, ``lo(t) = -g_0(t)`` and ``hi(t) = g_1(t)``. It is fitted after calibration, on
the model's own trajectory and without any data set, to the per-step optimal ranges the observer
found (a PTQ fit; ``ActQuantizer(..., learnable=True)`` trains it instead with LSQ's straight-
through gradient). Since ``g`` depends on ``t`` alone, it is then evaluated once for every
training time step into the quantizer's scale table: at run time a TDQ quantizer does one table
lookup, exactly like a bucketed one, and never calls the generator.
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
    """

    def __init__(self, num_timesteps: int = 1000, n_freqs: int = 8, hidden: int = 64, depth: int = 3):
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


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


@torch.enable_grad()
def fit_generators(
    generators: list[TDQGenerator],
    timesteps: list[torch.Tensor],
    targets: list[torch.Tensor],
    iters: int = 600,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Fit generators to per-step target extents, all at once (one batched MLP).

    The loss is the squared error of ``log`` extents (relative error, so small and large layers
    weigh alike). The last layer's bias starts at the mean target, so fitting begins from the
    static (all-steps) range.

    Args:
        generators: generators of identical shape.
        timesteps: per generator, the ``(S,)`` time steps with targets.
        targets: per generator, ``(S, 2)`` positive extents ``[-lo, hi]``.

    Returns:
        The final RMS log error per generator.
    """
    if not generators:
        return []
    torch.manual_seed(seed)
    q = len(generators)
    s_max = max(int(t.numel()) for t in timesteps)
    feats = torch.zeros(q, s_max, generators[0].features(torch.zeros(1)).shape[1])
    y = torch.zeros(q, s_max, 2)
    mask = torch.zeros(q, s_max, 1)
    for i, (g, t, tgt) in enumerate(zip(generators, timesteps, targets, strict=True)):
        n = t.numel()
        feats[i, :n] = g.features(t)
        y[i, :n] = tgt.float().clamp_min(1e-8).log()
        mask[i, :n] = 1
    # stack the per-generator layers into batched weights: (q, in, out)
    linears = [[m for m in g.mlp if isinstance(m, nn.Linear)] for g in generators]
    weights = [
        torch.stack([ls[k].weight.detach().T for ls in linears]).clone().requires_grad_()
        for k in range(len(linears[0]))
    ]
    biases = [torch.stack([ls[k].bias.detach() for ls in linears]).clone() for k in range(len(linears[0]))]
    mean_target = (y * mask).sum(1) / mask.sum(1)  # (q, 2), log extents
    biases[-1] = _inverse_softplus(mean_target.exp())
    weights[-1].data.mul_(0.1)
    biases = [b.requires_grad_() for b in biases]
    opt = torch.optim.Adam([*weights, *biases], lr=lr)
    for _ in range(iters):
        h = feats
        for k, (w, b) in enumerate(zip(weights, biases, strict=True)):
            h = torch.baddbmm(b.unsqueeze(1), h, w)
            if k < len(weights) - 1:
                h = torch.relu(h)
        pred = F.softplus(h).clamp_min(1e-8).log()
        loss = (((pred - y) ** 2) * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        per = ((((pred - y) ** 2) * mask).sum((1, 2)) / (2 * mask.sum((1, 2)))).sqrt()
        for i, ls in enumerate(linears):
            for k, lin in enumerate(ls):
                lin.weight.copy_(weights[k][i].T)
                lin.bias.copy_(biases[k][i])
    return per.tolist()
