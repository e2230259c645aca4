"""Fréchet distance (FID's formula, Heusel et al. 2017) in the feature space of ``fashion-features``.

``FD = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})``. The trace of the matrix square root is
computed as ``sum_i sqrt(lambda_i)`` for the eigenvalues of the symmetric PSD matrix
``S_1^{1/2} S_2 S_1^{1/2}`` (similar to ``S_1 S_2``), in float64, which is stabler than ``sqrtm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class GaussianStats:
    """Mean and covariance of a feature set (float64), with the number of samples behind them."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"mu": torch.from_numpy(self.mu), "sigma": torch.from_numpy(self.sigma), "n": torch.tensor(self.n)}

    @classmethod
    def from_tensors(cls, d: dict[str, torch.Tensor]) -> GaussianStats:
        return cls(d["mu"].double().numpy(), d["sigma"].double().numpy(), int(d["n"]))


def feature_stats(features: np.ndarray | torch.Tensor) -> GaussianStats:
    """Mean and (unbiased) covariance of an ``(N, D)`` feature array."""
    f = (
        features.detach().cpu().double().numpy()
        if isinstance(features, torch.Tensor)
        else np.asarray(features, np.float64)
    )
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need an (N, D) feature array with N >= 2, got shape {f.shape}")
    return GaussianStats(f.mean(0), np.cov(f, rowvar=False), f.shape[0])


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """Fréchet distance between two Gaussians given by their statistics."""
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(f"statistics of different dimension: {a.mu.shape} vs {b.mu.shape}")
    diff = a.mu - b.mu
    s1_half = _sqrt_psd(a.sigma)
    inner = s1_half @ b.sigma @ s1_half
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    fd = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_sqrt
    return float(max(fd, 0.0))
