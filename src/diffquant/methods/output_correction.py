"""Per-step output correction: undo the part of the quantization error correlated with the output.

PTQD (He et al., NeurIPS 2023) splits a quantized denoiser's error ``d = eps_q - eps`` into a part
correlated with the output, ``k_t * eps``, and a residual. A ``k_t < 0`` means the quantized model
under-predicts the noise at step ``t``, so the sampler leaves noise in the image. The correction
divides the quantized output by ``1 + k_t``. ``k_t`` is fitted by least squares on the full-precision
model's own trajectory (every step of the calibration sampler, each input evaluated by both the FP
and the quantized model), interpolated over all ``T`` training time steps and stored as a per-step
table (``gain[t] = 1 / (1 + k_t)``), so inference pays one multiply and a table lookup.

Measured on fashion-unet's ``w4a8`` (int4/g32 GPTQ), DDIM-50: ``k_t`` is -0.08 % on average over
steps 0-39 and -1.6 % at the last step (``benchmarks/results/error_by_step_fashion-unet.md``); the
correction takes the W4A8 FD gap from +22.0 % to +7.9 % at N = 500 (``ptq_table_n500.md``).

The table lives in a :class:`OutputCorrection` submodule (``model.diffquant_output_correction``), so
it is saved and loaded with the model; a forward hook applies it. It is off inside
:func:`diffquant.calibrate.full_precision`. Outputs that are tensors, tuples (first element) or
objects with a ``sample`` attribute (diffusers) are corrected; when the output has twice the input's
channels (a learned variance), only the first half (the noise prediction) is.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import torch
from torch import nn

from diffquant.calibrate import CallObserver
from diffquant.timestep import current_step

ATTR = "diffquant_output_correction"
FIT_MAX_SAMPLES = 64  # trajectories used to fit the gains


class OutputCorrection(nn.Module):
    """The per-time-step gain table and its switch."""

    def __init__(self, num_timesteps: int):
        super().__init__()
        self.register_buffer("gain", torch.ones(num_timesteps))
        self.enabled = True

    def apply_to(self, eps: torch.Tensor, channels: int | None) -> torch.Tensor:
        """``eps`` with the gain of the current step (unchanged when off or outside a step)."""
        step = current_step()
        if not self.enabled or step is None:
            return eps
        t = min(max(int(step.timestep), 0), self.gain.numel() - 1)
        return self.scale(eps, self.gain[t].reshape(1), channels)

    @staticmethod
    def scale(eps: torch.Tensor, gain: torch.Tensor, channels: int | None) -> torch.Tensor:
        """``eps * gain`` per sample (``gain``: one per sample, or one); with twice ``channels``
        output channels (a learned variance) only the first half, the noise prediction, is scaled."""
        g = gain.to(eps.dtype).reshape(-1, *([1] * (eps.dim() - 1)))
        if channels is not None and eps.dim() >= 2 and eps.shape[1] == 2 * channels:
            return torch.cat([eps[:, :channels] * g, eps[:, channels:]], 1)
        return eps * g


def _split_output(output):
    """``(tensor, rebuild)`` for the output forms denoisers return."""
    if isinstance(output, torch.Tensor):
        return output, lambda e: e
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0], lambda e: (e, *output[1:])
    if isinstance(getattr(output, "sample", None), torch.Tensor):

        def rebuild(e):
            output.sample = e
            return output

        return output.sample, rebuild
    return None, None


def _input_name(model: nn.Module) -> str | None:
    """Name of ``model.forward``'s first parameter, the noisy input (``x``, ``sample``, ``hidden_states``)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [p for p in inspect.signature(model.forward).parameters.values() if p.kind in kinds]
    return params[0].name if params else None


def _input_channels(args, kwargs, name: str | None) -> int | None:
    """Channels of the noisy input, passed first or by its parameter ``name``."""
    x = args[0] if args else kwargs.get(name) if name else None
    return int(x.shape[1]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else None


def install(model: nn.Module, num_timesteps: int) -> OutputCorrection:
    """Attach an identity correction table and the hook that applies it (idempotent)."""
    oc = getattr(model, ATTR, None)
    if isinstance(oc, OutputCorrection):
        return oc
    oc = OutputCorrection(num_timesteps)
    model.add_module(ATTR, oc)
    name = _input_name(model)

    def hook(module, args, kwargs, output):
        eps, rebuild = _split_output(output)
        table = getattr(module, ATTR, None)  # looked up, not closed over: a deep copy uses its own
        if eps is None or table is None:
            return output
        return rebuild(table.apply_to(eps, _input_channels(args, kwargs, name)))

    # prepended: it must run while the step hook's time step is still current
    model._diffquant_output_hook = model.register_forward_hook(hook, prepend=True, with_kwargs=True)
    return oc


class _ErrorCollector(CallObserver):
    """Observer that, for each observed FP call, runs the quantized model on the same input and
    accumulates per time step ``sum(d * eps)`` and ``sum(eps * eps)`` with ``d = eps_q - eps``."""

    def __init__(self, model: nn.Module, swap: Callable[[bool], None]):
        super().__init__(model)
        self.swap = swap
        self.input_name = _input_name(model)
        self.num: dict[int, float] = {}
        self.den: dict[int, float] = {}

    def on_call(self, args, kwargs, output, step):
        from diffquant.calibrate import quantized
        from diffquant.timestep import denoising_step

        eps, _ = _split_output(output)
        if eps is None:
            return
        # the forward under any runner's wrapper (``__wrapped__``), without hooks: the step is set here
        forward = getattr(self.model.forward, "__wrapped__", self.model.forward)
        self.busy = True
        self.swap(False)
        try:
            with quantized(self.model), denoising_step(step.index, step.timestep, step.num_steps):
                eps_q, _ = _split_output(forward(*args, **kwargs))
        finally:
            self.swap(True)
            self.busy = False
        c = _input_channels(args, kwargs, self.input_name)
        if c is not None and eps.shape[1] == 2 * c:
            eps, eps_q = eps[:, :c], eps_q[:, :c]
        eps, d = eps.double(), (eps_q - eps).double()
        t = int(step.timestep)
        self.num[t] = self.num.get(t, 0.0) + float((d * eps).sum())
        self.den[t] = self.den.get(t, 0.0) + float((eps * eps).sum())


@torch.no_grad()
def fit_output_correction(
    model: nn.Module, config, runner: Callable | None = None, progress: bool = True, fp_weights: dict | None = None
) -> dict:
    """Fit the gain table of a prepared (not yet frozen) model on its FP trajectory.

    ``fp_weights`` maps modules to their float weights when the model's own were replaced by rounded
    ones (GPTQ): the FP calls use those, the quantized calls the model's.
    Returns ``{timestep: k_t}`` of the observed steps.
    """
    from diffquant.calibrate import _builtin_runner, _make_observe, full_precision
    from diffquant.methods.gptq import weight_swap

    oc = getattr(model, ATTR, None)
    if not isinstance(oc, OutputCorrection):
        raise ValueError("the model has no output correction table; prepare it with output_correction=True")
    config = dataclasses.replace(config, selection="all", n_samples=min(config.n_samples, FIT_MAX_SAMPLES))
    swap = weight_swap(fp_weights or {})
    collector = _ErrorCollector(model, swap)
    swap(True)
    try:
        with full_precision(model):
            (runner or _builtin_runner)(model, config, _make_observe(model, [collector]), progress)
    finally:
        swap(False)
        collector.remove()
    ks = {t: collector.num[t] / collector.den[t] for t in sorted(collector.num) if collector.den[t] > 0}
    if not ks:
        raise ValueError(
            "output correction: no calibration call returned a tensor noise prediction at a sampler step "
            "(outputs must be a tensor, a tuple starting with one, or have a .sample tensor); "
            "quantize without it: recipe.replace(output_correction=False)"
        )
    ts = torch.tensor(sorted(ks), dtype=torch.float64)
    gains = torch.tensor([1.0 / (1.0 + ks[int(t)]) for t in ts], dtype=torch.float64)
    grid = torch.arange(oc.gain.numel(), dtype=torch.float64)
    oc.gain.copy_(_interp(grid, ts, gains).to(oc.gain.dtype))
    return ks


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation (``numpy.interp``: constant beyond the ends)."""
    if xp.numel() == 1:
        return fp.expand_as(x).clone()
    idx = torch.searchsorted(xp, x).clamp(1, xp.numel() - 1)
    x0, x1, y0, y1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    w = ((x - x0) / (x1 - x0)).clamp(0, 1)
    return y0 + w * (y1 - y0)
