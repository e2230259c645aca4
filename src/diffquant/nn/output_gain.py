"""The per-time-step output gain table (PTQD's correlated-noise correction, fitted by
:mod:`diffquant.methods.output_correction`) and the forward hook that applies it.

The table is model state: a submodule ``model.diffquant_output_correction`` (so ``state_dict``
saves it) holding ``gain[t]`` for every training time step ``t``; the hook multiplies the noise
prediction by the gain of the current step. When the output has twice the input's channels (a
learned variance), only the first half is scaled.
"""

from __future__ import annotations

import torch
from torch import nn

from diffquant.denoiser import input_channels, input_name, split_output
from diffquant.timestep import current_step

ATTR = "diffquant_output_correction"


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


class OutputGainHook:
    """Forward hook applying the model's :class:`OutputCorrection` table to its output."""

    def __init__(self, model: nn.Module):
        self.input_name = input_name(model)
        # prepended: it must run while the step hook's time step is still current
        self.handle = model.register_forward_hook(self, prepend=True, with_kwargs=True)

    def __call__(self, module, args, kwargs, output):
        eps, rebuild = split_output(output)
        table = getattr(module, ATTR, None)  # looked up, not closed over: a deep copy uses its own
        if eps is None or table is None:
            return output
        return rebuild(table.apply_to(eps, input_channels(args, kwargs, self.input_name)))

    def remove(self) -> None:
        self.handle.remove()


def output_correction(model: nn.Module) -> OutputCorrection | None:
    """The model's gain table, or ``None``."""
    oc = getattr(model, ATTR, None)
    return oc if isinstance(oc, OutputCorrection) else None


def install(model: nn.Module, num_timesteps: int) -> OutputCorrection:
    """Attach an identity correction table and the hook that applies it (idempotent)."""
    oc = output_correction(model)
    if oc is not None:
        return oc
    oc = OutputCorrection(num_timesteps)
    model.add_module(ATTR, oc)
    model._diffquant_output_hook = OutputGainHook(model)
    return oc
