"""Per-layer sensitivity on the trajectory and bit allocation under an average-bits budget.

Sensitivity of a layer at a weight format = the relative noise-prediction error of the model when
only that layer is quantized (weights in that format, activations as the recipe says), over
denoiser inputs recorded along the FP trajectory. Activation scales do not depend on the weight
format (they are calibrated on the FP trajectory), so one calibration serves every format.

Allocation (greedy on a knapsack): every layer starts at the low format; layers are upgraded to the
high format in order of error reduction per extra weight bit while the parameter-weighted average
stays within the budget.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from diffquant.denoiser import input_channels, input_name, noise_prediction
from diffquant.modes import switched
from diffquant.nn.modules import QuantModule
from diffquant.nn.quantizer import ActQuantizer
from diffquant.qtypes import get_qtype
from diffquant.recipe import CalibrationConfig, Override, Recipe
from diffquant.trajectory import Trajectory, has_builtin_sampler, record_builtin


@dataclass
class LayerChoice:
    """One layer's sensitivities and the chosen format."""

    name: str
    params: int
    error_low: float
    error_high: float
    upgraded: bool = False


PROBE_SAMPLES = 16  # trajectories whose calls measure the sensitivities


def _only(keep: QuantModule | None):
    """Quantize only ``keep`` (weights and its input quantizers); everything else runs in float."""
    inputs = () if keep is None else tuple(q for q in (keep.input_quantizer, keep.input_quantizer_2) if q is not None)

    def on(m) -> bool:
        return m is keep if isinstance(m, QuantModule) else isinstance(m, ActQuantizer) and m in inputs

    return on


@torch.no_grad()
def layer_errors(model: nn.Module, calls: list) -> dict[str, float]:
    """Relative eps error of each quantized layer alone over ``calls`` (recorded denoiser calls):
    ``sum ||e_q - e_fp||^2 / sum ||e_fp||^2``."""
    name = input_name(model)

    def outputs():
        return [noise_prediction(c.replay(model), input_channels(c.args, c.kwargs, name)) for c in calls]

    with switched(model, _only(None)):
        reference = outputs()
    den = max(sum(float(r.pow(2).sum()) for r in reference), 1e-30)
    errors = {}
    for layer, m in model.named_modules():
        if not isinstance(m, QuantModule) or m.weight_qtype is None:
            continue
        with switched(model, _only(m)):
            num = sum(float((e - r).pow(2).sum()) for e, r in zip(outputs(), reference, strict=True))
        errors[layer] = num / den
    return errors


def allocate(choices: list[LayerChoice], low_bits: float, high_bits: float, budget: float) -> list[LayerChoice]:
    """Greedy upgrade from ``low_bits`` to ``high_bits`` by error reduction per extra bit, within ``budget``."""
    total = sum(c.params for c in choices)
    if total == 0:
        return choices
    spent = low_bits * total
    allowed = budget * total
    order = sorted(
        choices, key=lambda c: (c.error_low - c.error_high) / (c.params * (high_bits - low_bits)), reverse=True
    )
    for c in order:
        extra = c.params * (high_bits - low_bits)
        if c.error_low > c.error_high and spent + extra <= allowed:
            c.upgraded = True
            spent += extra
    return choices


def _bits(fmt: str) -> float:
    """Nominal bits per weight (the budget counts these; group scales are reported as bytes)."""
    return float(get_qtype(fmt).bits)


NAME = "mixed_precision"


def probe_calls(model: nn.Module, recipe: Recipe, trajectory: Trajectory | None, progress: bool) -> list:
    """The calls the sensitivities are measured on: built-in models sample held-out trajectories (the
    calibration seed + 1, every 5th step of ``PROBE_SAMPLES``), other models use those of ``trajectory``."""
    cal = recipe.calibration
    probe = CalibrationConfig(
        selection="uniform", n_samples=PROBE_SAMPLES, steps=cal.steps, every=5, sampler=cal.sampler,
        seed=cal.seed + 1, batch_size=cal.batch_size,
    )  # fmt: skip
    if has_builtin_sampler(model):
        return list(record_builtin(model, probe, outputs=False, progress=progress))
    if trajectory is None:
        raise TypeError("mixed precision needs the model's FP trajectory: pass calibration=trajectory")
    return list(trajectory.select(probe))


def mixed_precision_recipe(
    model: nn.Module, recipe: Recipe, trajectory: Trajectory | None = None, progress: bool = True
) -> tuple[Recipe, list[LayerChoice]]:
    """Resolve ``recipe.weight_bits_budget`` into per-layer overrides (low format -> ``int8``).

    Each format's copy of the model (one at a time) is prepared and its activation ranges calibrated on
    ``trajectory`` (round-to-nearest weights) before its layers' sensitivities are measured.
    Returns the recipe with explicit overrides (and no budget left to resolve) and the choices.
    """
    from diffquant.calibrate import calibrate
    from diffquant.prepare import prepare

    high = recipe.replace(weights="int8", weight_group_size=None, weight_bits_budget=None)
    low = recipe.replace(weight_bits_budget=None)
    low_bits, high_bits = _bits(recipe.weights), _bits("int8")
    calls = probe_calls(model, recipe, trajectory, progress)
    errors = {}
    for key, r in (("low", low), ("high", high)):
        m = prepare(copy.deepcopy(model), r)
        if r.needs_calibration:
            calibrate(m, r, trajectory, progress)  # SmoothQuant and ranges: what sensitivities depend on
        errors[key] = layer_errors(m, calls)
        params = {
            n: mod.weight.numel()
            for n, mod in m.named_modules()
            if isinstance(mod, QuantModule) and mod.weight_qtype is not None
        }
        del m  # one prepared copy at a time beside the model, not two while the next is built
    choices = [LayerChoice(n, params[n], errors["low"][n], errors["high"][n]) for n in errors["low"]]
    allocate(choices, low_bits, high_bits, recipe.weight_bits_budget)
    overrides = tuple(Override(c.name, weights="int8", weight_group_size=0) for c in choices if c.upgraded)
    resolved = recipe.replace(overrides=recipe.overrides + overrides, weight_bits_budget=None)
    return resolved, choices
