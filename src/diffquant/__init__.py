"""diffquant: quantize diffusion models with diffusion-aware calibration, measured.

Example:
    >>> import diffquant
    >>> from diffquant.models import load_builtin
    >>> model = diffquant.quantize(load_builtin("fashion-unet"), "w8a8")   # doctest: +SKIP
    >>> diffquant.save_quantized(model, "unet-w8a8", model_name="fashion-unet")   # doctest: +SKIP
"""

from diffquant.quantize import freeze, prepare, quantize
from diffquant.recipe import RECIPES, CalibrationConfig, Override, Recipe, get_recipe
from diffquant.serialization import load_quantized, save_quantized

__version__ = "0.1.0"

__all__ = [
    "RECIPES",
    "CalibrationConfig",
    "Override",
    "Recipe",
    "freeze",
    "get_recipe",
    "load_quantized",
    "prepare",
    "quantize",
    "save_quantized",
]
