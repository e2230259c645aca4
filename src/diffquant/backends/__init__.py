"""Execution backends: run a quantized model on real integer kernels instead of fake quant.

``reference`` is the float fake-quant path every backend is tested against; ``cpu`` runs int8
convolutions and matmuls on oneDNN (:mod:`diffquant.backends.cpu`).

Example:
    >>> from diffquant.backends import lower
    >>> model, report = lower(qmodel, "cpu")   # doctest: +SKIP
    >>> print(report.summary())                # doctest: +SKIP
"""

from __future__ import annotations

from torch import nn

BACKENDS = ("reference", "cpu")


def lower(model: nn.Module, backend: str = "cpu", **kwargs):
    """Prepare a quantized model for ``backend`` (in place). Returns ``(model, report or None)``."""
    if backend == "reference":
        return model, None
    if backend == "cpu":
        from diffquant.backends.cpu import lower as lower_cpu

        return lower_cpu(model, **kwargs)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
