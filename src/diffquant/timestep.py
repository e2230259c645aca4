"""The current denoising step, set explicitly by the sampler for everything that needs it.

Quantized modules with per-step state (scale tables, TDQ) read :func:`current_step`; the
sampler enters :func:`denoising_step` around each model call. Nothing counts calls, and the
context is empty outside a sampler step, so state cannot leak from one generation to the next.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass


@dataclass(frozen=True)
class StepInfo:
    """Where a model call sits in a sampling run.

    Attributes:
        index: position in the sampler's schedule, 0 for the first (noisiest) call.
        timestep: the discrete training time step ``t`` in ``[0, T)`` the model is called at.
        num_steps: number of model evaluations in the schedule.
    """

    index: int
    timestep: int
    num_steps: int


_CURRENT: contextvars.ContextVar[StepInfo | None] = contextvars.ContextVar("diffquant_step", default=None)


def current_step() -> StepInfo | None:
    """The step being evaluated, or ``None`` outside a sampler step."""
    return _CURRENT.get()


def require_step(who: str) -> StepInfo:
    """The current step, or a ``RuntimeError`` naming ``who`` and saying how to provide one."""
    step = _CURRENT.get()
    if step is None:
        raise RuntimeError(
            f"{who}: no current time step. Call the quantized model as model(x, t, ...) "
            "or inside diffquant.timestep.denoising_step(...)."
        )
    return step


@contextlib.contextmanager
def denoising_step(index: int, timestep: int, num_steps: int):
    """Context manager that makes ``StepInfo(index, timestep, num_steps)`` current."""
    token = _CURRENT.set(StepInfo(int(index), int(timestep), int(num_steps)))
    try:
        yield
    finally:
        _CURRENT.reset(token)
