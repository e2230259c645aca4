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


def paired_fd_gap_interval(
    base: np.ndarray | torch.Tensor,
    other: np.ndarray | torch.Tensor,
    reference: GaussianStats,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap interval of the relative FD gap ``(FD(other) - FD(base)) / FD(base)``.

    ``base`` and ``other`` are features of *paired* image sets (image ``i`` of both from the same
    noise and class, e.g. FP and quantized samples); each replicate resamples the same indices in
    both, so the interval reflects how much the gap depends on which images were drawn, with the
    pairing's correlation kept. FD on a resample with repeated images is biased, so read the
    interval as the spread of the gap, not as an exact confidence interval.
    """
    a = base.detach().cpu().double().numpy() if isinstance(base, torch.Tensor) else np.asarray(base, np.float64)
    b = other.detach().cpu().double().numpy() if isinstance(other, torch.Tensor) else np.asarray(other, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired features must have the same shape, got {a.shape} and {b.shape}")
    r_half = _sqrt_psd(reference.sigma)  # FD is symmetric: take the reference's square root once
    tr_r = np.trace(reference.sigma)

    def fd(f: np.ndarray) -> float:
        st = feature_stats(f)
        inner = r_half @ st.sigma @ r_half
        tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
        diff = st.mu - reference.mu
        return float(max(diff @ diff + tr_r + np.trace(st.sigma) - 2 * tr_sqrt, 0.0))

    rng = np.random.default_rng(seed)
    gaps = []
    for _ in range(n_boot):
        idx = rng.integers(0, a.shape[0], a.shape[0])
        fa, fb = fd(a[idx]), fd(b[idx])
        gaps.append((fb - fa) / fa)
    lo, hi = np.quantile(gaps, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
