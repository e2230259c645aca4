"""Save and load quantized models: a directory with ``model.safetensors``, ``recipe.json``, ``meta.json``.

A quantized diffusers pipeline also holds ``pipeline/``: the pipeline's ``save_pretrained`` of its
other components, its denoiser's ``config.json`` but not its float weights, so
``load_quantized(dir)`` rebuilds the whole pipeline alone. A bare diffusers denoiser keeps its
``config.json`` in ``denoiser/``.

Writing goes to a temporary sibling directory that is renamed into place at the end, so an
interrupted save never leaves a partial directory under the requested name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from diffquant.memory import trim
from diffquant.nn.quantizer import ActQuantizer
from diffquant.quantization_report import QuantizationReport
from diffquant.recipe import Recipe

FORMAT_VERSION = 2  # 2: TDQ generators and the identity / constant ``bucket_of_t`` tables are no longer saved
READABLE_VERSIONS = (1, 2)  # a version-1 directory loads: its extra tensors are skipped, never read
PIPELINE_DIR = "pipeline"  # a quantized pipeline's other components (diffusers' save_pretrained layout)
DENOISER_CONFIG_DIR = "denoiser"  # a bare diffusers denoiser's config.json


class QuantizedDirError(ValueError):
    """A quantized-model directory that is missing, incomplete, corrupt or for another model."""


def save_quantized(
    model: nn.Module, out_dir: str | os.PathLike, model_name: str | None = None, extra: dict | None = None
) -> Path:
    """Write a quantized model (from :func:`diffquant.quantize`) to ``out_dir`` atomically.

    Args:
        model: the quantized model (it carries ``diffquant_recipe``), or a diffusers pipeline whose
            denoiser was quantized (the denoiser is saved with the pipeline's other components in
            ``pipeline/``; ``load_quantized(out_dir)`` returns a runnable pipeline).
        out_dir: target directory; replaced if it exists.
        model_name: built-in model name, so :func:`load_quantized` can rebuild it alone.
        extra: more metadata for ``meta.json`` (e.g. calibration time).
    """
    from safetensors.torch import save_file

    from diffquant.integrations import uses_diffusers
    from diffquant.integrations.pipelines import denoiser_name, is_pipeline, save_components

    extra = dict(extra or {})
    pipe = None
    if is_pipeline(model):  # a pipeline is saved as its quantized denoiser and its other components
        pipe, component = model, denoiser_name(model)
        extra.update(pipeline_class=type(pipe).__name__, component=component)
        model = getattr(pipe, component)
    for attr, key in (("diffquant_timestep_scale", "timestep_scale"), ("diffquant_num_timesteps", "num_timesteps")):
        if getattr(model, attr, None) is not None:
            extra.setdefault(key, getattr(model, attr))
    recipe: Recipe | None = getattr(model, "diffquant_recipe", None)
    if recipe is None:
        raise ValueError("this model is not quantized (no diffquant_recipe); call diffquant.quantize first")
    out_dir = Path(out_dir)
    parent = out_dir.parent if str(out_dir.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write into {parent}: the directory is read-only; choose another --out")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=parent))
    try:
        skip = _generator_prefixes(model)
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if not k.startswith(skip)}
        save_file(
            state, str(tmp / "model.safetensors"), metadata={"format": "diffquant", "version": str(FORMAT_VERSION)}
        )
        (tmp / "recipe.json").write_text(recipe.to_json() + "\n")
        meta = {"format_version": FORMAT_VERSION, "model": model_name, "model_class": type(model).__name__}
        meta["weight_bytes"] = weight_bytes(model)
        report = getattr(model, "diffquant_report", None)
        if report is not None:  # what each method step did (SmoothQuant alphas, GPTQ error ratios, ...)
            meta["report"] = QuantizationReport.from_dict(report).to_dict()
        meta.update(extra)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if pipe is not None:
            save_components(pipe, tmp / PIPELINE_DIR)
        elif uses_diffusers(model) and hasattr(model, "save_config"):  # rebuilt from its config by load_quantized
            model.save_config(str(tmp / DENOISER_CONFIG_DIR))
        # mkdtemp makes the directory private and safetensors writes files 0600: a saved model is an
        # ordinary directory, readable by whoever may read its parent
        for p in (tmp, *tmp.rglob("*")):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=parent))
            os.replace(out_dir, old / "d")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_meta(path: str | os.PathLike) -> tuple[dict, Recipe]:
    """``(meta, recipe)`` of a quantized directory, with clear errors when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise QuantizedDirError(f"{path} is not a directory; pass the --out directory of `diffquant quantize`.")
    for name in ("meta.json", "recipe.json", "model.safetensors"):
        if not (path / name).is_file():
            raise QuantizedDirError(f"{path} is not a complete quantized model: {name} is missing.")
    try:
        meta = json.loads((path / "meta.json").read_text())
        recipe = Recipe.from_json((path / "recipe.json").read_text())
    except (json.JSONDecodeError, ValueError, TypeError) as e:
        raise QuantizedDirError(f"{path}: unreadable meta.json or recipe.json ({e}).") from e
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise QuantizedDirError(
            f"{path}: format version {meta.get('format_version')} is not one this diffquant reads "
            f"({', '.join(map(str, READABLE_VERSIONS))}); upgrade diffquant or quantize again."
        )
    return meta, recipe


@contextlib.contextmanager
def empty_weights(buffers: bool = False):
    """Modules built inside the block get their parameters on the ``meta`` device (no memory, no
    initialisation); :func:`load_quantized` fills them from the saved state.

    Args:
        buffers: persistent buffers go to ``meta`` too (they are in the saved state as well); for
            diffquant's own modules (``prepare``), whose constructors never read them. Otherwise
            buffers stay real: a model's constructor may compute with its own.
    """
    register, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    def buffer_on_meta(module, name, tensor, persistent=True):
        register_buffer(module, name, tensor, persistent)
        if tensor is not None and persistent:
            module._buffers[name] = module._buffers[name].to("meta")

    nn.Module.register_parameter = on_meta
    if buffers:
        nn.Module.register_buffer = buffer_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register, register_buffer


def load_quantized(
    path: str | os.PathLike,
    model: nn.Module | Callable[[], nn.Module] | None = None,
    num_timesteps: int | None = None,
) -> nn.Module:
    """Rebuild a quantized model from a directory written by :func:`save_quantized`.

    The model is built with its parameters on the ``meta`` device (the built-in model named in
    ``meta.json``, a diffusers denoiser from its saved config, or ``model()`` when ``model`` is a
    builder) and the saved integer weights, scales and float parameters are assigned: no FP copy of
    the weights exists and nothing is quantized again.

    Args:
        path: the directory.
        model: a builder ``model()`` of the float architecture (called with empty weights), the float
            model itself (its weights are replaced), or a freshly built diffusers pipeline (its
            denoiser is loaded in place; the pipeline is returned). Default: the built-in model named
            in ``meta.json``; for a saved pipeline the whole pipeline (its denoiser rebuilt from its
            config, its other components from ``pipeline/``); for a bare diffusers denoiser, that
            denoiser rebuilt from its config.
        num_timesteps: the model's ``T`` if not derivable from the model (or saved with it).

    Raises:
        QuantizedDirError: missing or corrupt files, or a directory made for another model.

    Example:
        >>> pipe = diffquant.load_quantized("sd15-w8a8-tdq")   # doctest: +SKIP
        >>> image = pipe("a photo of a cat").images[0]          # doctest: +SKIP
    """
    from diffquant.integrations.pipelines import denoiser_name, is_pipeline
    from diffquant.models.builtin import WeightsError, build_model, load_config, load_state_file
    from diffquant.nn.modules import QuantModule
    from diffquant.prepare import prepare

    path = Path(path)
    meta, recipe = read_meta(path)
    if is_pipeline(model):
        pipe = model
        component = meta.get("component") or denoiser_name(pipe)
        if not isinstance(getattr(pipe, component, None), nn.Module):
            raise QuantizedDirError(f"{path} holds a quantized {component!r}, which {type(pipe).__name__} has not.")
        load_quantized(path, getattr(pipe, component), num_timesteps)
        return pipe
    if model is None and meta.get("pipeline_class"):
        return _load_pipeline(path, meta, num_timesteps)
    if model is None and (path / DENOISER_CONFIG_DIR / "config.json").is_file():
        model = _diffusers_builder(path / DENOISER_CONFIG_DIR)
    num_timesteps = num_timesteps or meta.get("num_timesteps")
    on_meta = model is None or not isinstance(model, nn.Module)
    if model is None:
        if not meta.get("model"):
            raise QuantizedDirError(
                f"{path} was saved from a custom model; pass a builder of its architecture (or the model) "
                "to load_quantized(model=...)."
            )
        config = load_config(meta["model"])
        with empty_weights():
            model = build_model(config)
        model.config = config
    elif on_meta:
        with empty_weights():
            model = model()
    if meta.get("model_class") and meta["model_class"] != type(model).__name__:
        raise QuantizedDirError(
            f"{path} holds a quantized {meta['model_class']} ({meta.get('model') or 'custom'}), "
            f"not a {type(model).__name__}."
        )
    with empty_weights(buffers=True) if on_meta else contextlib.nullcontext():  # scale tables, generators: none made
        prepare(model, recipe, num_timesteps)
    legacy = (*_generator_prefixes(model), *_unsaved_tables(model))  # what a version-1 directory also holds
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            m.generator = None  # calibration machinery: its table (loaded below) is what runs
    try:
        state = load_state_file(path / "model.safetensors", keep=lambda k: not k.startswith(legacy))
    except WeightsError as e:
        raise QuantizedDirError(str(e)) from e
    for name, m in model.named_modules():
        if isinstance(m, QuantModule) and f"{name}.qweight" in state:
            m.adopt_frozen(state, f"{name}.", device="meta" if on_meta else "cpu")
        if isinstance(m, QuantModule) and f"{name}.smooth" in state and m.smooth is None:  # learned by fine-tuning
            m.smooth = torch.empty_like(state[f"{name}.smooth"], device="meta" if on_meta else "cpu")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or bad:
        raise QuantizedDirError(
            f"{path} does not match this model: {len(missing)} missing tensors {missing[:3]}, {len(unexpected)} "
            f"unexpected {unexpected[:3]}, {len(bad)} of another shape {bad[:3]}. Was it quantized from another model?"
        )
    broken = [
        k for k, v in state.items()
        if k.rsplit(".", 1)[-1] in ("weight", "bias", "weight_scale") and v.is_floating_point()
        and not bool(torch.isfinite(v).all())
    ]  # fmt: skip
    if broken:
        raise QuantizedDirError(
            f"{path} holds NaN or infinite weights in {len(broken)} tensors ({', '.join(broken[:3])}); the "
            "directory is damaged or was quantized from a diverged model: quantize again"
        )
    model.load_state_dict(state, assign=on_meta)
    if on_meta:
        left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        if left:
            raise QuantizedDirError(f"{path}: the saved state leaves {left[:3]} unset; was it saved by diffquant?")
        model.requires_grad_(False)
    if meta.get("timestep_scale") is not None:
        model.diffquant_timestep_scale = float(meta["timestep_scale"])
    if meta.get("num_timesteps") is not None:
        model.diffquant_num_timesteps = int(meta["num_timesteps"])
    if meta.get("report") is not None:
        model.diffquant_report = QuantizationReport.from_dict(meta["report"])
    return model.eval()


def _generator_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the TDQ generators: fitted during calibration and fine-tuning, not saved (the
    per-step table each one was frozen into is what a forward reads)."""
    return tuple(f"{n}.generator." for n, m in model.named_modules() if isinstance(m, ActQuantizer))


def _unsaved_tables(model: nn.Module) -> tuple[str, ...]:
    """``bucket_of_t`` names a version-1 directory holds and version 2 does not (constant or identity)."""
    return tuple(
        f"{n}.bucket_of_t" for n, m in model.named_modules() if isinstance(m, ActQuantizer) and m.mode != "bucketed"
    )


def _diffusers_builder(config_dir: Path) -> Callable[[], nn.Module]:
    from diffquant.integrations.pipelines import model_builder

    try:
        return model_builder(config_dir)
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise QuantizedDirError(f"cannot rebuild the denoiser from {config_dir}/config.json: {e}") from e


def _load_pipeline(path: Path, meta: dict, num_timesteps: int | None):
    """The pipeline saved in ``path``: its denoiser rebuilt on ``meta`` and given its integer weights, the
    other components loaded by diffusers from ``pipeline/``."""
    from diffquant.integrations.pipelines import load_pipeline

    folder = path / PIPELINE_DIR
    component = meta.get("component") or "unet"
    if not (folder / "model_index.json").is_file():
        raise QuantizedDirError(
            f"{path} holds a quantized {meta['pipeline_class']} {component} without the pipeline's other components "
            f"({PIPELINE_DIR}/ is missing: it was saved by an older diffquant); load it onto a freshly built "
            "pipeline with load_quantized(path, model=pipe), or quantize again."
        )
    denoiser = load_quantized(path, _diffusers_builder(folder / component), num_timesteps)
    trim()  # the C heap the denoiser's load freed goes back before the other components are read
    try:
        return load_pipeline(folder, denoiser)
    except (OSError, ValueError) as e:
        raise QuantizedDirError(f"{path}: cannot load the pipeline's components from {folder}: {e}") from e


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a forward needs (integer weights at their packed size, scales, biases, norms).

    TDQ generators are left out: their per-step table (in the activation quantizer) is what runs.
    """
    total, generators = 0, _generator_prefixes(model)
    for name, t in model.state_dict().items():
        if name.startswith(generators):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("weight", "bias", "qweight", "weight_scale"):
            total += t.numel() * t.element_size()
    return total
