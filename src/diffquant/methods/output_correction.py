"""Per-step output correction: undo the part of the quantization error correlated with the output.

PTQD (He et al., NeurIPS 2023) splits a quantized denoiser's error ``d = eps_q - eps`` into a part
correlated with the output, ``k_t * eps``, and a residual. A ``k_t < 0`` means the quantized model
under-predicts the noise at step ``t``, so the sampler leaves noise in the image. The correction
divides the quantized output by ``1 + k_t``. ``k_t`` is fitted by least squares on the full-precision
model's own trajectory (every step of the calibration sampler: the recorded FP noise prediction of
each call against the quantized model's on the same input), interpolated over all ``T`` training time steps and stored as a per-step
table (``gain[t] = 1 / (1 + k_t)``), so inference pays one multiply and a table lookup.

Measured on fashion-unet's ``w4a8`` (int4/g32 GPTQ), DDIM-50: ``k_t`` is -0.08 % on average over
steps 0-39 and -1.6 % at the last step (``benchmarks/results/error_by_step_fashion-unet.md``); the
correction takes the W4A8 FD gap from +22.0 % to +7.9 % at N = 500 (``ptq_table_n500.md``).

The table lives in a :class:`~diffquant.nn.output_gain.OutputCorrection` submodule
(``model.diffquant_output_correction``), so it is saved and loaded with the model; a forward hook
applies it. It is off inside :func:`diffquant.modes.full_precision`. Outputs that are tensors, tuples (first element) or
objects with a ``sample`` attribute (diffusers) are corrected; when the output has twice the input's
channels (a learned variance), only the first half (the noise prediction) is.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from diffquant.denoiser import input_channels, input_name, noise_prediction
from diffquant.modes import without_output_gain
from diffquant.nn.output_gain import ATTR, OutputCorrection, install, output_correction
from diffquant.recipe import CalibrationConfig
from diffquant.trajectory import Trajectory

__all__ = ["ATTR", "OutputCorrection", "fit_calibration", "fit_output_correction", "install", "interp"]

NAME = "output_correction"


def fit_calibration(config: CalibrationConfig, samples: int = 64) -> CalibrationConfig:
    """The trajectory rows the gains are fitted on: every step of the first ``samples`` trajectories
    (``OutputFitConfig.correction_samples``)."""
    return dataclasses.replace(config, selection="all", n_samples=min(config.n_samples, samples))


def applies(recipe) -> bool:
    return recipe.output_correction


def selections(recipe) -> list[CalibrationConfig]:
    return (
        [fit_calibration(recipe.calibration, recipe.output_fit.correction_samples)] if recipe.output_correction else []
    )


def run(model: nn.Module, recipe, trajectory: Trajectory, progress: bool = True) -> dict:
    """The output-correction step of :func:`diffquant.quantize`: ``{"k": {timestep: k_t}}``."""
    ks = fit_output_correction(model, trajectory, recipe.calibration, recipe.output_fit.correction_samples)
    return {"k": {int(t): k for t, k in ks.items()}}


@torch.no_grad()
def fit_output_correction(
    model: nn.Module, trajectory: Trajectory, config: CalibrationConfig | None = None, samples: int = 64
) -> dict:
    """Fit the gain table of a prepared (not yet frozen) model on its recorded FP trajectory.

    Each selected call (:func:`fit_calibration` of ``config``) is replayed on the quantized model
    (output gain off) and compared with the FP noise prediction recorded with it.
    Returns ``{timestep: k_t}`` of the observed steps.
    """
    oc = output_correction(model)
    if oc is None:
        raise ValueError("the model has no output correction table; prepare it with output_correction=True")
    name = input_name(model)
    num: dict[int, float] = {}
    den: dict[int, float] = {}
    with without_output_gain(model):
        for call in trajectory.select(fit_calibration(config or CalibrationConfig(), samples)):
            if call.output is None:
                continue
            eps_q = noise_prediction(call.replay(model), input_channels(call.args, call.kwargs, name))
            if eps_q is None:
                continue
            eps, d = call.output.double(), (eps_q - call.output).double()
            t = int(call.step.timestep)
            num[t] = num.get(t, 0.0) + float((d * eps).sum())
            den[t] = den.get(t, 0.0) + float((eps * eps).sum())
    ks = {t: num[t] / den[t] for t in sorted(num) if den[t] > 0}
    if not ks:
        raise ValueError(
            "output correction: no recorded call has an FP noise prediction at a sampler step "
            "(outputs must be a tensor, a tuple starting with one, or have a .sample tensor, and be recorded); "
            "quantize without it: recipe.replace(output_correction=False)"
        )
    ts = torch.tensor(sorted(ks), dtype=torch.float64)
    gains = torch.tensor([1.0 / (1.0 + ks[int(t)]) for t in ts], dtype=torch.float64)
    grid = torch.arange(oc.gain.numel(), dtype=torch.float64)
    oc.gain.copy_(interp(grid, ts, gains).to(oc.gain.dtype))
    return ks


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation (``numpy.interp``: constant beyond the ends)."""
    if xp.numel() == 1:
        return fp.expand_as(x).clone()
    idx = torch.searchsorted(xp, x).clamp(1, xp.numel() - 1)
    x0, x1, y0, y1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    w = ((x - x0) / (x1 - x0)).clamp(0, 1)
    return y0 + w * (y1 - y0)
