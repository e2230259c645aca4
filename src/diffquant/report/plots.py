"""Figures for the report (matplotlib, Agg backend, written atomically as PNG)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_step_sqnr(per_step: list[dict], path: str | os.PathLike, title: str) -> Path:
    """Noise-prediction SQNR (dB) against the time step, noisiest step on the left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in per_step]
    db = [min(r["sqnr_db"], 120.0) for r in per_step]
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.plot(t, db, marker="o", ms=3, lw=1.5, color="#3465a4")
    ax.set_xlim(max(t) + 10, min(t) - 10)
    ax.set_xlabel("time step t (sampling runs left to right)")
    ax.set_ylabel("ε-prediction SQNR (dB)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def plot_range_heatmap(amax: np.ndarray, layers: list[str], timesteps: list[int], path: str | os.PathLike) -> Path:
    """Per-layer x per-step activation range: ``log2(amax_t / max_t amax_t)`` (0 = the layer's widest step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rel = np.log2(np.maximum(amax, 1e-12) / np.maximum(amax.max(1, keepdims=True), 1e-12))
    height = max(3.0, 0.16 * len(layers) + 1.2)
    fig, ax = plt.subplots(figsize=(7.5, height))
    im = ax.imshow(rel, aspect="auto", cmap="viridis", vmin=min(-4.0, float(rel.min())), vmax=0.0)
    ax.set_yticks(range(len(layers)), [_short(n) for n in layers], fontsize=6)
    ticks = np.linspace(0, len(timesteps) - 1, min(len(timesteps), 8)).round().astype(int)
    ax.set_xticks(ticks, [str(timesteps[i]) for i in ticks], fontsize=7)
    ax.set_xlabel("time step t (sampling runs left to right)")
    ax.set_title("activation range per layer and step: log2(amax / the layer's largest amax)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label="log2 relative amax")
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]
