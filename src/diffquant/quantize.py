"""``quantize(model, recipe, calibration)``: record the FP trajectory once, swap modules, run the
recipe's method steps on the recording, freeze.

    resolve the recipe -> record the FP trajectory (or take the user's) -> [mixed precision]
    -> prepare (swap modules) -> SmoothQuant -> ranges / TDQ fit -> GPTQ -> TDQ output fit
    -> [fine-tuning] -> output correction -> freeze integer weights

Each method step is a module with ``applies(recipe)``, ``selections(recipe)`` (the trajectory rows
it replays, so one recording serves every step) and ``run(model, recipe, trajectory) -> report``.

Example:
    >>> from diffquant import quantize
    >>> from diffquant.models import load_builtin
    >>> qmodel = quantize(load_builtin("fashion-unet"), "w8a8")   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from diffquant import calibrate as ranges
from diffquant.denoiser import TIMESTEP_ARGS, UnsupportedModelError, timestep_argument
from diffquant.integrations.pipelines import PipelineRunner, denoiser_name, is_pipeline
from diffquant.methods import finetune as finetuning
from diffquant.methods import gptq, output_correction, smoothquant, tdq
from diffquant.modes import act_quantizers, full_precision, quant_modules
from diffquant.prepare import freeze, prepare
from diffquant.quantization_report import QuantizationReport
from diffquant.recipe import CalibrationConfig, Recipe, get_recipe
from diffquant.trajectory import Trajectory, has_builtin_sampler, record_builtin, recording

__all__ = [
    "METHOD_STEPS",
    "TIMESTEP_ARGS",
    "UnsupportedModelError",
    "act_quantizers",
    "calibrating",
    "finetune",
    "freeze",
    "prepare",
    "quant_modules",
    "quantize",
    "quantize_pipeline",
    "run_methods",
    "selections",
    "timestep_argument",
]

# The method steps, in the order they run on a prepared model (each sees the previous ones' result).
METHOD_STEPS = (smoothquant, ranges, gptq, tdq, finetuning, output_correction)


def selections(recipe: Recipe) -> list[CalibrationConfig]:
    """Every trajectory selection the recipe's method steps replay (what one recording must hold)."""
    out = [c for step in METHOD_STEPS if step.applies(recipe) for c in step.selections(recipe)]
    if recipe.weight_bits_budget is not None:
        out.append(recipe.calibration)
    return out


def run_methods(
    model: nn.Module, recipe: Recipe, trajectory: Trajectory | None, progress: bool = True, checkpoint=None
) -> dict:
    """Run the recipe's method steps (:data:`METHOD_STEPS`) on a prepared model; returns their reports.
    ``checkpoint``: a directory where fine-tuning keeps resumable checkpoints."""
    report = {}
    for step in METHOD_STEPS:
        if not step.applies(recipe):
            continue
        if trajectory is None and step.selections(recipe):
            raise TypeError(
                f"recipe {recipe.name!r} calibrates on the model's FP trajectory ({step.NAME}): pass one "
                "(with diffquant.recording(model) as traj: my_sampler(model)), or use a data-free recipe"
            )
        extra = {"checkpoint": checkpoint} if step is finetuning else {}  # the one step that trains for long
        report[step.NAME] = step.run(model, recipe, trajectory, progress, **extra)
    return report


def _record(model: nn.Module, recipe: Recipe, calibration, progress: bool) -> Trajectory | None:
    """The FP trajectory the method steps replay: the user's, recorded from the user's sampler, or
    sampled with the built-in sampler (only the rows some step selects are kept)."""
    if isinstance(calibration, Trajectory):
        return calibration
    needed = selections(recipe)
    if callable(calibration):
        with torch.no_grad(), recording(model) as traj:
            calibration(model)
        if needed and not len(traj):
            raise ValueError(
                f"calibration: {getattr(calibration, '__name__', 'the sampler')}(model) made no call of the model, "
                "so there is no trajectory to calibrate on; pass a loop that samples with the model"
            )
        return traj
    if not needed:
        return None
    if not has_builtin_sampler(model):
        raise TypeError(
            f"recipe {recipe.name!r} calibrates on the model's FP trajectory, and {type(model).__name__} has no "
            "built-in sampler settings: pass calibration=trajectory (with diffquant.recording(model) as traj: "
            "my_sampler(model)) or calibration=my_sampler (called as my_sampler(model)), or use a data-free "
            "recipe (w8a8-dynamic, or dynamic / float activations with recipe.replace(weight_method='rtn'))"
        )
    return record_builtin(model, recipe.calibration, needed, progress=progress)


def quantize(
    model: nn.Module,
    recipe: Recipe | str = "w8a8",
    calibration: CalibrationConfig | Trajectory | Callable | None = None,
    *,
    num_timesteps: int | None = None,
    progress: bool = True,
    prompts: list[str] | None = None,
    class_labels: list[int] | None = None,
    pipeline_kwargs: dict | None = None,
    checkpoint=None,
):
    """Quantize a denoiser (or a diffusers pipeline's denoiser) in place and return it.

    Args:
        model: a denoiser ``model(x, t, ...)``; the built-in models, diffusers UNets and
            transformers, or any ``nn.Module`` with a time-step argument named ``t``/``timestep``.
            A diffusers ``DiffusionPipeline`` is quantized through its ``unet`` / ``transformer``,
            calibrated by running the pipeline itself (:mod:`diffquant.integrations.pipelines`),
            and the pipeline is returned.
        recipe: a :class:`~diffquant.recipe.Recipe` or a named recipe (``diffquant recipes``).
        calibration: where the FP trajectory comes from: ``None`` samples it with the model's own
            sampler as the recipe's :class:`~diffquant.recipe.CalibrationConfig` says (built-in
            models); a ``CalibrationConfig`` replaces the recipe's; a
            :class:`~diffquant.trajectory.Trajectory` recorded from your own loop
            (``with diffquant.recording(model) as traj: my_sampler(model)``); or a callable
            ``my_sampler(model)`` that runs your loop (it is recorded). The steps and samples each
            method replays come from the recipe's ``CalibrationConfig``. Needed for static, bucketed
            and TDQ activation scales and for GPTQ weight rounding (the named integer recipes); a
            recipe with dynamic or float activations and ``weight_method="rtn"`` needs none.
        num_timesteps: the model's training time steps ``T`` (default: from the model, or 1000).
        progress: show a progress bar.
        prompts, class_labels, pipeline_kwargs: pipelines only: the conditioning of the
            calibration samples and more keywords for each pipeline call.
        checkpoint: recipes that fine-tune (``*-ft``): a directory for resumable fine-tuning
            checkpoints (every ``finetune.checkpoint_every`` steps and when ``max_minutes`` stops it);
            the same call again resumes from it (everything before fine-tuning is seeded, so it
            reproduces the same model first).

    Returns:
        The model in eval mode, with quantized modules and integer weights; ``model.diffquant_report``
        (a :class:`~diffquant.quantization_report.QuantizationReport`) holds each method step's report.
    """
    if is_pipeline(model):
        return quantize_pipeline(
            model, recipe, calibration, prompts=prompts, class_labels=class_labels,
            pipeline_kwargs=pipeline_kwargs, progress=progress, checkpoint=checkpoint,
        )  # fmt: skip
    if prompts is not None or class_labels is not None or pipeline_kwargs is not None:
        raise TypeError("prompts, class_labels and pipeline_kwargs apply to diffusers pipelines only")

    recipe = get_recipe(recipe)
    timestep_argument(model)  # a clear error before anything runs
    model.eval()  # calibrate what inference runs: no dropout, no label dropout
    if isinstance(calibration, CalibrationConfig):
        recipe = recipe.replace(calibration=calibration)  # the saved recipe says what was done
        calibration = None
    trajectory = _record(model, recipe, calibration, progress)
    if trajectory is not None and num_timesteps is None and trajectory.num_timesteps:
        num_timesteps = trajectory.num_timesteps
    report = QuantizationReport() if trajectory is None else QuantizationReport(trajectory=trajectory.summary())
    if recipe.weight_bits_budget is not None:
        from diffquant.methods.mixed import mixed_precision_recipe

        recipe, choices = mixed_precision_recipe(model, recipe, trajectory, progress=progress)
        report["mixed_precision"] = {"upgraded": [c.name for c in choices if c.upgraded]}
    prepare(model, recipe, num_timesteps)
    report.update(run_methods(model, recipe, trajectory, progress, checkpoint))
    freeze(model)
    model.diffquant_report = report
    return model


def quantize_pipeline(
    pipe,
    recipe="w8a8",
    calibration=None,
    *,
    prompts=None,
    class_labels=None,
    pipeline_kwargs: dict | None = None,
    progress: bool = True,
    checkpoint=None,
):
    """Quantize ``pipe``'s denoiser in place, calibrated on the pipeline's own sampling; returns ``pipe``.

    Args:
        pipe: a diffusers ``DiffusionPipeline`` with a ``unet`` or ``transformer``.
        recipe: a recipe or its name.
        calibration: a :class:`~diffquant.recipe.CalibrationConfig` (default: the recipe's); its
            ``n_samples``, ``steps``, ``selection``, ``seed`` and ``batch_size`` are used.
        prompts: prompts for text-conditioned pipelines.
        class_labels: labels for class-conditional pipelines (DiT).
        pipeline_kwargs: more keywords for each calibration call (``guidance_scale``, ``height``, ``width``).
        progress: show a progress bar.
        checkpoint: fine-tuning checkpoints, as in :func:`quantize`.
    """
    recipe = get_recipe(recipe)
    if calibration is not None and not isinstance(calibration, CalibrationConfig):
        raise TypeError("for a pipeline, calibration must be a CalibrationConfig (the pipeline is the sampler)")
    if calibration is not None:
        recipe = recipe.replace(calibration=calibration)
    if recipe.weight_bits_budget is not None:
        raise ValueError(
            f"recipe {recipe.name!r} allocates bits by per-layer sensitivity, which is not supported on pipelines "
            "yet. Quantize with a fixed recipe (diffquant recipes)."
        )
    model = getattr(pipe, denoiser_name(pipe))
    num_timesteps = int(pipe.scheduler.config.num_train_timesteps)
    trajectory = None
    needed = selections(recipe)
    if needed:
        runner = PipelineRunner(pipe, prompts, class_labels, pipeline_kwargs)
        trajectory = runner.record(recipe.calibration, needed, progress=progress)
        if trajectory.timestep_scale != 1.0:
            model.diffquant_timestep_scale = trajectory.timestep_scale
    quantize(model, recipe, trajectory, num_timesteps=num_timesteps, progress=progress, checkpoint=checkpoint)
    model.diffquant_num_timesteps = num_timesteps
    return pipe


@contextlib.contextmanager
def calibrating(qmodel: nn.Module, *, max_bytes: int | None = None, progress: bool = True, checkpoint=None):
    """Calibrate a prepared model from your own sampling loop, then freeze it.

    Inside the block the model runs in float (the trajectory is the FP model's) and its calls are
    recorded; on leaving it every method step of its recipe runs on that recording
    (:func:`run_methods`) and the weights are frozen to integers.

    Example:
        >>> qmodel = diffquant.prepare(model, "w8a8-tdq")     # doctest: +SKIP
        >>> with diffquant.calibrating(qmodel):               # doctest: +SKIP
        ...     my_sampler(qmodel)
    """
    recipe = getattr(qmodel, "diffquant_recipe", None)
    if recipe is None:
        raise ValueError("calibrating() takes a prepared model: qmodel = diffquant.prepare(model, recipe)")
    if recipe.weight_bits_budget is not None:
        raise ValueError(
            "a mixed-precision budget is resolved before prepare: use diffquant.quantize(model, recipe, my_sampler)"
        )
    with full_precision(qmodel), recording(qmodel, max_bytes=max_bytes) as traj:
        yield traj
    qmodel.diffquant_report = QuantizationReport(
        trajectory=traj.summary(), **run_methods(qmodel, recipe, traj, progress, checkpoint)
    )
    freeze(qmodel)


def finetune(
    qmodel: nn.Module,
    teacher,
    config=None,
    *,
    checkpoint=None,
    progress: bool = True,
) -> nn.Module:
    """Fine-tune a quantized model, distilled from its FP model on the FP model's own trajectory.

    Args:
        qmodel: a model from :func:`quantize` (or :func:`diffquant.load_quantized`); it is thawed
            to its integer weights, trained (:mod:`diffquant.methods.finetune`) and frozen again.
        teacher: the FP trajectory: a :class:`~diffquant.trajectory.Trajectory` recorded from the FP
            model (``with diffquant.recording(fp) as traj: my_sampler(fp)``; every step of a few
            samples), or the FP model itself when it has a built-in sampler (its trajectory is
            sampled as the recipe's calibration says).
        config: a :class:`~diffquant.recipe.FinetuneConfig` (or a dict of its fields); default: the
            recipe's, else the defaults.
        checkpoint: a directory for resumable checkpoints.
        progress: progress bars.

    Returns:
        ``qmodel``, frozen, with the step's report under ``qmodel.diffquant_report["finetune"]``.
    """
    from diffquant.recipe import FinetuneConfig

    recipe = getattr(qmodel, "diffquant_recipe", None)
    if recipe is None:
        raise ValueError("finetune() takes a quantized model: qmodel = diffquant.quantize(model, recipe)")
    if isinstance(config, dict):
        config = FinetuneConfig(**config)
    config = config or recipe.finetune or FinetuneConfig()
    selection = finetuning.finetune_calibration(recipe.calibration, config)
    if isinstance(teacher, Trajectory):
        trajectory = teacher.select(selection)
    elif isinstance(teacher, nn.Module) and has_builtin_sampler(teacher):
        if teacher is qmodel:
            raise ValueError("finetune(qmodel, teacher): the teacher is the FP model, not the quantized one")
        trajectory = record_builtin(teacher, selection, [selection], progress=progress)
    else:
        raise TypeError(
            "finetune: pass the FP trajectory (with diffquant.recording(fp_model) as traj: my_sampler(fp_model)) "
            "or a built-in FP model as the teacher"
        )
    report = finetuning.finetune(qmodel, trajectory, config, checkpoint=checkpoint, progress=progress)
    freeze(qmodel)
    qmodel.diffquant_recipe = recipe.replace(finetune=config)
    qmodel.diffquant_report = QuantizationReport({**getattr(qmodel, "diffquant_report", {}), "finetune": report})
    return qmodel
