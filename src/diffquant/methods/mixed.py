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

from diffquant.calibrate import _builtin_runner, calibrate
from diffquant.nn.modules import QuantModule
from diffquant.nn.quantizer import ActQuantizer
from diffquant.qtypes import get_qtype
from diffquant.recipe import CalibrationConfig, Override, Recipe


@dataclass
class LayerChoice:
    """One layer's sensitivities and the chosen format."""

    name: str
    params: int
    error_low: float
    error_high: float
    upgraded: bool = False


def record_inputs(model: nn.Module, config: CalibrationConfig, runner=None, max_inputs: int = 256) -> list[tuple]:
    """Denoiser inputs ``(x, t, cond)`` at the selected steps of FP trajectories (at most ``max_inputs`` rows)."""
    from diffquant.calibrate import full_precision

    batches: list[tuple] = []
    count = 0

    def observe(m, x, t, y, rows):
        nonlocal count
        if rows and count < max_inputs:
            idx = torch.tensor(rows[: max_inputs - count])
            batches.append((x[idx].clone(), t[idx].clone(), y[idx].clone()))
            count += len(idx)
        return m(x, t, y)

    with full_precision(model):
        (runner or _builtin_runner)(model, config, observe, False)
    return batches


def _only(model: nn.Module, keep: QuantModule | None) -> None:
    """Quantize only ``keep`` (weights and its input quantizers); everything else runs in float."""
    for m in model.modules():
        if isinstance(m, QuantModule):
            m.weight_quant_enabled = m is keep
        if isinstance(m, ActQuantizer):
            m.enabled = False
    if keep is not None:
        for q in (keep.input_quantizer, keep.input_quantizer_2):
            if q is not None:
                q.enabled = True


@torch.no_grad()
def layer_errors(model: nn.Module, inputs: list[tuple]) -> dict[str, float]:
    """Relative eps error of each quantized layer alone: ``sum ||e_q - e_fp||^2 / sum ||e_fp||^2``."""
    _only(model, None)
    reference = [model(x, t, y) for x, t, y in inputs]
    errors = {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantModule) or m.weight_qtype is None:
            continue
        _only(model, m)
        num = sum(float((model(x, t, y) - r).pow(2).sum()) for (x, t, y), r in zip(inputs, reference, strict=True))
        errors[name] = num / max(sum(float(r.pow(2).sum()) for r in reference), 1e-30)
    for m in model.modules():
        if isinstance(m, QuantModule):
            m.weight_quant_enabled = True
        if isinstance(m, ActQuantizer):
            m.enabled = True
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


def mixed_precision_recipe(
    model: nn.Module, recipe: Recipe, runner=None, progress: bool = True
) -> tuple[Recipe, list[LayerChoice]]:
    """Resolve ``recipe.weight_bits_budget`` into per-layer overrides (low format -> ``int8``).

    Returns the recipe with explicit overrides (and no budget left to resolve) and the choices.
    """
    from diffquant.quantize import prepare

    high = recipe.replace(weights="int8", weight_group_size=None, weight_bits_budget=None)
    low = recipe.replace(weight_bits_budget=None)
    low_bits, high_bits = _bits(recipe.weights), _bits("int8")
    probe_config = CalibrationConfig(
        selection="uniform", n_samples=16, steps=recipe.calibration.steps, every=5,
        sampler=recipe.calibration.sampler, seed=recipe.calibration.seed + 1,
    )  # fmt: skip
    errors = {}
    inputs = None
    for key, r in (("low", low), ("high", high)):
        m = prepare(copy.deepcopy(model), r)
        if r.needs_calibration:
            calibrate(m, r, r.calibration, runner=runner, progress=progress)
        if inputs is None:
            inputs = record_inputs(m, probe_config, runner)
        errors[key] = layer_errors(m, inputs)
        params = {
            n: mod.weight.numel()
            for n, mod in m.named_modules()
            if isinstance(mod, QuantModule) and mod.weight_qtype is not None
        }
    choices = [LayerChoice(n, params[n], errors["low"][n], errors["high"][n]) for n in errors["low"]]
    allocate(choices, low_bits, high_bits, recipe.weight_bits_budget)
    overrides = tuple(Override(c.name, weights="int8", weight_group_size=0) for c in choices if c.upgraded)
    resolved = recipe.replace(overrides=recipe.overrides + overrides, weight_bits_budget=None)
    return resolved, choices
