"""Execution backends: run a quantized model on real integer kernels instead of fake quant.

``reference`` is the float fake-quant path every backend is tested against; ``cpu`` runs int8
convolutions and matmuls on oneDNN (:mod:`diffquant.backends.cpu`); ``cuda`` runs them as int8
GEMMs (``torch._int_mm``) and FP8 E4M3 GEMMs (``torch._scaled_mm``) on NVIDIA GPUs
(:mod:`diffquant.backends.cuda`; the same code runs, slowly, on a CPU, for testing).

Example:
    >>> from diffquant.backends import lower
    >>> model, report = lower(qmodel, "cpu")   # doctest: +SKIP
    >>> print(report.summary())                # doctest: +SKIP
"""

from __future__ import annotations

from torch import nn

BACKENDS = ("reference", "cpu", "cuda")


def lower(model: nn.Module, backend: str = "cpu", **kwargs):
    """Prepare a quantized model for ``backend`` (in place). Returns ``(model, report or None)``.

    ``model`` may be a diffusers pipeline whose denoiser was quantized: its ``unet`` /
    ``transformer`` is lowered and the pipeline returned.
    """
    from diffquant.integrations.pipelines import denoiser_name, is_pipeline

    if is_pipeline(model):
        _, report = lower(getattr(model, denoiser_name(model)), backend, **kwargs)
        return model, report
    if backend == "reference":
        return model, None
    if backend == "cpu":
        from diffquant.backends.cpu import lower as lower_cpu

        return lower_cpu(model, **kwargs)
    if backend == "cuda":
        from diffquant.backends.cuda import lower as lower_cuda

        return lower_cuda(model, **kwargs)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
