"""SmoothQuant (Xiao et al., ICML 2023) with a per-layer search of the migration strength alpha.

For a Linear layer ``y = x W^T``, per input channel ``j``::

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        y = (x / s) (W * s)^T

moves quantization difficulty from activation outliers to the weights. NVIDIA's recipe fixes
alpha by hand; here each layer picks alpha from a grid by the output error of the quantized layer
on calibration rows drawn from every observed step, with the activation range chosen the way the
recipe's observer will choose it (a min-max search would favour smoothing where the real, clipped
range does not need it), and "no smoothing" is a candidate too: a layer without outlier channels
keeps ``s = 1``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffquant import primitives as P
from diffquant.qtypes import QType

ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))


class SmoothStats:
    """Per-channel ``max|x|`` and a bounded reservoir of input rows (memory independent of data size).

    Args:
        max_rows: rows kept for the alpha search (reservoir sampling, Vitter's algorithm R).
        seed: reservoir seed.
    """

    def __init__(self, max_rows: int = 512, seed: int = 0):
        self.absmax: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        self.seen = 0
        self.max_rows = max_rows
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        amax = flat.abs().amax(0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        for start in range(0, flat.shape[0], 4096):
            chunk = flat[start : start + 4096]
            if self.rows is None:
                self.rows = chunk[: self.max_rows].clone()
                chunk = chunk[self.max_rows :]
                self.seen = self.rows.shape[0]
            if chunk.shape[0] == 0:
                continue
            n = self.rows.shape[0]
            if n < self.max_rows:
                take = min(self.max_rows - n, chunk.shape[0])
                self.rows = torch.cat([self.rows, chunk[:take]])
                self.seen += take
                chunk = chunk[take:]
            # algorithm R: row number k (1-based) replaces a random slot with probability max_rows / k
            k = self.seen + torch.arange(1, chunk.shape[0] + 1)
            slot = (torch.rand(chunk.shape[0], generator=self.gen) * k).long()
            keep = slot < self.max_rows
            self.rows[slot[keep]] = chunk[keep]
            self.seen += chunk.shape[0]


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` for a ``(out, in)`` weight (clamped away from 0)."""
    w_absmax = weight.detach().abs().amax(0).float().clamp_min(1e-5)
    s = act_absmax.float().clamp_min(1e-5) ** alpha / w_absmax ** (1 - alpha)
    return s.clamp(1e-4, 1e4)


def layer_error(
    rows: torch.Tensor, weight: torch.Tensor, s: torch.Tensor, act_qtype: QType, weight_qtype: QType | None,
    group_size: int | None, symmetric: bool, act_range: Callable | None = None,
) -> float:  # fmt: skip
    """Relative output error of the smoothed, quantized layer on ``rows``.

    ``act_range(x) -> (lo, hi)`` picks the per-tensor activation range (default: min-max).
    """
    ref = rows @ weight.T.float()
    xs = rows / s
    lo, hi = act_range(xs) if act_range is not None else (xs.min(), xs.max())
    scale, zp = P.scale_from_range(torch.as_tensor(lo), torch.as_tensor(hi), act_qtype, symmetric)
    xq = P.fake_quant(xs, act_qtype, scale, zp, symmetric)
    ws = weight.float() * s
    wq = P.fake_quant_weight(ws, weight_qtype, group_size) if weight_qtype is not None else ws
    out = xq @ wq.T
    return float((out - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))


def search_alpha(
    stats: SmoothStats, weight: torch.Tensor, act_qtype: QType, weight_qtype: QType | None, group_size: int | None,
    symmetric: bool, grid=ALPHA_GRID, act_range: Callable | None = None, allow_off: bool = True,
) -> tuple[float | None, torch.Tensor, dict[float | None, float]]:  # fmt: skip
    """The alpha of ``grid`` with the smallest output error; returns ``(alpha, s, {alpha: error})``.

    With ``allow_off``, ``None`` (no smoothing, ``s = 1``) is a candidate and wins ties.
    ``act_range`` is passed to :func:`layer_error`.
    """
    ones = torch.ones(weight.shape[1])
    candidates = [(None, ones)] if allow_off else []
    candidates += [(a, smoothing_factors(stats.absmax, weight, a)) for a in grid]
    errors = {
        a: layer_error(stats.rows, weight, s, act_qtype, weight_qtype, group_size, symmetric, act_range)
        for a, s in candidates
    }
    best = min(errors, key=errors.get)  # the first minimum: no smoothing on a tie
    return best, dict(candidates)[best], errors


NAME = "smoothquant"


def applies(recipe) -> bool:
    return recipe.smoothquant and recipe.needs_calibration


def selections(recipe) -> list:
    """The trajectory rows SmoothQuant observes: the range calibration's."""
    return [recipe.calibration]


@torch.no_grad()
def run(model, recipe, trajectory, progress: bool = True) -> dict:
    """SmoothQuant's first pass: per-channel activation maxima and sample rows on the selected calls,
    then each layer's factors with a fixed or searched alpha (``x / s``, ``W * s``).

    Returns ``{"alphas": {layer: alpha}}`` (``None``: the search kept the layer unsmoothed).
    """
    from diffquant.modes import act_quantizers, replay_observing
    from diffquant.nn.modules import QuantModule
    from diffquant.nn.quantizer import CalibrationError
    from diffquant.observers import observed_range

    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantModule) and m.smooth is not None}
    for m in layers.values():
        m.smooth.fill_(1.0)
        m.smooth_stats = SmoothStats()
    try:
        # the input quantizers' observing flag is what lets a layer collect (QuantModule.quantize_input);
        # with no observer attached they pass the input through
        replay_observing(model, trajectory.select(recipe.calibration), act_quantizers(model))
        alphas = {}
        for name, m in layers.items():
            stats = m.smooth_stats
            if stats.absmax is None:
                raise CalibrationError(f"{name}: no calibration data reached this layer")
            if recipe.smoothquant_alpha is not None:
                alpha, s = recipe.smoothquant_alpha, smoothing_factors(stats.absmax, m.weight, recipe.smoothquant_alpha)
            else:
                q = m.input_quantizer
                alpha, s, _ = search_alpha(
                    stats, m.weight, q.qtype, m.weight_qtype, m.group_size, q.symmetric,
                    act_range=observed_range(recipe, q.qtype, q.symmetric),
                )  # fmt: skip
            m.smooth.copy_(s.to(m.smooth.dtype))
            alphas[name] = alpha
        return {"alphas": alphas}
    finally:
        for m in layers.values():
            m.smooth_stats = None
