"""Quantization methods beyond plain calibration: Temporal Dynamic Quantization (TDQ)."""

from diffquant.methods.tdq import TDQGenerator, fit_generators

__all__ = ["TDQGenerator", "fit_generators"]
