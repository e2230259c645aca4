"""Built-in models (trained by ``diffquant train``, shipped as safetensors) and their registry."""

from diffquant.models.builtin import (
    BUILTIN_MODELS,
    DENOISERS,
    UnknownModelError,
    WeightsError,
    build_model,
    load_builtin,
    load_config,
    weights_path,
)

__all__ = [
    "BUILTIN_MODELS",
    "DENOISERS",
    "UnknownModelError",
    "WeightsError",
    "build_model",
    "load_builtin",
    "load_config",
    "weights_path",
]
