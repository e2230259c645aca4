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


def plot_step_sqnr(per_step: list[dict] | dict[str, list[dict]], path: str | os.PathLike, title: str) -> Path:
    """Noise-prediction SQNR (dB) against the time step, noisiest step on the left.

    ``per_step``: one curve (``{"t", "sqnr_db"}`` per step) or several, by label (a legend names them).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = per_step if isinstance(per_step, dict) else {None: per_step}
    fig, ax = plt.subplots(figsize=(6.4, 3.2 if len(curves) == 1 else 3.8))
    ts = []
    for label, curve in curves.items():
        t = [r["t"] for r in curve]
        ts += t
        db = [min(r["sqnr_db"], 120.0) for r in curve]
        ax.plot(t, db, marker="o", ms=3, lw=1.5, label=label, **({"color": "#3465a4"} if label is None else {}))
    ax.set_xlim(max(ts) + 10, min(ts) - 10)
    ax.set_xlabel("time step t (sampling runs left to right)")
    ax.set_ylabel("ε-prediction SQNR (dB)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
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


def plot_tdq_intervals(quantizers: list, path: str | os.PathLike, k: int = 6) -> Path:
    """TDQ's interval against the per-step optimum for the ``k`` layers whose optimum moves most over t.

    ``quantizers``: TDQ :class:`~diffquant.nn.ActQuantizer` s that still hold ``fit_targets`` (set by
    calibration in this process; not saved). Points: the observer's optimal clipping range at each
    calibrated step; line: the interval the frozen table uses at every ``t``; dashed: the widest
    per-step optimum, which one interval for all steps has to cover.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffquant import primitives as P

    fitted = [q for q in quantizers if getattr(q, "fit_targets", None) is not None]
    if not fitted:
        raise ValueError(
            "no TDQ quantizer with calibration targets: plot right after diffquant.quantize with a *-tdq recipe "
            "(the per-step optima are not saved with the model)"
        )

    def spread(q):
        hi = q.fit_targets[1][:, 1]
        return float(hi.max() / hi.min().clamp_min(1e-12))

    chosen = sorted(fitted, key=spread, reverse=True)[:k]
    cols = min(3, len(chosen))
    rows = -(-len(chosen) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False)
    for ax, q in zip(axes.flat, chosen, strict=False):
        ts, ext = q.fit_targets
        t_all = np.arange(q.scale.numel())
        qmin, qmax = P.int_range(q.qtype, q.symmetric) if q.qtype.is_int else (-q.qtype.max_value, q.qtype.max_value)
        scale, zp = q.scale.detach().cpu().numpy(), q.zero_point.detach().cpu().numpy()
        ax.fill_between(t_all, (qmin - zp) * scale, (qmax - zp) * scale, color="#3465a4", alpha=0.25, lw=0)
        ax.plot(t_all, (qmax - zp) * scale, color="#3465a4", lw=1.2, label="TDQ interval (table)")
        ax.plot(t_all, (qmin - zp) * scale, color="#3465a4", lw=1.2)
        ax.scatter(ts, ext[:, 1], s=6, color="#cc0000", label="per-step optimum", zorder=3)
        ax.scatter(ts, -ext[:, 0], s=6, color="#cc0000", zorder=3)
        ax.axhline(float(ext[:, 1].max()), color="#555753", ls="--", lw=0.8, label="widest optimum")
        ax.axhline(float(-ext[:, 0].max()), color="#555753", ls="--", lw=0.8)
        ax.set_xlim(int(ts.max()) + 10, int(ts.min()) - 10)
        ax.set_title(_short(q.name, 44), fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(chosen) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, loc="upper left")
    fig.suptitle(
        "activation clipping range over t: TDQ's table vs the per-step optimum (time runs left to right)", fontsize=9
    )
    fig.tight_layout()
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]
