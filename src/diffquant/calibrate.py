"""Range calibration: activation observers on the FP model's own trajectory, then scales.

The prepared model replays the recorded calls (:class:`~diffquant.trajectory.Trajectory`) that the
recipe's :class:`~diffquant.recipe.CalibrationConfig` selects, in float (weight and activation
quantization off, so every layer sees the FP model's inputs), with its activation quantizers
observing. Nothing is kept but the observers' per-step histograms, so memory does not grow with
the number of calibration samples. Then static and bucketed quantizers take their scales and TDQ
generators are fitted to the per-step optimal ranges (:func:`fit_tdq`).

Step selection (``single``, ``uniform``, ``ndtc``, ``all``): :mod:`diffquant.trajectory.selection`.
"""

from __future__ import annotations

import torch
from torch import nn

from diffquant.modes import act_quantizers, replay_observing
from diffquant.nn.quantizer import ActQuantizer, CalibrationError
from diffquant.observers import recipe_observer
from diffquant.recipe import CalibrationConfig, Recipe
from diffquant.trajectory import Trajectory, step_buckets

NAME = "ranges"


def fit_tdq(quantizers: list[ActQuantizer], recipe: Recipe) -> list[float]:
    """Fit the TDQ generators of ``quantizers`` to their per-step optimal ranges, then freeze tables.

    Returns the RMS log-range error of each fit (how far the smooth ``g(t)`` is from the per-step optimum).
    """
    from diffquant.methods.tdq import fit_generators

    if not quantizers:
        return []
    pairs = [q.tdq_targets() for q in quantizers]
    for q, pair in zip(quantizers, pairs, strict=True):
        q.fit_targets = pair  # in memory, for plots (report.plots.plot_tdq_intervals); not saved
    errors = fit_generators(
        [q.generator for q in quantizers], [p[0] for p in pairs], [p[1] for p in pairs], iters=recipe.tdq_iters
    )
    for q in quantizers:
        q.write_tdq_table()
    return errors


def applies(recipe: Recipe) -> bool:
    return recipe.needs_calibration


def selections(recipe: Recipe) -> list[CalibrationConfig]:
    """The trajectory rows range calibration observes."""
    return [recipe.calibration]


@torch.no_grad()
def run(model: nn.Module, recipe: Recipe, trajectory: Trajectory, progress: bool = True) -> dict:
    """Observe activations on the selected calls and set every static / bucketed / TDQ quantizer's scales.

    Args:
        model: a model prepared by :func:`diffquant.prepare`.
        recipe: gives the observer, the bucket count and the calibration selection.
        trajectory: the recorded FP trajectory.
        progress: a progress bar over the replayed calls.

    Returns:
        ``{"calls": replayed calls, "quantizers": calibrated quantizers, "tdq_fit_rms": [...]}``.
    """
    from tqdm.auto import tqdm

    quants = [q for q in act_quantizers(model) if q.mode != "dynamic"]
    for q in quants:
        q.observer = recipe_observer(recipe)
    selected = trajectory.select(recipe.calibration)
    try:
        bar = tqdm(
            selected, total=len(selected), desc="observing ranges", unit="call", disable=not progress, leave=False
        )
        calls = replay_observing(model, bar, quants)
        if not calls:
            raise CalibrationError(
                "calibration: the trajectory has no call at the steps and samples the recipe's calibration "
                f"selects ({recipe.calibration.selection!r}, {len(trajectory)} calls recorded)"
            )
        groups = step_buckets(trajectory.timesteps, recipe.buckets) if recipe.act_mode == "bucketed" else None
        for q in quants:
            if q.mode != "tdq":
                q.finalize(groups)
        errors = fit_tdq([q for q in quants if q.mode == "tdq"], recipe)
    finally:
        for q in quants:
            q.observer = None
            q.observing = False
    return {"calls": calls, "quantizers": len(quants), "tdq_fit_rms": errors}


def calibrate(model: nn.Module, recipe: Recipe, trajectory: Trajectory, progress: bool = True) -> dict:
    """SmoothQuant (when the recipe asks for it), then range calibration: the activation steps of
    :func:`diffquant.quantize` on a prepared model."""
    from diffquant.methods import smoothquant

    report = {}
    if smoothquant.applies(recipe):
        report[smoothquant.NAME] = smoothquant.run(model, recipe, trajectory, progress)
    report[NAME] = run(model, recipe, trajectory, progress)
    return report
