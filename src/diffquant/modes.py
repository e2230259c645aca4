"""Quant on/off modes of a prepared model: run it in float, quantized, or observing.

Every switch a prepared model has is listed once here (:func:`quant_switches`): the weight
fake-quant of each quantized layer, each activation quantizer, and the output gain table. The
context managers set them for a block and restore what was there before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from diffquant.nn.modules import QuantModule
from diffquant.nn.output_gain import OutputCorrection
from diffquant.nn.quantizer import ActQuantizer


def quant_switches(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, attribute)`` of every quantization switch in ``model``."""
    out: list[tuple[nn.Module, str]] = []
    for m in model.modules():
        if isinstance(m, QuantModule):
            out.append((m, "weight_quant_enabled"))
        elif isinstance(m, (ActQuantizer, OutputCorrection)):
            out.append((m, "enabled"))
    return out


@contextlib.contextmanager
def switched(model: nn.Module, on=True):
    """Set every switch to ``on``, or to ``on(module)`` when ``on`` is callable, inside the block."""
    switches = quant_switches(model)
    before = [getattr(m, a) for m, a in switches]
    for m, a in switches:
        setattr(m, a, on(m) if callable(on) else on)
    try:
        yield
    finally:
        for (m, a), b in zip(switches, before, strict=True):
            setattr(m, a, b)


def full_precision(model: nn.Module):
    """Run the model in float: weight fake-quant, activation quantizers and the output gain off."""
    return switched(model, False)


def quantized(model: nn.Module):
    """Run the model quantized (inside :func:`full_precision`, for comparing the two on one input)."""
    return switched(model, True)


def activations_only(model: nn.Module):
    """Activation quantizers on; weight fake-quant and the output gain off."""
    return switched(model, lambda m: isinstance(m, ActQuantizer))


def without_output_gain(model: nn.Module):
    """Everything quantized but the output gain table (fitting what comes before it)."""
    return switched(model, lambda m: not isinstance(m, OutputCorrection))


@contextlib.contextmanager
def observing(observers: Iterable, on: bool = True):
    """Set the ``observing`` flag of ``observers`` (activation quantizers, collectors) inside the block."""
    observers = list(observers)
    before = [q.observing for q in observers]
    for q in observers:
        q.observing = on
    try:
        yield
    finally:
        for q, b in zip(observers, before, strict=True):
            q.observing = b


def replay_observing(model: nn.Module, calls: Iterable, observers: Iterable) -> int:
    """Replay recorded calls (:meth:`~diffquant.trajectory.DenoiserCall.replay`) on ``model`` in float
    with ``observers`` observing; returns the number of calls replayed."""
    n = 0
    with torch.no_grad(), full_precision(model), observing(observers):
        for call in calls:
            call.replay(model)
            n += 1
    return n


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    """The activation quantizers of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def quant_modules(model: nn.Module) -> list[QuantModule]:
    """The quantized layers of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, QuantModule)]
