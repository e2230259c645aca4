"""Helpers shared by the backend tests: tiny quantized models, inputs, per-layer reference inputs."""

import torch

from diffquant import CalibrationConfig, quantize
from diffquant.nn import QuantModule
from tests.conftest import tiny_model

# DDPM clips its x0 estimate, so the random tiny models' calibration trajectories stay in range; their
# unclipped DDIM trajectories diverge (ranges ~100x the test inputs, 2-3 codes in use, where one
# rounding-tie difference between two quantizer implementations costs ~27 dB in a layer)
CAL = CalibrationConfig(n_samples=4, steps=6, every=2, batch_size=4, sampler="ddpm")


def inputs(model, t=500, n=3):
    """``(x, t, labels)`` for a tiny built-in-style model: a conditional, an unconditional and another label."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *model.sample_shape, generator=g), torch.full((n,), t), torch.tensor([3, 10, 1][:n])


def quantized(kind, recipe):
    """A tiny model quantized with ``recipe`` (the small calibration unless the recipe observes all steps)."""
    cal = None if recipe.calibration.selection == "all" else CAL
    return quantize(tiny_model(kind), recipe, cal, progress=False)


def layer_inputs(model, x, t, y) -> dict[str, torch.Tensor]:
    """The input of every quantized layer in one reference forward."""
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, args[0].clone()))
        for name, m in model.named_modules()
        if isinstance(m, QuantModule)
    ]
    with torch.no_grad():
        model(x, t, y)
    for h in hooks:
        h.remove()
    return seen
