"""The denoiser call contract: what diffquant assumes about ``model(x, t, ...)`` and its output.

A denoiser is any ``nn.Module`` whose ``forward`` takes the noisy input first and a time-step
argument named one of :data:`TIMESTEP_ARGS`; it returns the noise prediction as a tensor, a tuple
starting with one, or an object with a ``sample`` tensor (diffusers). When the output has twice the
input's channels (a learned variance), the first half is the noise prediction. Calls are carried
around as ``(args, kwargs)``; the helpers here walk them without knowing the model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

TIMESTEP_ARGS = ("t", "timestep", "timesteps")


class UnsupportedModelError(TypeError):
    """The model cannot be quantized as given (e.g. its forward has no time-step argument)."""


def timestep_argument(model: nn.Module) -> tuple[str, int]:
    """Name and position of the time-step argument of ``model.forward``.

    Raises:
        UnsupportedModelError: naming the signature found and the one expected.
    """
    params = [p for p in inspect.signature(model.forward).parameters.values() if p.name != "self"]
    for i, p in enumerate(params):
        if p.name in TIMESTEP_ARGS:
            return p.name, i
    found = ", ".join(p.name for p in params)
    raise UnsupportedModelError(
        f"{type(model).__name__}.forward({found}) has no time-step argument. diffquant quantizes "
        f"denoisers called as forward(x, t, ...) with the time step named one of {', '.join(TIMESTEP_ARGS)} "
        "(diffusers UNets and transformers take `timestep`); wrap the model so its forward has one."
    )


def timestep_of(args: tuple, kwargs: dict, name: str, pos: int) -> torch.Tensor | None:
    """The time-step argument of one call (``None`` if it was not passed)."""
    t = kwargs[name] if name in kwargs else args[pos] if len(args) > pos else None
    return None if t is None else torch.as_tensor(t)


def input_name(model: nn.Module) -> str | None:
    """Name of ``model.forward``'s first parameter, the noisy input (``x``, ``sample``, ``hidden_states``)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [p for p in inspect.signature(model.forward).parameters.values() if p.kind in kinds]
    return params[0].name if params else None


def noisy_input(args: tuple, kwargs: dict, name: str | None) -> torch.Tensor | None:
    """The noisy input of one call, passed first or by its parameter ``name``."""
    x = args[0] if args else kwargs.get(name) if name else None
    return x if isinstance(x, torch.Tensor) else None


def input_channels(args: tuple, kwargs: dict, name: str | None) -> int | None:
    """Channels of the noisy input, passed first or by its parameter ``name``."""
    x = noisy_input(args, kwargs, name)
    return int(x.shape[1]) if x is not None and x.dim() >= 2 else None


def split_output(output) -> tuple[torch.Tensor | None, Callable | None]:
    """``(noise prediction tensor, rebuild)`` for the output forms denoisers return (``(None, None)``: unknown)."""
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


def noise_prediction(output, channels: int | None) -> torch.Tensor | None:
    """The noise prediction in ``output``: its first ``channels`` channels when it has twice as many."""
    eps, _ = split_output(output)
    if eps is not None and channels is not None and eps.dim() >= 2 and eps.shape[1] == 2 * channels:
        eps = eps[:, :channels]
    return eps


def map_tensors(fn: Callable, value, leaves: tuple[type, ...] = (torch.Tensor,)):
    """``value`` with ``fn`` applied to every tensor (or other ``leaves``) in it (tuples, lists, dicts walked)."""
    if isinstance(value, leaves):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(fn, v, leaves) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(fn, v, leaves) for k, v in value.items()}
    return value


def clone_tensors(value):
    """Detached copies of the tensors in a call's arguments."""
    return map_tensors(lambda t: t.detach().clone(), value)


def take_rows(value, rows: torch.Tensor, batch: int):
    """``value`` with every tensor whose first dimension is the batch (``batch``) cut to ``rows``."""
    return map_tensors(lambda t: t[rows] if t.dim() >= 1 and t.shape[0] == batch else t, value)


def batch_size(args: tuple, kwargs: dict) -> int | None:
    """The batch of one call: the first dimension of its first tensor argument with one."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and a.dim() >= 1:
            return int(a.shape[0])
    return None
