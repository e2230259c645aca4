"""Registry of the built-in models: configs and weights ship inside the package.

Example:
    >>> from diffquant.models import load_builtin
    >>> unet = load_builtin("fashion-unet")          # doctest: +SKIP
    >>> eps = unet(x_t, t, class_labels)             # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
from torch import nn

BUILTIN_MODELS = ("fashion-unet", "fashion-dit", "fashion-features")
DENOISERS = ("fashion-unet", "fashion-dit")


class UnknownModelError(ValueError):
    """A model name that is not one of :data:`BUILTIN_MODELS`."""


class WeightsError(RuntimeError):
    """A weight file that is missing, corrupt or does not fit the model."""


def package_dir() -> Path:
    """The installed `diffquant.models` folder (configs and shipped weights)."""
    return Path(str(resources.files("diffquant.models")))


def check_name(name: str) -> str:
    """Return ``name`` if it is a built-in model, else raise :class:`UnknownModelError`."""
    if name not in BUILTIN_MODELS:
        raise UnknownModelError(f"Unknown model {name!r}. Built-in models: {', '.join(BUILTIN_MODELS)}.")
    return name


def load_config(name: str) -> dict:
    """The JSON config (architecture, noise schedule, training recipe) of a built-in model."""
    check_name(name)
    return json.loads((package_dir() / "configs" / f"{name}.json").read_text())


def weights_path(name: str) -> Path:
    """Where the shipped weights of a built-in model live."""
    return package_dir() / "weights" / f"{check_name(name)}.safetensors"


def build_model(config: dict) -> nn.Module:
    """Build an untrained model from a config dict (see ``models/configs/*.json``)."""
    from diffquant.models.denoisers import FashionDiT, FashionUNet
    from diffquant.models.features import FeatureNet

    kind, arch = config["kind"], config["model"]
    common = {"num_classes": config["num_classes"]}
    if kind == "unet":
        return FashionUNet(arch["unet"], arch.get("pixel_unshuffle", 1), sample_shape=config["sample_shape"], **common)
    if kind == "dit":
        return FashionDiT(arch["dit"], sample_shape=config["sample_shape"], **common)
    if kind == "features":
        return FeatureNet(tuple(arch["channels"]), arch["feature_dim"], dropout=arch["dropout"], **common)
    raise ValueError(f"config {config.get('name')!r} has unknown kind {kind!r}")


def load_state_file(path: str | Path, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning any failure into a :class:`WeightsError` with a clear message.

    Args:
        path: the file.
        keep: read only the tensors whose name it accepts (the others are never read from disk).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Weight file not found: {path}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(
            f"Cannot read weight file {path}: {e}. The file is corrupt or truncated; restore it "
            "(e.g. `git checkout -- <file>` or reinstall diffquant) or retrain with `diffquant train`."
        ) from e


def load_weights_into(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a safetensors state dict into ``model`` (cast to the model's dtype), strictly."""
    state = load_state_file(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or bad_shape:
        raise WeightsError(
            f"Weight file {path} does not fit this model: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(bad_shape)} with "
            f"another shape {bad_shape[:3]}. Was it written for another model or config?"
        )
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise WeightsError(
            f"Weight file {path} holds NaN or infinite values in {len(broken)} tensors ({', '.join(broken[:3])}); "
            "the file is damaged or the training that wrote it diverged. Use the shipped weights or retrain."
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model


def load_builtin(name: str, weights: str | Path | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Build a built-in model and load its shipped (or the given) weights, in eval mode, fp32.

    Args:
        name: one of :data:`BUILTIN_MODELS`.
        weights: a safetensors file to load instead of the shipped one.
        device: where to put the model.

    Returns:
        The model. Denoisers are called as ``model(x_t, t, class_labels) -> eps``; the model's
        ``config`` attribute holds its JSON config (with the noise schedule under ``"scheduler"``).
    """
    config = load_config(name)
    model = build_model(config)
    path = Path(weights) if weights is not None else weights_path(name)
    if weights is None and not path.is_file():
        raise WeightsError(
            f"The shipped weights of {name} are missing ({path}). Reinstall diffquant, or train them "
            f"with `diffquant train {config['kind']}`."
        )
    load_weights_into(model, path)
    model.config = config
    return model.to(device).eval().requires_grad_(False)
