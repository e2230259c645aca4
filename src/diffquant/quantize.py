"""``quantize(model, recipe, calibration)``: swap modules, calibrate on the trajectory, freeze.

Example:
    >>> from diffquant import quantize
    >>> from diffquant.models import load_builtin
    >>> qmodel = quantize(load_builtin("fashion-unet"), "w8a8")   # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from diffquant.integrations import uses_diffusers
from diffquant.nn.modules import QMODULES, QuantModule, make_input_quantizer
from diffquant.nn.quantizer import ActQuantizer
from diffquant.qtypes import get_qtype
from diffquant.recipe import CalibrationConfig, Recipe, get_recipe
from diffquant.timestep import _CURRENT, StepInfo, current_step

TIMESTEP_ARGS = ("t", "timestep", "timesteps")


class UnsupportedModelError(TypeError):
    """The model cannot be quantized as given (e.g. its forward has no time-step argument)."""


def timestep_argument(model: nn.Module) -> tuple[str, int]:
    """Name and position of the time-step argument of ``model.forward``.

    Raises:
        UnsupportedModelError: naming the signature found and the one expected.
    """
    params = [p for p in inspect.signature(model.forward).parameters.values() if p.name != "self"]
    for i, p in enumerate(params):
        if p.name in TIMESTEP_ARGS:
            return p.name, i
    found = ", ".join(p.name for p in params)
    raise UnsupportedModelError(
        f"{type(model).__name__}.forward({found}) has no time-step argument. diffquant quantizes "
        f"denoisers called as forward(x, t, ...) with the time step named one of {', '.join(TIMESTEP_ARGS)} "
        "(diffusers UNets and transformers take `timestep`); wrap the model so its forward has one."
    )


def _install_step_hook(model: nn.Module) -> None:
    """Make the model's own ``t`` argument the current step when no sampler has set one."""
    if getattr(model, "_diffquant_step_hook", None) is not None:
        return
    name, pos = timestep_argument(model)
    tokens: list = []

    def pre(module, args, kwargs):
        if current_step() is not None:
            tokens.append(None)
            return
        t = kwargs[name] if name in kwargs else args[pos] if len(args) > pos else None
        if t is None:
            tokens.append(None)
            return
        t = torch.as_tensor(t)
        if t.numel() > 1 and not bool((t == t.flatten()[0]).all()):
            raise ValueError(
                "a quantized model with per-step scales needs one time step per call; got a batch of "
                "different time steps (sample them in separate calls)"
            )
        # pipelines that pass a rescaled time step (Flux: t / 1000) record the factor back to t
        scale = getattr(module, "diffquant_timestep_scale", 1.0)
        tokens.append(_CURRENT.set(StepInfo(-1, round(float(t.flatten()[0]) * scale), -1)))

    def post(module, args, kwargs, output):
        token = tokens.pop() if tokens else None
        if token is not None:
            _CURRENT.reset(token)

    model._diffquant_step_hook = (
        model.register_forward_pre_hook(pre, with_kwargs=True),
        model.register_forward_hook(post, with_kwargs=True, always_call=True),
    )


def _num_timesteps(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    if isinstance(cfg, dict) and "scheduler" in cfg:
        return int(cfg["scheduler"]["num_train_timesteps"])
    return 1000


def prepare(model: nn.Module, recipe: Recipe | str, num_timesteps: int | None = None) -> nn.Module:
    """Swap modules for quantized ones as the recipe says (in place), without calibrating.

    Returns the same model, with ``model.diffquant_recipe`` set.
    """
    recipe = get_recipe(recipe)
    timestep_argument(model)
    T = num_timesteps or _num_timesteps(model)
    splits = {}
    if recipe.split_shortcut and uses_diffusers(model):
        from diffquant.integrations.diffusers import shortcut_splits

        splits = shortcut_splits(model)

    def act(name: str, fmt: str, module=None, **extra) -> ActQuantizer:
        kw = dict(
            qtype=get_qtype(fmt), mode=recipe.act_mode, granularity=recipe.act_granularity,
            symmetric=recipe.act_symmetric, buckets=recipe.buckets, num_timesteps=T, name=name,
            tdq={"hidden": recipe.tdq_hidden, "n_freqs": recipe.tdq_freqs},
        )  # fmt: skip
        kw.update(extra)
        if module is not None:
            return make_input_quantizer(module, **kw)
        return ActQuantizer(**kw)

    targets = [(n, m) for n, m in model.named_modules() if type(m) in QMODULES and n]
    for name, module in targets:
        kind = (
            "conv" if isinstance(module, nn.Conv2d) else "embedding" if isinstance(module, nn.Embedding) else "linear"
        )
        settings = recipe.settings_for(name, kind)
        if settings is None:
            continue
        wq = None if settings["weights"] == "none" else settings["weights"]
        iq = iq2 = None
        split = splits.get(name, 0)
        if settings["activations"] != "none":
            iq = act(f"{name}.input", settings["activations"], module)
            if split:
                iq2 = act(f"{name}.input_skip", settings["activations"], module)
        qmod = QMODULES[type(module)].from_float(
            module, wq, settings["weight_group_size"], iq, input_split=split if iq2 is not None else 0,
            input_quantizer_2=iq2,
        )  # fmt: skip
        if recipe.smoothquant and iq is not None and isinstance(module, nn.Linear):
            qmod.enable_smoothing()
        model.set_submodule(name, qmod)

    if recipe.quantizes_attention and uses_diffusers(model):
        from diffquant.integrations.diffusers import quantize_attention

        def include(name):
            return recipe.settings_for(name) is not None

        def make(name, role):
            extra = {"channel_dim": -1}
            return act(f"{name}.{role}", recipe.activations, **extra)

        def make_softmax(name):
            if recipe.softmax == "none":
                return None
            # P = softmax(...) is in [0, 1]: an unsigned grid; dynamic per-token mode keeps rows apart
            return act(f"{name}.p", recipe.softmax, channel_dim=-1)

        quantize_attention(model, make, make_softmax, include)

    if recipe.output_correction:
        from diffquant.methods.output_correction import install

        install(model, T)
    _install_step_hook(model)
    model.diffquant_recipe = recipe
    return model


def quant_modules(model: nn.Module) -> list[QuantModule]:
    return [m for m in model.modules() if isinstance(m, QuantModule)]


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def freeze(model: nn.Module) -> nn.Module:
    """Store every quantized weight as integers (``qweight`` + ``weight_scale``)."""
    for m in quant_modules(model):
        m.freeze()
    return model


def quantize(
    model: nn.Module,
    recipe: Recipe | str = "w8a8",
    calibration: CalibrationConfig | Callable | None = None,
    *,
    num_timesteps: int | None = None,
    progress: bool = True,
    prompts: list[str] | None = None,
    class_labels: list[int] | None = None,
    pipeline_kwargs: dict | None = None,
):
    """Quantize a denoiser (or a diffusers pipeline's denoiser) in place and return it.

    Args:
        model: a denoiser ``model(x, t, ...)``; the built-in models, diffusers UNets and
            transformers, or any ``nn.Module`` with a time-step argument named ``t``/``timestep``.
            A diffusers ``DiffusionPipeline`` is quantized through its ``unet`` / ``transformer``,
            calibrated by running the pipeline itself (:mod:`diffquant.integrations.pipelines`),
            and the pipeline is returned.
        recipe: a :class:`~diffquant.recipe.Recipe` or a named recipe (``diffquant recipes``).
        calibration: how to draw calibration data: ``None`` uses the recipe's
            :class:`~diffquant.recipe.CalibrationConfig` with the model's own sampler (built-in
            models); a ``CalibrationConfig`` replaces it; a callable
            ``run(model, config, observe)`` runs trajectories itself (integrations).
            Needed for static, bucketed and TDQ activation scales and for GPTQ weight rounding (the
            named integer recipes); a recipe with dynamic or float activations and
            ``weight_method="rtn"`` needs none.
        num_timesteps: the model's training time steps ``T`` (default: from the model, or 1000).
        progress: show a progress bar.
        prompts, class_labels, pipeline_kwargs: pipelines only: the conditioning of the
            calibration samples and more keywords for each pipeline call.

    Returns:
        The model in eval mode, with quantized modules and integer weights.
    """
    from diffquant.calibrate import calibrate
    from diffquant.integrations.pipelines import is_pipeline, quantize_pipeline

    if is_pipeline(model):
        return quantize_pipeline(
            model, recipe, calibration, prompts=prompts, class_labels=class_labels,
            pipeline_kwargs=pipeline_kwargs, progress=progress,
        )  # fmt: skip
    if prompts is not None or class_labels is not None or pipeline_kwargs is not None:
        raise TypeError("prompts, class_labels and pipeline_kwargs apply to diffusers pipelines only")

    recipe = get_recipe(recipe)
    model.eval()  # calibrate what inference runs: no dropout, no label dropout
    if isinstance(calibration, CalibrationConfig):
        recipe = recipe.replace(calibration=calibration)  # the saved recipe says what was done
    runner = calibration if callable(calibration) and not isinstance(calibration, CalibrationConfig) else None
    if recipe.weight_bits_budget is not None:
        from diffquant.methods.mixed import mixed_precision_recipe

        recipe, _ = mixed_precision_recipe(model, recipe, runner=runner, progress=progress)
    prepare(model, recipe, num_timesteps)
    if recipe.needs_calibration:
        calibrate(model, recipe, recipe.calibration, runner=runner, progress=progress)
    # GPTQ overwrites the float weights with rounded ones; the output correction compares with the FP model
    fit_output = recipe.act_mode == "tdq" and recipe.tdq_fit == "output"
    fp_weights = None
    if (recipe.output_correction or fit_output) and recipe.weight_method.startswith("gptq"):
        from diffquant.methods.gptq import float_weights

        fp_weights = float_weights(model)
    if recipe.weight_method != "rtn":
        from diffquant.methods.gptq import round_weights

        model.diffquant_gptq_error_ratios = round_weights(
            model, recipe.weight_method, recipe.calibration, runner=runner, progress=progress
        )
    if fit_output:
        from diffquant.methods.tdq import fit_to_output

        model.diffquant_tdq_fit = fit_to_output(
            model, recipe.calibration, runner=runner, progress=progress, fp_weights=fp_weights,
            iters=recipe.tdq_fit_iters, n_samples=recipe.calibration.n_samples,
        )  # fmt: skip
    if recipe.output_correction:
        from diffquant.methods.output_correction import fit_output_correction

        fit_output_correction(model, recipe.calibration, runner=runner, progress=progress, fp_weights=fp_weights)
        del fp_weights
    freeze(model)
    return model
