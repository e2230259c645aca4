"""Quantized modules: activation quantizers, Linear / Conv2d, attention matmuls."""

from diffquant.nn.attention import QuantAttentionMatmuls
from diffquant.nn.modules import QMODULES, QuantConv2d, QuantEmbedding, QuantLinear, QuantModule, register_qmodule
from diffquant.nn.quantizer import ActQuantizer, CalibrationError

__all__ = [
    "QMODULES",
    "ActQuantizer",
    "CalibrationError",
    "QuantAttentionMatmuls",
    "QuantConv2d",
    "QuantEmbedding",
    "QuantLinear",
    "QuantModule",
    "register_qmodule",
]
