"""``prepare(model, recipe)``: swap a model's modules for quantized ones as the recipe says (in place),
and ``freeze(model)``: store every quantized weight as integers. Neither calibrates.
"""

from __future__ import annotations

from torch import nn

from diffquant.denoiser import timestep_argument, timestep_of
from diffquant.integrations import uses_diffusers
from diffquant.modes import quant_modules
from diffquant.nn.modules import QMODULES, make_input_quantizer
from diffquant.nn.output_gain import install as install_output_gain
from diffquant.nn.quantizer import ActQuantizer
from diffquant.qtypes import get_qtype
from diffquant.recipe import Recipe, get_recipe
from diffquant.timestep import StepHook
from diffquant.trajectory import model_num_timesteps


def _install_step_hook(model: nn.Module) -> None:
    """Make the model's own ``t`` argument the current step when no sampler has set one."""
    if getattr(model, "_diffquant_step_hook", None) is None:
        name, pos = timestep_argument(model)
        model._diffquant_step_hook = StepHook(model, lambda args, kwargs: timestep_of(args, kwargs, name, pos))


def _num_timesteps(model: nn.Module) -> int:
    return model_num_timesteps(model) or 1000


def prepare(model: nn.Module, recipe: Recipe | str, num_timesteps: int | None = None) -> nn.Module:
    """Swap modules for quantized ones as the recipe says (in place), without calibrating.

    The quantized modules take over the float modules' own weight and bias parameters (no copy: a
    model's weights are never held twice); a weight tied between two layers is given to the second
    as a copy, since each layer rounds its weight its own way.

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
            group_size=recipe.act_group_size,
            tdq={"hidden": recipe.tdq_hidden, "n_freqs": recipe.tdq_freqs},
        )  # fmt: skip
        kw.update(extra)
        if module is not None:
            return make_input_quantizer(module, **kw)
        return ActQuantizer(**kw)

    targets = [(n, m) for n, m in model.named_modules() if type(m) in QMODULES and n]
    taken: set[int] = set()
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
        if id(module.weight) in taken:  # tied to a layer already swapped: this one rounds its own copy
            module.weight = nn.Parameter(module.weight.detach().clone(), module.weight.requires_grad)
        taken.add(id(module.weight))
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
        install_output_gain(model, T)
    _install_step_hook(model)
    model.diffquant_recipe = recipe
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Store every quantized weight as integers (``qweight`` + ``weight_scale``)."""
    for m in quant_modules(model):
        m.freeze()
    return model
