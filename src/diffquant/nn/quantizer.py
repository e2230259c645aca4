"""Activation quantizers: one scale for all steps, one per group of steps, or computed on the fly.

Scales are registered buffers (saved by ``state_dict``): ``scale[b]`` and ``zero_point[b]`` for
bucket ``b``; a bucketed quantizer's ``bucket_of_t[t]`` maps every training time step ``t`` in
``[0, T)`` to its bucket, a TDQ table has one entry per ``t`` (:meth:`ActQuantizer.step_table`
gives the map for every mode), so any sampler and step count finds its scale with one lookup. The time step comes from
:func:`diffquant.timestep.current_step`, set by the sampler (or by the hook :func:`quantize`
installs on the model, from the model's own ``t`` argument).
"""

from __future__ import annotations

import torch
from torch import nn

from diffquant import primitives as P
from diffquant.nn.tdq import TDQGenerator
from diffquant.observers import Observer
from diffquant.qtypes import QType, get_qtype
from diffquant.timestep import require_step

MODES = ("static", "bucketed", "tdq", "dynamic")
GRANULARITIES = ("tensor", "token", "group")


class CalibrationError(RuntimeError):
    """Calibration met data it cannot use (non-finite values, no data for a quantizer)."""


class ActQuantizer(nn.Module):
    """Fake-quantizes an activation tensor (the float reference path of every backend).

    Args:
        qtype: activation format (``int8``, ``int6``, ``int4``, ``fp8_e4m3``...).
        mode: ``static`` (one scale), ``bucketed`` (one per group of steps), ``tdq`` (one per
            time step, from a fitted generator of ``t``: Temporal Dynamic Quantization) or
            ``dynamic``.
        granularity: ``tensor``, ``token`` (dynamic mode only: one scale per row/pixel) or ``group``
            (dynamic mode only: one per token and per ``group_size`` consecutive channels of it).
        symmetric: symmetric grid (zero point 0) or asymmetric (unsigned grid + zero point).
        channel_dim: the dim reduced for per-token scales (-1 for Linear inputs, 1 for Conv2d).
        buckets: number of scale buckets (1 for static).
        num_timesteps: the model's training time steps ``T``.
        name: the layer this quantizer belongs to, for error messages.
        tdq: keyword arguments of :class:`~diffquant.nn.tdq.TDQGenerator` (tdq mode).
        group_size: channels per scale of ``group`` granularity.
    """

    def __init__(
        self,
        qtype: QType | str,
        mode: str = "static",
        granularity: str = "tensor",
        symmetric: bool = False,
        channel_dim: int = -1,
        buckets: int = 1,
        num_timesteps: int = 1000,
        name: str = "",
        tdq: dict | None = None,
        group_size: int = 16,
    ):
        super().__init__()
        self.qtype = get_qtype(qtype)
        if self.qtype.kind not in ("int", "float"):
            raise ValueError(f"{self.qtype} is a weight-only format; activations take int2..int8 or fp8_e4m3")
        if mode not in MODES:
            raise ValueError(f"activation mode must be one of {MODES}, got {mode!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if granularity != "tensor" and mode != "dynamic":
            raise ValueError(f"per-{granularity} activation scales are computed on the fly: use mode='dynamic'")
        if granularity == "group" and group_size < 1:
            raise ValueError(f"per-group activation scales need group_size >= 1, got {group_size}")
        self.mode = mode
        self.granularity = granularity
        self.group_size = group_size if granularity == "group" else 0
        self.symmetric = symmetric or self.qtype.kind == "float"
        self.channel_dim = channel_dim
        self.name = name
        n = {"bucketed": buckets, "tdq": num_timesteps}.get(mode, 1)
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("zero_point", torch.zeros(n))
        self.num_timesteps = num_timesteps
        if mode == "bucketed":  # t -> index into ``scale`` (tdq: t itself; static, dynamic: 0): step_table()
            self.register_buffer("bucket_of_t", torch.zeros(num_timesteps, dtype=torch.long))
        self.generator = None  # tdq: built for calibration and fine-tuning; not saved (its table is what runs)
        self.learnable = False  # tdq: compute ranges from the generator (differentiable) instead of the table
        self.range_offset = None  # learnable mode: (2,) log-multipliers of the generator's extents
        self.scale_offset = None  # fine-tuning (static, bucketed): log-multipliers of the scales, LSQ-trained
        if mode == "tdq":
            self.generator = TDQGenerator(num_timesteps, **(tdq or {}))
        self.register_buffer("calibrated", torch.tensor(mode == "dynamic"))
        self._ready = mode == "dynamic"  # mirrors ``calibrated`` so the forward never reads a tensor
        self.observer: Observer | None = None
        self.observing = False
        self.fit_targets = None  # (time steps, optimal extents) of the last TDQ fit, for plots; not saved
        self.enabled = True

    def extra_repr(self) -> str:
        sym = "symmetric" if self.symmetric else "asymmetric"
        group = f" of {self.group_size}" if self.group_size else ""
        return f"{self.qtype}, {self.mode}, {self.granularity}{group}, {sym}, buckets={self.scale.numel()}"

    def step_table(self) -> torch.Tensor:
        """``(T,)`` long: the index into ``scale`` of every time step ``t``."""
        if self.mode == "bucketed":
            return self.bucket_of_t
        if self.mode == "tdq":
            return torch.arange(self.num_timesteps, device=self.scale.device)
        return torch.zeros(self.num_timesteps, dtype=torch.long, device=self.scale.device)

    def _timestep(self) -> int:
        return require_step(self.name).timestep

    def scale_for(self, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` used at ``timestep`` (static and bucketed modes)."""
        b = 0 if self.scale.numel() == 1 else self.bucket_of_t[timestep] if self.mode == "bucketed" else timestep
        if self.scale_offset is not None:
            return self.scale[b] * self.scale_offset[b].exp(), self.zero_point[b]
        return self.scale[b], self.zero_point[b]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing and self.observer is not None:
            t = self._timestep()
            try:
                self.observer.update(x, t)
            except FloatingPointError as e:
                raise CalibrationError(f"{self.name}: {e} during calibration") from None
            return x
        if not self.enabled:
            return x
        if self.mode == "dynamic":
            return P.dynamic_fake_quant(
                x, self.qtype, self.granularity, self.symmetric, self.channel_dim, self.group_size
            )
        if self.learnable and self.generator is not None:
            t = torch.tensor([self._timestep()], device=x.device)
            lo, hi = self.generator.ranges(t)
            lo, hi = lo[0], hi[0]
            if self.range_offset is not None:  # log-multipliers of (-lo, hi), trained by the TDQ output fit
                lo, hi = lo * self.range_offset[0].exp(), hi * self.range_offset[1].exp()
            scale, zp = self._differentiable_scale(lo, hi)
            return P.fake_quant(x, self.qtype, scale.to(x.dtype), zp.to(x.dtype), self.symmetric)
        if not self._ready:
            raise RuntimeError(f"{self.name}: activation scales are not calibrated; pass calibration to quantize().")
        scale, zp = self.scale_for(self._timestep() if self.scale.numel() > 1 else 0)
        return P.fake_quant(x, self.qtype, scale.to(x.dtype), zp.to(x.dtype), self.symmetric)

    def mark_calibrated(self) -> None:
        """Record that the scale buffers hold calibrated values."""
        self.calibrated.fill_(True)
        self._ready = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.calibrated)

    def _differentiable_scale(self, lo, hi):
        """Scale and zero point from a range, keeping the gradient w.r.t. the range (LSQ)."""
        if self.qtype.kind == "float":
            return torch.maximum(-lo, hi) / self.qtype.max_value, torch.zeros_like(hi)
        if self.symmetric:
            return torch.maximum(-lo, hi) / self.qtype.qmax, torch.zeros_like(hi)
        qmin, qmax = P.int_range(self.qtype, False)
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(P.EPS)
        return scale, (qmin - P.round_ste(lo / scale)).clamp(qmin, qmax)

    def tdq_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Observed time steps and the observer's optimal extents ``[-lo, hi]`` at each (for fitting)."""
        obs = self.observer
        if obs is None or not obs.per_step:
            raise CalibrationError(f"{self.name}: no calibration data reached this layer")
        ts = obs.timesteps
        ext = []
        for lo, hi in obs.ranges_per_step(self.qtype, self.symmetric, ts):
            amax = max(-lo, hi, 1e-8)
            ext.append([-lo, hi] if not self.symmetric else [amax, amax])
        ext = torch.tensor(ext, dtype=torch.float32)
        floor = 1e-4 * ext.max()  # an extent of 0 (e.g. after ReLU) becomes a negligible one
        return torch.tensor(ts), ext.clamp_min(floor)

    @torch.no_grad()
    def write_tdq_table(self) -> None:
        """Evaluate the generator at every ``t`` in ``[0, T)`` into the scale table (freeze)."""
        lo, hi = self.generator.ranges(torch.arange(self.scale.numel()))
        scale, zp = P.scale_from_range(lo, hi, self.qtype, self.symmetric)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)
        self.mark_calibrated()
        self.observer = None

    @torch.no_grad()
    def finalize(self, buckets: list[list[int]] | None = None) -> None:
        """Turn the observer's statistics into scales, then drop the observer.

        Args:
            buckets: for bucketed mode, the time steps of each bucket (as calibrated, in order);
                every ``t`` in ``[0, T)`` is then mapped to the bucket whose steps are nearest.
        """
        if self.mode == "dynamic":
            self.observer = None
            return
        if self.mode == "tdq":
            raise ValueError(f"{self.name}: tdq quantizers are finalized by fitting (see diffquant.calibrate)")
        obs = self.observer
        if obs is None or not obs.per_step:
            raise CalibrationError(f"{self.name}: no calibration data reached this layer")
        groups = buckets if self.mode == "bucketed" else [obs.timesteps]
        if len(groups) != self.scale.numel():
            raise ValueError(f"{self.name}: {len(groups)} step groups for {self.scale.numel()} buckets")
        fallback = None
        for b, group in enumerate(groups):
            seen = [t for t in group if t in obs.per_step]
            if seen:
                lo, hi = obs.range(self.qtype, self.symmetric, seen)
            else:  # a bucket without calibration data takes the all-steps range
                fallback = fallback or obs.range(self.qtype, self.symmetric)
                lo, hi = fallback
            scale, zp = P.scale_from_range(torch.tensor(lo), torch.tensor(hi), self.qtype, self.symmetric)
            self.scale[b], self.zero_point[b] = scale, zp
        if self.mode == "bucketed":
            self.bucket_of_t.copy_(nearest_bucket_table(groups, self.bucket_of_t.numel()))
        self.mark_calibrated()
        self.observer = None


def nearest_bucket_table(groups: list[list[int]], num_timesteps: int) -> torch.Tensor:
    """For every ``t`` in ``[0, T)``, the index of the group holding the time step nearest to ``t``."""
    ts = torch.tensor([t for g in groups for t in g], dtype=torch.float64)
    owner = torch.tensor([b for b, g in enumerate(groups) for _ in g])
    if ts.numel() == 0:
        return torch.zeros(num_timesteps, dtype=torch.long)
    dist = (torch.arange(num_timesteps, dtype=torch.float64)[:, None] - ts[None, :]).abs()
    return owner[dist.argmin(1)]
