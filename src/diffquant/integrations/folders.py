"""Models from diffusers folders and the local Hugging Face cache, for ``diffquant quantize --model``.

    pipe_or_unet = load_model("path/to/stable-diffusion")      # model_index.json: a pipeline
    pipe_or_unet = load_model("path/to/unet")                  # config.json of a diffusers model class
    pipe_or_unet = load_model("org/name")                      # a hub id, from the local cache only

A pipeline calibrates by running itself (:mod:`diffquant.integrations.pipelines`). A bare denoiser
folder has no pipeline to run, so :func:`random_latent_sampler` stands in for one: DDIM from random
latents with random conditioning (random text embeddings, random class labels). That is a stand-in,
not what inference sees: the activations of real prompts through the model's own text encoder and
scheduler differ, so quantize the pipeline folder (or pass your own sampling loop to
:func:`diffquant.quantize`) when you have one.

diffusers is imported inside the functions only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from diffquant.denoiser import UnsupportedModelError
from diffquant.integrations.pipelines import diffusers_model_class, is_pipeline
from diffquant.integrations.quiet import quiet_loading
from diffquant.timestep import denoising_step

TEXT_TOKENS = 77  # the sequence length of random text embeddings (CLIP's)


class ModelSourceError(ValueError):
    """A ``--model`` that is no built-in name, diffusers folder or cached hub id."""


FIX = (
    "pass a built-in model (fashion-unet, fashion-dit, fashion-sd), a diffusers pipeline folder (with model_index.json), "
    "a model folder (config.json with a diffusers _class_name) or a hub id in the local Hugging Face cache"
)


def load_model(source: str | os.PathLike):
    """The diffusers pipeline or model that ``source`` names, in eval mode, fp32, on the CPU.

    Args:
        source: a folder with ``model_index.json`` (a pipeline, loaded with
            ``DiffusionPipeline.from_pretrained``), a folder with a ``config.json`` whose ``_class_name``
            is a diffusers model class (``UNet2DConditionModel``, ``UNet2DModel``,
            ``DiTTransformer2DModel``, ...), or a hub id ``org/name`` already in the local Hugging Face
            cache (nothing is downloaded).

    Raises:
        ModelSourceError: not such a folder, or a hub id not in the cache (the message says what to do).
    """
    return load_folder(resolve(source), name=str(source))


def resolve(source: str | os.PathLike) -> Path:
    """The folder ``source`` names: itself when it is a directory, the shipped pipeline folder for
    ``fashion-sd``, else the local snapshot of the hub repository ``org/name`` (``local_files_only``:
    the hub is never contacted)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if str(source) == "fashion-sd":
        from diffquant.models.fashion_sd import pipeline_dir

        if not (pipeline_dir() / "model_index.json").is_file():
            raise ModelSourceError(
                f"fashion-sd is not in this installation ({pipeline_dir()} has no model_index.json): train and "
                "export it with `diffquant train sd`, or reinstall diffquant."
            )
        return pipeline_dir()
    repo_id = str(source)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    if repo_id.count("/") != 1 or Path(repo_id).is_absolute() or repo_id.startswith("."):
        raise ModelSourceError(f"{repo_id!r} is not a folder, a built-in model or a hub id (org/name); {FIX}.")
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except HFValidationError as e:
        raise ModelSourceError(f"{repo_id!r} is not a folder and not a valid hub id ({e}); {FIX}.") from e
    except LocalEntryNotFoundError as e:
        raise ModelSourceError(
            f"{repo_id} is not a folder and not in the local Hugging Face cache ({constants.HF_HUB_CACHE}), and "
            f"diffquant does not download: run `hf download {repo_id}` where the hub is reachable (set HF_HUB_CACHE "
            "to that cache here), or pass the model's folder."
        ) from e


def load_folder(folder: str | os.PathLike, name: str | None = None):
    """The pipeline (``model_index.json``) or diffusers model (``config.json``) saved in ``folder``."""
    folder = Path(folder)
    name = name or str(folder)
    if (folder / "model_index.json").is_file():
        from diffusers import DiffusionPipeline

        load = DiffusionPipeline.from_pretrained  # fp32 whatever the saved dtype (fp16 folders are common)
        pipe = _loading(name, lambda: load(str(folder), local_files_only=True, torch_dtype=torch.float32))
        pipe.set_progress_bar_config(disable=True)
        return pipe
    config = folder / "config.json"
    class_name = None
    if config.is_file():
        try:
            class_name = json.loads(config.read_text()).get("_class_name")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ModelSourceError(f"{config} is not a JSON object ({e}).") from e
    cls = diffusers_model_class(class_name)
    if cls is None:
        found = f"its config.json names _class_name {class_name!r}" if config.is_file() else "neither file is there"
        hint = " (it is a quantized model: pass it as --quantized)" if (folder / "recipe.json").is_file() else ""
        raise ModelSourceError(
            f"{name} is not a diffusers model: expected model_index.json (a pipeline) or a config.json whose "
            f"_class_name is a diffusers model class such as UNet2DConditionModel, and {found}{hint}."
        )
    load = cls.from_pretrained
    return _loading(name, lambda: load(str(folder), local_files_only=True, torch_dtype=torch.float32)).eval()


def _loading(name: str, load: Callable):
    try:
        with quiet_loading():
            return load()
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelSourceError(f"cannot load {name}: {first}") from e


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a text file, one per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"--prompts {path}: no such file (one prompt per line).")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ModelSourceError(f"--prompts {path} holds no prompt (one prompt per line).")
    return prompts


def _size(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _conditioning(model: nn.Module, tokens: int = TEXT_TOKENS) -> Callable[[int, torch.Generator], dict]:
    """``cond(batch, generator)``: random conditioning keywords of one call of a bare diffusers denoiser."""
    cfg, kind = model.config, type(model).__name__
    classes = cfg.get("num_class_embeds") or cfg.get("num_embeds_ada_norm")
    if kind == "UNet2DModel" and cfg.get("class_embed_type") is None and not classes:
        return lambda b, g: {}
    if kind in ("UNet2DModel", "DiTTransformer2DModel") or (kind == "Transformer2DModel" and classes):
        if not classes:
            raise UnsupportedModelError(f"{kind} with class_embed_type {cfg.get('class_embed_type')!r}")
        return lambda b, g: {"class_labels": torch.randint(0, int(classes), (b,), generator=g)}
    if kind != "UNet2DConditionModel":
        raise UnsupportedModelError(
            f"diffquant has no stand-in calibration loop for a bare {kind}; quantize its pipeline folder "
            "(model_index.json) instead, or diffquant.quantize(model, recipe, calibration=my_sampler) in Python"
        )
    if cfg.get("class_embed_type") is not None and not cfg.get("num_class_embeds"):
        raise UnsupportedModelError(f"UNet2DConditionModel with class_embed_type {cfg['class_embed_type']!r}")
    width = cfg.get("encoder_hid_dim") or cfg["cross_attention_dim"]
    width = width if isinstance(width, int) else max(width)
    text_time = cfg.get("addition_embed_type") == "text_time"  # SDXL: pooled text embeddings and size ids
    if cfg.get("addition_embed_type") not in (None, "text_time"):
        raise UnsupportedModelError(f"UNet2DConditionModel with addition_embed_type {cfg['addition_embed_type']!r}")
    height, wide = (8 * s for s in _size(cfg["sample_size"]))

    def cond(b: int, g: torch.Generator) -> dict:
        out = {"encoder_hidden_states": torch.randn(b, tokens, width, generator=g)}
        if cfg.get("num_class_embeds"):
            out["class_labels"] = torch.randint(0, int(cfg["num_class_embeds"]), (b,), generator=g)
        if text_time:
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            ids = torch.tensor([height, wide, 0, 0, height, wide], dtype=torch.float32).repeat(b, 1)
            out["added_cond_kwargs"] = {"text_embeds": torch.randn(b, pooled, generator=g), "time_ids": ids}
        return out

    return cond


def example_call(model: nn.Module, batch: int, timestep: int = 500, tokens: int = TEXT_TOKENS, seed: int = 0):
    """``(args, kwargs)`` of one call of a diffusers denoiser (``model(*args, **kwargs)``): random latents
    of its sample size, time step ``timestep``, random conditioning as :func:`random_latent_sampler` gives
    it (``tokens`` text tokens for a UNet2DConditionModel); for timing, where values do not matter.

    Raises:
        UnsupportedModelError: a model class the stand-in does not know how to condition.
    """
    cond = _conditioning(model, tokens)
    g = torch.Generator().manual_seed(seed)
    height, width = _size(model.config["sample_size"])
    x = torch.randn(batch, int(model.config["in_channels"]), height, width, generator=g)
    return (x, torch.full((batch,), timestep, dtype=torch.long)), cond(batch, g)


def scheduler_for(folder: str | os.PathLike | None, num_train_timesteps: int = 1000):
    """A DDIM scheduler: from the ``scheduler/`` folder beside ``folder`` (a pipeline's ``unet/`` has one),
    else diffusers' defaults without sample clipping."""
    from diffusers import DDIMScheduler

    sibling = Path(folder).parent / "scheduler" if folder is not None else None
    if sibling is not None and (sibling / "scheduler_config.json").is_file():
        return DDIMScheduler.from_pretrained(str(sibling))
    return DDIMScheduler(num_train_timesteps=num_train_timesteps, clip_sample=False)


def random_latent_sampler(model: nn.Module, config, scheduler=None) -> Callable[[nn.Module], None]:
    """A stand-in sampling loop for a bare diffusers denoiser: ``config.n_samples`` DDIM runs of
    ``config.steps`` steps from random latents, with random conditioning.

    Pass it as ``diffquant.quantize(model, recipe, calibration=random_latent_sampler(model, cal))``. It is
    a stand-in for the model's own pipeline, which calibrates better (real prompts through the real text
    encoder): use it only when there is no pipeline.

    Args:
        model: a diffusers ``UNet2DModel``, ``UNet2DConditionModel`` (random text embeddings of
            ``TEXT_TOKENS`` tokens; SDXL's added conditions too) or class-conditional
            ``DiTTransformer2DModel``.
        config: a :class:`~diffquant.recipe.CalibrationConfig` (``n_samples``, ``steps``, ``seed``,
            ``batch_size``; the sampler is DDIM whatever ``config.sampler`` says).
        scheduler: a diffusers scheduler (default: :func:`scheduler_for` with diffusers' defaults).

    Raises:
        UnsupportedModelError: a model class the stand-in does not know how to condition.
    """
    if is_pipeline(model) or not hasattr(model, "config"):
        raise UnsupportedModelError("random_latent_sampler takes a bare diffusers denoiser (a ModelMixin)")
    cond = _conditioning(model)
    channels = int(model.config["in_channels"])
    height, width = _size(model.config["sample_size"])
    scheduler = scheduler or scheduler_for(None)

    @torch.no_grad()
    def sample(m: nn.Module) -> None:
        scheduler.set_timesteps(config.steps)
        timesteps = [int(t) for t in scheduler.timesteps]
        for lo in range(0, config.n_samples, config.batch_size):
            b = min(config.batch_size, config.n_samples - lo)
            g = torch.Generator().manual_seed(config.seed * 1_000_003 + lo)
            x = torch.randn(b, channels, height, width, generator=g)
            kwargs = cond(b, g)
            for i, t in enumerate(timesteps):
                with denoising_step(i, t, len(timesteps)):
                    out = m(x, torch.full((b,), t, dtype=torch.long), **kwargs)
                eps = (out.sample if hasattr(out, "sample") else out[0])[:, :channels]  # learned sigma: eps half
                x = scheduler.step(eps, t, x).prev_sample

    return sample
