"""diffquant: quantize diffusion models with diffusion-aware calibration, measured.

Example:
    >>> import diffquant
    >>> from diffquant.models import load_builtin
    >>> model = diffquant.quantize(load_builtin("fashion-unet"), "w8a8")   # doctest: +SKIP
    >>> diffquant.save_quantized(model, "unet-w8a8", model_name="fashion-unet")   # doctest: +SKIP
"""

from diffquant.prepare import freeze, prepare
from diffquant.quantization_report import QuantizationReport
from diffquant.quantize import calibrating, finetune, quantize
from diffquant.recipe import RECIPES, CalibrationConfig, Override, Recipe, get_recipe
from diffquant.serialization import load_quantized, save_quantized
from diffquant.trajectory import DenoiserCall, Trajectory, recording

__version__ = "0.1.0"

__all__ = [
    "RECIPES",
    "CalibrationConfig",
    "DenoiserCall",
    "Override",
    "QuantizationReport",
    "Recipe",
    "Trajectory",
    "calibrating",
    "finetune",
    "freeze",
    "get_recipe",
    "load_quantized",
    "prepare",
    "quantize",
    "recording",
    "save_quantized",
]
