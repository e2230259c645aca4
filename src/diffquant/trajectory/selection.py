"""Which (step, sample) pairs of a trajectory a :class:`~diffquant.recipe.CalibrationConfig` observes.

``single`` (one step), ``uniform`` (Q-Diffusion, Li et al. 2023: every k-th step), ``ndtc``
(PTQ4DM, Shang et al. 2023: per sample, the step nearest ``t = int(N(0.4, 0.4) T)`` clamped to
``[0, T)``), ``all``.
"""

from __future__ import annotations

import numpy as np

from diffquant.recipe import CalibrationConfig


def selected_rows(config: CalibrationConfig, timesteps: list[int], n: int, num_timesteps: int) -> list[list[int]]:
    """For each sampler step index, the calibration samples (0..n-1) observed at it."""
    steps = len(timesteps)
    rows: list[list[int]] = [[] for _ in range(steps)]
    everyone = list(range(n))
    if steps == 0:
        return rows
    if config.selection == "all":
        return [everyone[:] for _ in range(steps)]
    if config.selection == "single":
        rows[config.single_index % steps] = everyone
        return rows
    if config.selection == "uniform":
        chosen = (
            range(0, steps, config.every) if config.uniform_from == "first" else range(steps - 1, -1, -config.every)
        )
        for k in chosen:
            rows[k] = everyone[:]
        return rows
    # ndtc: t_i = clamp(int(N(mean, std) * T), 0, T - 1); observe sample i at the step nearest t_i
    rng = np.random.default_rng(config.seed)
    t_draw = np.clip(
        (rng.normal(config.ndtc_mean, config.ndtc_std, n) * num_timesteps).astype(int), 0, num_timesteps - 1
    )
    ts = np.asarray(timesteps)
    for i, t in enumerate(t_draw):
        rows[int(np.abs(ts - t).argmin())].append(i)
    return rows


def step_buckets(timesteps: list[int], buckets: int) -> list[list[int]]:
    """Split a schedule's time steps (noisiest first) into ``buckets`` contiguous groups; with fewer
    steps than buckets the groups past the steps are empty (they take the all-steps range and own
    no time step), so a one-bucket-per-step recipe runs on a shorter recorded loop."""
    return [list(map(int, g)) for g in np.array_split(np.asarray(timesteps), buckets)]  # empty groups come last


def union_rows(configs: list[CalibrationConfig], timesteps: list[int], num_timesteps: int) -> list[set[int]]:
    """Per step index, the samples any of ``configs`` observes (what a recording must keep)."""
    keep: list[set[int]] = [set() for _ in timesteps]
    for c in configs:
        for k, rows in enumerate(selected_rows(c, timesteps, c.n_samples, num_timesteps)):
            keep[k].update(rows)
    return keep
