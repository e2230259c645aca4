"""The current denoising step, set explicitly by the sampler for everything that needs it.

Quantized modules with per-step state (scale tables, TDQ) read :func:`current_step`; the
sampler enters :func:`denoising_step` around each model call. Nothing counts calls, and the
context is empty outside a sampler step, so state cannot leak from one generation to the next.

Compiled graphs cannot read a Python context: they index their per-step tables with
:func:`step_tensor`, the same step as a tensor, written whenever a step becomes current.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch


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

# The current step as one ``(1,)`` long tensor per device, for compiled graphs. A module-level tensor
# is lifted by Dynamo as a graph input, so neither the graph nor Inductor's freezing treats it as a
# constant (a tensor attribute of a module was folded into the first step's value), and it is
# written in place, once per model call, by whatever makes a step current: a per-layer opaque
# lookup op instead cost 6 % of a compiled fashion-unet call (63 lookups, ``benchmarks/tdq_overhead.py``).
# One set for the process: compiled models on different threads at different steps at once would
# race (eager code reads the step of its own context).
_STEP_TENSORS: dict[str, torch.Tensor] = {}


def step_tensor(device: torch.device | str = "cpu") -> torch.Tensor:
    """``(1,)`` long on ``device``: the time step of the last :func:`denoising_step` / model call that set one.

    Create it eagerly (before tracing) for every device a compiled graph will read it on; it is
    ``-1``, an index error rather than another step's value, until a step is set.
    """
    key = str(torch.device(device))
    if key not in _STEP_TENSORS:
        _STEP_TENSORS[key] = torch.full((1,), -1, dtype=torch.long, device=device)
    return _STEP_TENSORS[key]


@torch.compiler.disable  # eager even inside a compiled caller: graphs only read the tensors
def _write_step_tensors(info: StepInfo | None) -> None:
    if info is not None:
        for tensor in _STEP_TENSORS.values():
            tensor.fill_(info.timestep)


def _enter(info: StepInfo) -> contextvars.Token:
    token = _CURRENT.set(info)
    _write_step_tensors(info)
    return token


def _leave(token: contextvars.Token) -> None:
    _CURRENT.reset(token)
    _write_step_tensors(_CURRENT.get())  # back to an enclosing step, if any


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
    token = _enter(StepInfo(int(index), int(timestep), int(num_steps)))
    try:
        yield
    finally:
        _leave(token)


class StepHook:
    """Forward hooks that make a model's own time-step argument the current step when no sampler has set one.

    Args:
        model: the denoiser; its ``diffquant_timestep_scale`` (pipelines that pass a rescaled ``t``,
            Flux: ``t / 1000``) maps the argument back to the training time step.
        read_t: ``read_t(args, kwargs) -> tensor | None``: the call's time-step argument.
    """

    def __init__(self, model, read_t):
        self.read_t = read_t
        self.tokens: list = []
        self.handles = (
            model.register_forward_pre_hook(self.pre, with_kwargs=True),
            model.register_forward_hook(self.post, with_kwargs=True, always_call=True),
        )

    def pre(self, module, args, kwargs):
        t = None if current_step() is not None else self.read_t(args, kwargs)
        if t is None:
            self.tokens.append(None)
            return
        flat = t.flatten()
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            raise ValueError(
                "a quantized model with per-step scales needs one time step per call; got a batch of "
                "different time steps (sample them in separate calls)"
            )
        scale = getattr(module, "diffquant_timestep_scale", 1.0)
        self.tokens.append(_enter(StepInfo(-1, round(float(flat[0]) * scale), -1)))

    def post(self, module, args, kwargs, output):
        token = self.tokens.pop() if self.tokens else None
        if token is not None:
            _leave(token)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
