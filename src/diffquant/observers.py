"""Streaming activation observers with statistics per time step.

Each observer keeps, per denoising time step ``t``, a histogram of the values it saw on a
symmetric power-of-two range ``[-R, R]`` (``R`` doubles, merging bin pairs exactly, when a larger
value arrives), plus the exact min and max. Memory is ``bins`` counts per observed step, whatever
the number of calibration samples. From the histograms of any set of steps an observer derives a
clipping range ``[lo, hi]``:

- ``minmax``: the exact extremes;
- ``percentile``: the ``p``-th percentile of the values (both tails for asymmetric grids, of
  ``|x|`` for symmetric ones);
- ``mse``: the range minimising the expected ``L_p`` quantization error (PTQ4DM uses p = 2.4;
  p = 2 is MSE) over a grid of shrunk ranges. In-range values contribute the rounding error of a
  uniform quantizer, ``E|u|^p = (s/2)^p / (p + 1)``; clipped values their distance to the edge.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from diffquant.primitives import int_range
from diffquant.qtypes import QType


class StepHistogram:
    """A streaming histogram on ``[-R, R]`` with ``R`` a power of two (so merges are exact)."""

    def __init__(self, bins: int = 2048):
        if bins < 16 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 16, got {bins}")
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.radius = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.n = 0

    def _grow(self, radius: float) -> None:
        """Widen to ``radius`` (a power of two >= the current one), merging bins exactly."""
        if self.radius == 0.0:
            self.radius = radius
            return
        factor = round(radius / self.radius)
        if factor <= 1:
            return
        if factor >= self.bins:
            total = self.counts.sum()
            self.counts.zero_()
            self.counts[self.bins // 2 - 1 : self.bins // 2 + 1] = total / 2
        else:
            merged = self.counts.view(-1, factor).sum(1)  # bins // factor new bins, centred
            self.counts.zero_()
            start = (self.bins - merged.numel()) // 2
            self.counts[start : start + merged.numel()] = merged
        self.radius = radius

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).float()
        if x.numel() == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        amax = max(abs(lo), abs(hi), 1e-30)
        needed = 2.0 ** math.ceil(math.log2(amax))
        if needed > self.radius:
            self._grow(needed)
        self.counts += torch.histc(x, self.bins, -self.radius, self.radius).double()
        self.n += x.numel()

    def merged_with(self, other: StepHistogram) -> StepHistogram:
        out = StepHistogram(self.bins)
        for h in (self, other):
            if h.n == 0:
                continue
            out._grow(max(out.radius, h.radius))
            src = h.counts
            if h.radius < out.radius:
                tmp = StepHistogram(self.bins)
                tmp.counts, tmp.radius = h.counts.clone(), h.radius
                tmp._grow(out.radius)
                src = tmp.counts
            out.counts += src
            out.min, out.max, out.n = min(out.min, h.min), max(out.max, h.max), out.n + h.n
        return out

    def centers(self) -> torch.Tensor:
        width = 2 * self.radius / self.bins
        return -self.radius + width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)


def merge(histograms: Iterable[StepHistogram]) -> StepHistogram:
    hists = list(histograms)
    out = StepHistogram(hists[0].bins) if hists else StepHistogram()
    for h in hists:
        out = out.merged_with(h)
    return out


class Observer:
    """Base observer: per-step histograms; subclasses choose the clipping range.

    Args:
        bins: histogram bins per step (a power of two).
    """

    name = "base"

    def __init__(self, bins: int = 2048):
        self.bins = bins
        self.per_step: dict[int, StepHistogram] = {}

    def update(self, x: torch.Tensor, timestep: int) -> None:
        """Record the values of ``x`` seen at time step ``timestep``."""
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"non-finite values at time step {timestep}")
        self.per_step.setdefault(int(timestep), StepHistogram(self.bins)).update(x)

    @property
    def timesteps(self) -> list[int]:
        return sorted(self.per_step)

    @property
    def num_samples(self) -> int:
        return sum(h.n for h in self.per_step.values())

    def histogram(self, timesteps: Iterable[int] | None = None) -> StepHistogram:
        keys = self.timesteps if timesteps is None else [t for t in timesteps if t in self.per_step]
        if not keys:
            raise ValueError("the observer saw no data at the requested time steps")
        return merge(self.per_step[t] for t in keys)

    def range(self, qtype: QType, symmetric: bool, timesteps: Iterable[int] | None = None) -> tuple[float, float]:
        """The clipping range ``(lo, hi)`` for the data of ``timesteps`` (default: all)."""
        return self._range(self.histogram(timesteps), qtype, symmetric)

    def _range(self, hist: StepHistogram, qtype: QType, symmetric: bool) -> tuple[float, float]:
        """The clipping range for one (merged) histogram: the hook histogram-based subclasses fill in
        (an observer that needs the steps apart, like :class:`StepAmaxObserver`, overrides ``range``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _range or range")

    def ranges_per_step(self, qtype: QType, symmetric: bool, timesteps: Iterable[int] | None = None):
        """``[(lo, hi)]`` of every observed step (or of ``timesteps``), each from that step's data alone."""
        keys = self.timesteps if timesteps is None else [t for t in timesteps if t in self.per_step]
        return [self.range(qtype, symmetric, [t]) for t in keys]


class MinMaxObserver(Observer):
    """The exact minimum and maximum."""

    name = "minmax"

    def _range(self, hist, qtype, symmetric):
        return hist.min, hist.max


class PercentileObserver(Observer):
    """Clip at the ``percentile``-th percentile (e.g. 99.99), read off the histogram.

    Args:
        percentile: in (0, 100].
    """

    name = "percentile"

    def __init__(self, percentile: float = 99.99, bins: int = 2048):
        super().__init__(bins)
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile

    @staticmethod
    def _quantile(counts: torch.Tensor, left: float, width: float, q: float) -> float:
        """Value below which a share ``q`` of the histogram lies, interpolated inside its bin."""
        cdf = counts.cumsum(0) / counts.sum()
        idx = int(torch.searchsorted(cdf, torch.tensor(q, dtype=cdf.dtype)).clamp(max=len(cdf) - 1))
        before = float(cdf[idx - 1]) if idx > 0 else 0.0
        share = float(cdf[idx]) - before
        frac = (q - before) / share if share > 0 else 1.0
        return left + width * (idx + min(max(frac, 0.0), 1.0))

    def _range(self, hist, qtype, symmetric):
        q = self.percentile / 100
        width = 2 * hist.radius / hist.bins
        if symmetric:
            half = hist.bins // 2
            folded = hist.counts[half:] + hist.counts[:half].flip(0)  # histogram of |x| on [0, R]
            amax = min(self._quantile(folded, 0.0, width, q), max(abs(hist.min), abs(hist.max)))
            return -amax, amax
        lo = max(self._quantile(hist.counts, -hist.radius, width, 1 - q), hist.min)
        hi = min(self._quantile(hist.counts, -hist.radius, width, q), hist.max)
        return lo, hi


class MseObserver(Observer):
    """Search the clipping range that minimises the expected ``L_p`` error (PTQ4DM: p = 2.4).

    Args:
        p: the norm (2 = mean squared error).
        grid: number of candidate shrink factors in ``(0, 1]`` of the min-max range.
    """

    name = "mse"

    def __init__(self, p: float = 2.4, grid: int = 100, bins: int = 2048):
        super().__init__(bins)
        if p <= 0:
            raise ValueError(f"p must be > 0, got {p}")
        self.p = p
        self.grid = grid

    def _error(self, c, counts, lo, hi, qtype: QType, symmetric: bool, width: float) -> torch.Tensor:
        """Expected L_p error for candidate ranges ``lo, hi`` (shape ``(..., 1)``) over bins at ``c``.

        A bin much narrower than the quantization step is represented by its centre, quantized
        exactly as the quantizer will (zero-point rounding included); a wider bin by the uniform
        rounding error ``(s/2)^p / (p + 1)`` inside the range and its distance to the edge outside.
        """
        p = self.p
        if qtype.kind == "float":
            # FP8 E4M3: rounding step ~ 2^-3 of the value's binade (3 mantissa bits); clip at hi
            s = torch.maximum(c.abs(), hi * 2.0**-9) * 2.0**-3
            inside = ((s / 2) ** p) / (p + 1)
            return (counts * torch.where(c.abs() > hi, (c.abs() - hi) ** p, inside)).sum(-1)
        qmin, qmax = int_range(qtype, symmetric)
        if symmetric:
            s = (hi / qmax).clamp_min(1e-30)
            zp = torch.zeros_like(s)
        else:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
            s = ((hi - lo) / (qmax - qmin)).clamp_min(1e-30)
            zp = (qmin - torch.round(lo / s)).clamp(qmin, qmax)
        x_hat = (torch.clamp(torch.round(c / s) + zp, qmin, qmax) - zp) * s
        exact = (c - x_hat).abs() ** p
        lo_edge, hi_edge = (qmin - zp) * s, (qmax - zp) * s
        in_range = (c >= lo_edge) & (c <= hi_edge)
        uniform = ((s / 2) ** p / (p + 1)).expand_as(exact)
        err = torch.where(in_range & (width > s / 4), uniform, exact)
        return (counts * err).sum(-1)

    @staticmethod
    def _coarse(hist: StepHistogram, bins: int = 256) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Bin centres and counts on at most ``bins`` bins (neighbours merged exactly), and the bin width."""
        factor = max(1, hist.bins // bins)
        counts = hist.counts.view(-1, factor).sum(1)
        width = 2 * hist.radius / counts.numel()
        c = -hist.radius + width * (torch.arange(counts.numel(), dtype=torch.float64) + 0.5)
        return c, counts, width

    def _search(self, c, counts, width, lo0, hi0, qtype: QType, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Best ``(lo, hi)`` for ``S`` histograms at once: ``c, counts (S, K)``, ``width, lo0, hi0 (S,)``."""
        c, counts, width = c[:, None, :], counts[:, None, :], width[:, None, None]
        if symmetric or qtype.kind == "float":
            amax = torch.maximum(lo0.abs(), hi0.abs())
            hi = torch.linspace(1.0 / self.grid, 1.0, self.grid, dtype=torch.float64)[None, :] * amax[:, None]
            best = self._error(c, counts, -hi[..., None], hi[..., None], qtype, True, width).argmin(1)
            h = hi.gather(1, best[:, None])[:, 0]
            return -h, h
        # asymmetric: a 2-D search over both ends, coarse (12 x 12), then refined twice around the best
        lo0, hi0 = lo0.clamp(max=0), hi0.clamp(min=0)
        f_lo = f_hi = torch.linspace(0.05, 1.0, 12, dtype=torch.float64).expand(c.shape[0], -1)
        for half, n in ((0.06, 7), (0.01, 5), (None, None)):
            g_lo, g_hi = f_lo.shape[1], f_hi.shape[1]
            lo = (f_lo[:, :, None] * lo0[:, None, None]).expand(-1, -1, g_hi).reshape(c.shape[0], -1, 1)
            hi = (f_hi[:, None, :] * hi0[:, None, None]).expand(-1, g_lo, -1).reshape(c.shape[0], -1, 1)
            best = self._error(c, counts, lo, hi, qtype, False, width).argmin(1)
            b_lo = f_lo.gather(1, (best // g_hi)[:, None])
            b_hi = f_hi.gather(1, (best % g_hi)[:, None])
            if half is None:
                break
            step = torch.linspace(-half, half, n, dtype=torch.float64)[None, :]
            f_lo, f_hi = (b_lo + step).clamp(0.01, 1.0), (b_hi + step).clamp(0.01, 1.0)
        return b_lo[:, 0] * lo0, b_hi[:, 0] * hi0

    def _range(self, hist, qtype, symmetric):
        c, counts, width = self._coarse(hist)
        lo0, hi0 = (
            torch.tensor([min(hist.min, 0.0)], dtype=torch.float64),
            torch.tensor([max(hist.max, 0.0)], dtype=torch.float64),
        )
        if symmetric or qtype.kind == "float":
            lo0, hi0 = torch.tensor([hist.min], dtype=torch.float64), torch.tensor([hist.max], dtype=torch.float64)
        lo, hi = self._search(c[None], counts[None], torch.tensor([width]), lo0, hi0, qtype, symmetric)
        return float(lo[0]), float(hi[0])

    def ranges_per_step(self, qtype, symmetric, timesteps=None, chunk: int = 8):
        """The range of every step separately, searched in batches of ``chunk`` steps."""
        keys = self.timesteps if timesteps is None else [t for t in timesteps if t in self.per_step]
        out = []
        for i in range(0, len(keys), chunk):
            hists = [self.per_step[t] for t in keys[i : i + chunk]]
            coarse = [self._coarse(h) for h in hists]
            c = torch.stack([x[0] for x in coarse])
            counts = torch.stack([x[1] for x in coarse])
            width = torch.tensor([x[2] for x in coarse], dtype=torch.float64)
            lo0 = torch.tensor([h.min for h in hists], dtype=torch.float64)
            hi0 = torch.tensor([h.max for h in hists], dtype=torch.float64)
            lo, hi = self._search(c, counts, width, lo0, hi0, qtype, symmetric)
            out += list(zip(lo.tolist(), hi.tolist(), strict=True))
        return out


class StepAmaxObserver(Observer):
    """TensorRT's "Percentile Quant" for diffusion: per-step extremes, reduced over the early steps.

    The extremes of every observed step are taken in denoising order (noisiest step first); the
    final range is the ``reduction`` (``min`` or ``mean``) of the first ``ceil(step_percentile *
    n_steps)`` of them, so that the wide ranges of the last, nearly clean steps do not set the
    scale for the whole trajectory.

    Args:
        step_percentile: share of the steps (0, 1] used, counted from the first denoising step.
        reduction: ``min`` (the tightest range among them) or ``mean``.
    """

    name = "step-percentile"

    def __init__(self, step_percentile: float = 1.0, reduction: str = "mean", bins: int = 2048):
        super().__init__(bins)
        if not 0 < step_percentile <= 1:
            raise ValueError(f"step_percentile must be in (0, 1], got {step_percentile}")
        if reduction not in ("min", "mean"):
            raise ValueError(f"reduction must be 'min' or 'mean', got {reduction!r}")
        self.step_percentile = step_percentile
        self.reduction = reduction

    def range(self, qtype: QType, symmetric: bool, timesteps: Iterable[int] | None = None) -> tuple[float, float]:
        keys = self.timesteps if timesteps is None else [t for t in timesteps if t in self.per_step]
        if not keys:
            raise ValueError("the observer saw no data at the requested time steps")
        ordered = sorted(keys, reverse=True)  # denoising order: t = T-1 first
        used = ordered[: max(1, math.ceil(self.step_percentile * len(ordered)))]
        lo = torch.tensor([self.per_step[t].min for t in used], dtype=torch.float64)
        hi = torch.tensor([self.per_step[t].max for t in used], dtype=torch.float64)
        if symmetric:
            hi = torch.maximum(lo.abs(), hi.abs())
            lo = -hi
        if self.reduction == "min":
            return float(lo.max()), float(hi.min())
        return float(lo.mean()), float(hi.mean())


OBSERVERS = {cls.name: cls for cls in (MinMaxObserver, PercentileObserver, MseObserver, StepAmaxObserver)}


def make_observer(name: str, **kwargs) -> Observer:
    """Build an observer by name: ``minmax``, ``percentile``, ``mse`` or ``step-percentile``."""
    if name not in OBSERVERS:
        raise ValueError(f"Unknown observer {name!r}; choose one of {', '.join(OBSERVERS)}.")
    return OBSERVERS[name](**kwargs)


def recipe_observer(recipe) -> Observer:
    """A fresh observer of the kind (and settings) a :class:`~diffquant.recipe.Recipe` calibrates with."""
    kwargs = {
        "percentile": {"percentile": recipe.percentile},
        "mse": {"p": recipe.lp_norm},
        "step-percentile": {"step_percentile": recipe.step_percentile, "reduction": recipe.step_reduction},
    }.get(recipe.observer, {})
    return make_observer(recipe.observer, **kwargs)


def observed_range(recipe, qtype: QType, symmetric: bool):
    """``x -> (lo, hi)``: the range the recipe's observer picks for ``x`` seen at one step."""

    def act_range(x: torch.Tensor):
        obs = recipe_observer(recipe)
        obs.update(x, 0)
        return obs.range(qtype, symmetric)

    return act_range
