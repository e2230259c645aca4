"""Recipes: what to quantize and how, as validated, JSON-serialisable data.

A :class:`Recipe` names the weight and activation formats, the activation-scale mode, the observer,
the calibration (how the trajectory is sampled and which steps are observed), attention
quantization, Q-Diffusion's shortcut split, exclusions and per-module overrides. Named recipes
(:data:`RECIPES`) are plain instances; ``get_recipe("w8a8")`` returns one, ``recipe.replace(...)``
derives another.

Example:
    >>> r = get_recipe("w4a8").replace(observer="percentile")
    >>> Recipe.from_json(r.to_json()) == r
    True
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from diffquant.observers import OBSERVERS
from diffquant.qtypes import get_qtype
from diffquant.sampling import SamplerConfig

RECIPE_VERSION = 1
SELECTIONS = ("single", "uniform", "ndtc", "all")
QUANT_LEVELS = (1.0, 2.0, 2.5, 3.0, 4.0)
# Layer roles for quant levels (TensorRT Model Optimizer's diffusion levels), by name pattern.
FEED_FORWARD = ("*ff.net.*", "*.ff.*", "*feed_forward*", "*mlp.*")
QKV = ("*to_q", "*to_k", "*to_v", "*add_q_proj", "*add_k_proj", "*add_v_proj", "*to_qkv")
WEIGHT_METHODS = ("rtn", "mse", "gptq", "gptq-seq")  # how integer weights are rounded: diffquant.methods.gptq

# Layers kept in float by default, as TensorRT's diffusion recipe does: the first and last layers
# (UNet conv_in / conv_out, DiT patch embedding / final projection).
DEFAULT_EXCLUDE = (
    "*conv_in",
    "*conv_out",
    "*pos_embed*",
    "*proj_out_2",
)
# Conditioning layers (class embedding tables, time embedding MLP, its per-block projections, DiT's
# final modulation): their input depends on the time step and class only, so their activations stay
# float, but their weights are quantized: they are 10 % of fashion-unet's FP32 weight bytes and 16 %
# of fashion-dit's, so left in float they would be 30-40 % of an int8 model's bytes. Embedding tables
# are only ever quantized through this list, and never below int8 per row unless an override asks:
# a table is a few KB, and fashion-dit W8A16 with only its class tables at int4/g64 gave 21.0 dB PSNR
# against the FP images, 43.5 dB with int8 tables (benchmarks/results/weight_rounding.md).
DEFAULT_WEIGHT_ONLY = (
    "*class_embedder*",
    "*class_embedding*",
    "*time_embedding*",
    "*time_emb_proj*",
    "*timestep_embedder*",
    "*proj_out_1",
)


class RecipeFieldError(TypeError, ValueError):
    """A recipe or config field of the wrong type (a ``ValueError`` too, so callers that report bad
    settings as one line report these alike)."""


def _matches(value, tp) -> bool:
    """Whether ``value`` is of the annotated type ``tp`` (int, float, str, bool, ``X | None``,
    ``tuple[X, ...]``, a config class); an int is a float, a bool is not a number."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is tuple:
        item = typing.get_args(tp)[0]
        return isinstance(value, tuple) and all(_matches(v, item) for v in value)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        item = typing.get_args(tp)[0]
        return "a list of " + {str: "strings"}.get(item, f"{getattr(item, '__name__', item)} objects")
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, tp.__name__)


def _check_fields(obj, label: str) -> None:
    """Type-check every field of a frozen config dataclass (lists become tuples), naming the field."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints[f.name]
        if typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
            object.__setattr__(obj, f.name, value)
        if not _matches(value, tp):
            raise RecipeFieldError(f"{label}{f.name} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


@dataclass(frozen=True)
class CalibrationConfig:
    """How calibration data are drawn from the full-precision model's own sampling trajectory.

    Args:
        selection: which steps are observed: ``single`` (one step, the naive baseline),
            ``uniform`` (every ``every``-th step, Q-Diffusion), ``ndtc`` (per sample, the step
            nearest ``t = int(N(ndtc_mean, ndtc_std) * T)``, PTQ4DM), or ``all``.
        n_samples: trajectories sampled (classes balanced).
        sampler, steps: the sampler that generates the trajectory.
        every: step stride for ``uniform``.
        uniform_from: where ``uniform`` starts counting: ``first`` (the noisiest step, observed
            with every ``every``-th after it) or ``last`` (the cleanest step and every
            ``every``-th before it; GPTQ's Hessians use this, so the last steps, whose errors
            reach the image directly, are seen).
        single_index: sampler step index for ``single`` (-1: the last step, closest to data).
        ndtc_mean, ndtc_std: PTQ4DM's normal distribution, as fractions of ``T``.
        seed: seed of the calibration trajectories (not the evaluation seed).
        batch_size: trajectories per batch (bounds memory).
    """

    selection: str = "uniform"
    n_samples: int = 128
    sampler: str = "ddim"
    steps: int = 50
    every: int = 5
    uniform_from: str = "first"
    single_index: int = -1
    ndtc_mean: float = 0.4
    ndtc_std: float = 0.4
    seed: int = 1234
    batch_size: int = 64

    def __post_init__(self):
        _check_fields(self, "calibration.")
        if self.selection not in SELECTIONS:
            raise ValueError(f"calibration selection must be one of {SELECTIONS}, got {self.selection!r}")
        SamplerConfig(sampler=self.sampler, steps=self.steps, seed=self.seed)  # validates sampler and steps
        if self.uniform_from not in ("first", "last"):
            raise ValueError(f"calibration uniform_from must be 'first' or 'last', got {self.uniform_from!r}")
        if self.n_samples < 1 or self.every < 1 or self.batch_size < 1:
            raise ValueError("calibration n_samples, every and batch_size must be >= 1")
        if not -self.steps <= self.single_index < self.steps:
            raise ValueError(f"single_index {self.single_index} is outside a {self.steps}-step schedule")
        if self.ndtc_std <= 0:
            raise ValueError("ndtc_std must be > 0")


@dataclass(frozen=True)
class GPTQConfig:
    """How GPTQ collects its Hessians on the recorded trajectory (:mod:`diffquant.methods.gptq`).

    Args:
        every: Hessians from the last calibration step and every ``every``-th step before it.
        uniform_from: where that stride starts counting (``last``: the cleanest steps, whose errors
            reach the image directly, are always seen; ``first`` as the range calibration counts).
        max_samples: the first calibration trajectories used.
        rows_per_call: input rows (tokens / pixels) a layer adds to its Hessian per call; more are
            subsampled (seeded).
        damp: diagonal damping, relative to the mean diagonal of the Hessian.
        hessian_bytes: bytes of Hessians collected at once (layers in groups, one replay per group);
            ``None``: a tenth of physical memory.
    """

    every: int = 5
    uniform_from: str = "last"
    max_samples: int = 64
    rows_per_call: int = 8192
    damp: float = 0.01
    hessian_bytes: int | None = None

    def __post_init__(self):
        _check_fields(self, "gptq.")
        if self.every < 1 or self.max_samples < 1 or self.rows_per_call < 1:
            raise ValueError("gptq every, max_samples and rows_per_call must be >= 1")
        if self.uniform_from not in ("first", "last"):
            raise ValueError(f"gptq uniform_from must be 'first' or 'last', got {self.uniform_from!r}")
        if not 0 < self.damp < 1:
            raise ValueError(f"gptq damp must be in (0, 1), got {self.damp}")
        if self.hessian_bytes is not None and self.hessian_bytes < 1:
            raise ValueError(f"gptq hessian_bytes must be >= 1 or None, got {self.hessian_bytes}")


@dataclass(frozen=True)
class OutputFitConfig:
    """Settings of the fits against the FP model's recorded outputs.

    Args:
        correction_samples: trajectories the per-step output correction is fitted on (every step).
        tdq_lr: Adam learning rate of the TDQ output fit's per-step range multipliers.
        tdq_batch: rows per gradient step of the TDQ output fit.
        tdq_refit_iters: steps of the final generator refit to the new per-step ranges.
        seed: seed of the TDQ output fit's row draws.
    """

    correction_samples: int = 64
    tdq_lr: float = 0.01
    tdq_batch: int = 32
    tdq_refit_iters: int = 600
    seed: int = 0

    def __post_init__(self):
        _check_fields(self, "output_fit.")
        if self.correction_samples < 1 or self.tdq_batch < 1 or self.tdq_refit_iters < 0:
            raise ValueError("output fit correction_samples and tdq_batch must be >= 1, tdq_refit_iters >= 0")
        if not self.tdq_lr > 0:
            raise ValueError(f"output fit tdq_lr must be > 0, got {self.tdq_lr}")


FINETUNE_TRAIN = ("lora", "weights", "scales", "weight_scales", "smooth")


@dataclass(frozen=True)
class FinetuneConfig:
    """Quantization-aware fine-tuning, data-free (:mod:`diffquant.methods.finetune`).

    The quantized model is distilled from the FP model on the FP model's own recorded trajectory:
    MSE between the two noise predictions at the same ``x_t, t, cond``, rows drawn over every step.

    Args:
        iterations: optimizer steps.
        samples: FP trajectories recorded for training (every step of each; a quarter of them is
            held out to score the result).
        batch: trajectory rows per step.
        rank: LoRA rank on each quantized Conv2d / Linear (merged into the weight at the end).
        lr: AdamW learning rate of the LoRA factors (peak: a linear warm-up over ``warmup`` steps,
            then a cosine decay to a tenth at the last step; the scales follow the same schedule).
        scale_lr: Adam learning rate of the activation step sizes (log-space: a relative change).
        weight_lr: AdamW learning rate of the float weights when ``train`` has ``weights``.
        warmup: warm-up steps of the learning rates.
        train: what is trained: ``lora`` (QALoRA: the adapters, added before the weight
            fake-quant), ``weights`` (the quantized layers' float weights themselves, full QAT with
            straight-through rounding, at ``weight_lr``; layers kept at float weights train theirs: every weight's Adam state and two snapshots
            (the best-scoring and the last finite state) in memory, for small models and ternary / binary weights, which a low-rank update moves little),
            ``scales`` (the activations' LSQ step sizes per quantizer and per step bucket, or the
            TDQ generators) and ``weight_scales`` (LSQ on the weight scales per
            channel or group; not by default: on a toy denoiser with int2 weights its gradient
            raised the loss even on a single full batch, while activation scales lowered it), and
            ``smooth``: a learned factor per input channel of each activation-quantized layer,
            ``x / s`` before the input quantizer and ``W * s`` in the weight (OmniQuant's learnable
            equivalent scaling; SmoothQuant's factors where the recipe has them, 1 otherwise), at
            ``scale_lr``; kept in the model as its ``smooth`` buffer, which every backend runs.
        sigma_weight: extra weight of the noisy steps: each recorded call is drawn with probability
            proportional to ``1 + sigma_weight * sigma_t``, ``sigma_t = sqrt((1 - alpha_bar_t) /
            alpha_bar_t)`` (157 at t = 999 of the linear schedule, 0.01 at t = 0), and the held-out
            score weighs its calls the same way. 0: every step alike (EfficientDM's). Measured on
            fashion-unet W4A4 (N = 500, only ten steps quantized at a time): the first ten steps cost
            +94 % FD, the last ten +46 %, the middle +9-37 %, while the noise-prediction error of the
            first ten is a sixth of the last ten's: a uniform loss spends its gradient on the last
            steps (``benchmarks/results/step_importance.jsonl``); yet ``0.1`` there fine-tuned to a
            worse FD than uniform (+67 % against +49 %, docs/quantization.md). Needs the noise schedule on the
            trajectory (recorded by the built-in sampler and by DDPM-family pipelines).
        rollout: steps the student samples by itself per draw (trajectory matching). 1: each recorded
            call alone, ``|| eps_q - eps_fp ||^2`` at the FP ``x_t`` (EfficientDM's loss). ``k > 1``:
            from the FP ``x_t`` of a drawn call the quantized model takes ``k`` DDIM steps on its own
            predictions (gradients through all of them), and the loss is the squared distance of the
            ``x`` it reaches to the FP trajectory's ``x`` there (or, past the last recorded step, of
            its ``x0`` prediction to the FP one): the error as it compounds, which a per-call loss
            never sees. Needs a deterministic DDIM trajectory (eta 0, noise-prediction outputs, no
            guidance batches) with its noise schedule; checked on the recording itself. Costs ``k``
            forward and backward passes per step.
        rollout_fallback: where the recording cannot be rolled (no noise schedule, guidance batches,
            not a DDIM trajectory), warn and train with ``rollout=1`` instead of raising; the report
            says so (``rollout``, ``rollout_fallback``). On in the named recipes, so they fine-tune a
            user's own sampling loop; off by default, so an explicit ``rollout`` is never dropped.
        eval_every: score the held-out trajectories every this many steps; the best-scoring state
            is the one kept (0: only at the end: the better of the start and the end).
        max_minutes: stop early after this much wall time (``None``: no limit).
        checkpoint_every: save a resumable checkpoint every this many steps (0: none; needs a
            ``checkpoint`` directory passed to :func:`~diffquant.methods.finetune.finetune`).
        seed: seed of the row draws and the LoRA initialisation.
    """

    iterations: int = 2000
    # fashion-unet W4A4: 16 trajectories overfit (held-out loss 0.0078 after 200 steps, 0.0088 after 1000),
    # 128 did not (0.0058 after 1000); 256 for longer runs (benchmarks/results/finetune_settings_probe.log)
    samples: int = 256
    batch: int = 16
    rank: int = 32
    lr: float = 5e-4
    scale_lr: float = 1e-3
    weight_lr: float = 1e-4
    warmup: int = 50
    train: tuple[str, ...] = ("lora", "scales")
    sigma_weight: float = 0.0
    rollout: int = 1
    rollout_fallback: bool = False
    eval_every: int = 250
    max_minutes: float | None = None
    checkpoint_every: int = 0
    seed: int = 0

    def __post_init__(self):
        _check_fields(self, "finetune.")
        if self.iterations < 0 or self.samples < 1 or self.batch < 1 or self.rank < 1 or self.checkpoint_every < 0:
            raise ValueError("finetune samples, batch and rank must be >= 1, iterations and checkpoint_every >= 0")
        if self.eval_every < 0 or self.warmup < 0:
            raise ValueError(f"finetune eval_every and warmup must be >= 0, got {self.eval_every}, {self.warmup}")
        if not (self.lr > 0 and self.scale_lr > 0 and self.weight_lr > 0):
            raise ValueError(
                f"finetune lr, scale_lr and weight_lr must be > 0, got {self.lr}, {self.scale_lr}, {self.weight_lr}"
            )
        if not self.train or set(self.train) - set(FINETUNE_TRAIN):
            raise ValueError(f"finetune train must name some of {FINETUNE_TRAIN}, got {self.train}")
        if not self.sigma_weight >= 0:
            raise ValueError(f"finetune sigma_weight must be >= 0, got {self.sigma_weight}")
        if self.rollout < 1:
            raise ValueError(f"finetune rollout must be >= 1 (1: each recorded call alone), got {self.rollout}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"finetune max_minutes must be > 0 or None, got {self.max_minutes}")


@dataclass(frozen=True)
class Override:
    """Per-module settings for modules whose qualified name matches ``pattern`` (fnmatch).

    Fields left ``None`` keep the recipe's value; ``weight_group_size=0`` means one scale per
    output channel; ``skip=True`` keeps the module in float.
    """

    pattern: str
    weights: str | None = None
    weight_group_size: int | None = None
    activations: str | None = None
    skip: bool = False

    def __post_init__(self):
        _check_fields(self, "override ")
        for fmt in (self.weights, self.activations):
            if fmt is not None and fmt != "none":
                get_qtype(fmt)
        if self.weight_group_size is not None and not 0 <= self.weight_group_size <= 4096:
            raise ValueError(
                f"override weight_group_size must be 0 (per channel), 1..4096 or None, got {self.weight_group_size}"
            )


@dataclass(frozen=True)
class Recipe:
    """A quantization recipe.

    Args:
        name: label (named recipes keep their name; derived ones should rename).
        weights: weight format (``int8``, ``int4``, ``fp8_e4m3``, ``ternary``, ``binary``), or ``none``.
        weight_group_size: weights per scale (32-128), or ``None`` for one scale per output channel.
        weight_method: how integer weights are rounded: ``rtn`` (nearest, absmax scales), ``mse``
            (nearest, scales searched for the least rounding error), ``gptq`` (GPTQ's
            error-compensating rounding with Hessians from the calibration trajectory) or
            ``gptq-seq`` (GPTQ layer after layer, each from its inputs in the partly quantized
            model); see :mod:`diffquant.methods.gptq`.
        activations: activation format (``int8``, ``int6``, ``int4``, ``fp8_e4m3``), or ``none``
            for weight-only quantization.
        act_mode: ``static`` (one scale for all steps), ``bucketed`` (``buckets`` groups of
            steps), ``tdq`` (a fitted function of the time step, tabulated per step: Temporal
            Dynamic Quantization), ``dynamic`` (computed on the fly).
        act_granularity: ``tensor``, ``token`` (one scale per token: per row of a Linear input, per
            pixel of a convolution's) or ``group`` (one per token and per ``act_group_size`` channels
            of it); ``token`` and ``group`` need ``dynamic``.
        act_group_size: channels per scale of ``group`` granularity.
        act_symmetric: symmetric activation grid (default asymmetric, with a zero point).
        buckets: number of step groups for ``bucketed``.
        observer: ``minmax``, ``percentile``, ``mse`` or ``step-percentile`` (TensorRT's
            Percentile Quant: per-step extremes reduced over the first steps).
        percentile: for the percentile observer.
        step_percentile, step_reduction: for ``step-percentile``: the share of the steps used,
            counted from the first denoising step, and ``min`` or ``mean``.
        lp_norm: the ``p`` of the mse observer's L_p error (PTQ4DM: 2.4).
        attention: quantize the attention matmuls (Q·Kᵀ and P·V).
        softmax: format of the softmax output ``P`` (``none`` keeps it float).
        split_shortcut: separate scales for the two halves of UNet skip concatenations.
        exclude: fnmatch patterns of modules kept in float.
        weight_only: fnmatch patterns of modules whose weights are quantized and activations not.
        overrides: per-module :class:`Override` entries, the last match wins.
        calibration: :class:`CalibrationConfig`.
        gptq: :class:`GPTQConfig` (Hessian steps, samples and memory budget of GPTQ).
        output_fit: :class:`OutputFitConfig` (the output correction's and TDQ output fit's settings).
        tdq_hidden, tdq_freqs, tdq_iters: TDQ generator width, Fourier frequencies, fitting steps.
        tdq_fit: what the TDQ generators are fitted to: ``range`` (each layer's per-step optimal
            range) or ``output`` (the range fit, then trained on the denoiser's output error along
            the trajectory, :func:`diffquant.methods.tdq.fit_to_output`).
        tdq_fit_iters: gradient steps per calibrated time step of the ``output`` fit.
        smoothquant: SmoothQuant on every quantized Linear (x / s, W * s).
        smoothquant_alpha: a fixed migration strength, or ``None`` to search it per layer.
        weight_bits_budget: mixed precision: average nominal weight bits (e.g. 4.5) over the
            quantized layers; layers move from ``weights`` to ``int8`` by measured sensitivity.
            :func:`~diffquant.quantize` resolves it into ``overrides`` before quantizing.
        output_correction: fit a per-step gain on the denoiser's output that undoes the part of
            the quantization error correlated with the output (PTQD's correlated-noise correction),
            tabulated per time step (:mod:`diffquant.methods.output_correction`).
        quant_level: ModelOpt-style scope: 1 convolutions; 2 + feed-forward Linears; 2.5 + Q/K/V
            projections; 3 all Linears; 4 + attention matmuls. ``None``: everything the other
            fields allow.
    """

    name: str = "custom"
    weights: str = "int8"
    weight_group_size: int | None = None
    weight_method: str = "rtn"
    activations: str = "int8"
    act_mode: str = "static"
    act_granularity: str = "tensor"
    act_group_size: int = 16
    act_symmetric: bool = False
    buckets: int = 1
    observer: str = "mse"
    percentile: float = 99.99
    step_percentile: float = 1.0
    step_reduction: str = "mean"
    lp_norm: float = 2.4
    attention: bool = True
    softmax: str = "int8"
    split_shortcut: bool = True
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    weight_only: tuple[str, ...] = DEFAULT_WEIGHT_ONLY
    overrides: tuple[Override, ...] = ()
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    output_fit: OutputFitConfig = field(default_factory=OutputFitConfig)
    finetune: FinetuneConfig | None = None
    tdq_hidden: int = 64
    tdq_freqs: int = 8
    tdq_iters: int = 600
    tdq_fit: str = "range"
    tdq_fit_iters: int = 16
    smoothquant: bool = False
    smoothquant_alpha: float | None = None
    quant_level: float | None = None
    output_correction: bool = False
    weight_bits_budget: float | None = None
    version: int = RECIPE_VERSION

    def __post_init__(self):
        _check_fields(self, "recipe field ")
        if self.version != RECIPE_VERSION:
            raise ValueError(f"recipe version {self.version} is not supported (this diffquant reads {RECIPE_VERSION})")
        if self.weights != "none":
            get_qtype(self.weights)
        for fmt in (self.activations, self.softmax):
            if fmt != "none" and get_qtype(fmt).kind not in ("int", "float"):
                raise ValueError(f"activations take int2..int8 or fp8_e4m3, not {fmt}")
        if self.weight_group_size is not None and not 1 <= self.weight_group_size <= 4096:
            raise ValueError(f"weight_group_size must be in 1..4096 or None, got {self.weight_group_size}")
        if self.weight_method not in WEIGHT_METHODS:
            raise ValueError(f"weight_method must be one of {WEIGHT_METHODS}, got {self.weight_method!r}")
        if self.act_mode not in ("static", "bucketed", "tdq", "dynamic"):
            raise ValueError(f"act_mode must be static, bucketed, tdq or dynamic, got {self.act_mode!r}")
        if self.tdq_hidden < 1 or self.tdq_freqs < 1 or self.tdq_iters < 0:
            raise ValueError("tdq_hidden and tdq_freqs must be >= 1, tdq_iters >= 0")
        if self.tdq_fit not in ("range", "output") or self.tdq_fit_iters < 0:
            raise ValueError(f"tdq_fit must be 'range' or 'output' and tdq_fit_iters >= 0, got {self.tdq_fit!r}")
        if self.tdq_fit == "output" and self.act_mode != "tdq":
            raise ValueError(f"tdq_fit='output' refits TDQ ranges: it needs act_mode='tdq', got {self.act_mode!r}")
        if self.act_granularity not in ("tensor", "token", "group"):
            raise ValueError(f"act_granularity must be tensor, token or group, got {self.act_granularity!r}")
        if self.act_granularity != "tensor" and self.act_mode != "dynamic":
            raise ValueError(f"per-{self.act_granularity} activation scales need act_mode='dynamic'")
        if self.act_group_size < 1:
            raise ValueError(f"act_group_size must be >= 1, got {self.act_group_size}")
        if self.act_mode == "bucketed" and self.buckets < 2:
            raise ValueError("bucketed mode needs buckets >= 2")
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}, got {self.observer!r}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if not 0 < self.step_percentile <= 1 or self.step_reduction not in ("min", "mean"):
            raise ValueError("step_percentile must be in (0, 1] and step_reduction 'min' or 'mean'")
        if self.smoothquant_alpha is not None and not 0 <= self.smoothquant_alpha <= 1:
            raise ValueError(f"smoothquant_alpha must be in [0, 1] or None, got {self.smoothquant_alpha}")
        budget = self.weight_bits_budget
        if budget is not None and (self.weights == "none" or not get_qtype(self.weights).bits < budget <= 8):
            raise ValueError(
                f"weight_bits_budget must lie above the bits of weights ({self.weights}) and at most 8, got {budget}"
            )
        if self.quant_level is not None and self.quant_level not in QUANT_LEVELS:
            raise ValueError(f"quant_level must be one of {QUANT_LEVELS} or None, got {self.quant_level}")
        if self.lp_norm <= 0:
            raise ValueError(f"lp_norm must be > 0, got {self.lp_norm}")

    # ------------------------------------------------------------------ derived settings
    @property
    def quantizes_activations(self) -> bool:
        return self.activations != "none"

    @property
    def needs_calibration(self) -> bool:
        return self.quantizes_activations and self.act_mode != "dynamic"

    @property
    def quantizes_attention(self) -> bool:
        """Whether the attention matmuls are quantized (``attention`` and, if set, quant level 4)."""
        return self.attention and self.quantizes_activations and (self.quant_level is None or self.quant_level >= 4)

    def in_level(self, module_name: str, kind: str) -> bool:
        """Whether a ``conv`` or ``linear`` module is inside this recipe's quant level."""
        if self.quant_level is None:
            return True
        if kind == "conv":
            return True
        if any(fnmatchcase(module_name, p) for p in FEED_FORWARD):
            return self.quant_level >= 2
        if any(fnmatchcase(module_name, p) for p in QKV):
            return self.quant_level >= 2.5
        return self.quant_level >= 3

    def settings_for(self, module_name: str, kind: str = "linear") -> dict | None:
        """Settings of a module (``kind`` ``conv``, ``linear`` or ``embedding``), or ``None`` if it stays in float."""
        if any(fnmatchcase(module_name, p) for p in self.exclude) or not self.in_level(module_name, kind):
            return None
        s = {"weights": self.weights, "weight_group_size": self.weight_group_size, "activations": self.activations}
        if any(fnmatchcase(module_name, p) for p in self.weight_only):
            s["activations"] = "none"
        elif kind == "embedding":
            return None
        if kind == "embedding" and s["weights"] != "none" and get_qtype(s["weights"]).bits < 8:
            s.update(weights="int8", weight_group_size=None)  # see DEFAULT_WEIGHT_ONLY
        for o in self.overrides:
            if fnmatchcase(module_name, o.pattern):
                if o.skip:
                    return None
                s.update({k: v for k, v in dataclasses.asdict(o).items() if k in s and v is not None})
        if s["weight_group_size"] == 0:
            s["weight_group_size"] = None
        if s["weights"] == "none" and s["activations"] == "none":
            return None
        return s

    def replace(self, **changes) -> Recipe:
        """A copy with some fields changed (``calibration``, ``gptq``, ``output_fit`` may be dicts of their fields)."""
        for key, cls_ in NESTED.items():
            if isinstance(changes.get(key), dict):
                current = getattr(self, key)
                changes[key] = cls_(**changes[key]) if current is None else dataclasses.replace(current, **changes[key])
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        if not isinstance(d, dict):
            raise RecipeFieldError(f"a recipe is a JSON object of recipe fields, got {type(d).__name__}")
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown and unknown <= set(RECIPES):
            raise ValueError(
                "this holds several named recipes (what `diffquant recipes --json` prints); "
                "a recipe file is one of them: `diffquant recipes NAME --json`"
            )
        if unknown:
            raise ValueError(f"unknown recipe fields {sorted(unknown)}")
        for key, cls_ in NESTED.items():  # recipes saved before a nested config existed take its defaults
            if key in d and d[key] is not None:
                d[key] = cls_(**_fields_of(d[key], key, cls_))
        if "overrides" in d:
            if not isinstance(d["overrides"], list | tuple):
                raise RecipeFieldError(f"recipe field overrides must be a list of objects, got {d['overrides']!r}")
            d["overrides"] = tuple(Override(**_fields_of(o, "overrides[]", Override)) for o in d["overrides"])
        # recipes saved before ``weight_only`` existed kept those layers in float (in ``exclude``);
        # lists become tuples in the field check
        d.setdefault("weight_only", ())
        return cls(**d)

    @classmethod
    def from_json(cls, text: str, source: str = "recipe") -> Recipe:
        """A recipe from JSON text; errors name ``source`` (e.g. the file it was read from)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{source} is not JSON ({e}); a recipe file is what `diffquant recipes NAME --json` prints"
            ) from None
        try:
            return cls.from_dict(data)
        except RecipeFieldError as e:
            raise RecipeFieldError(f"{source}: {e}") from None
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None


def _fields_of(value, key: str, cls_) -> dict:
    """A nested config's fields from JSON: an object whose keys are ``cls_``'s fields."""
    if not isinstance(value, dict):
        raise RecipeFieldError(f"recipe field {key} must be an object of {cls_.__name__} fields, got {value!r}")
    unknown = set(value) - {f.name for f in dataclasses.fields(cls_)}
    if unknown:
        raise ValueError(f"unknown {key} fields {sorted(unknown)}")
    return value


NESTED = {
    "calibration": CalibrationConfig, "gptq": GPTQConfig, "output_fit": OutputFitConfig, "finetune": FinetuneConfig,
}  # fmt: skip


def _named(name: str, **kw) -> Recipe:
    # named recipes with integer weights round them with GPTQ: PSNR against FP, round-to-nearest vs GPTQ,
    # fashion-unet W8A16 35.2 / 53.3 dB, W4A16 18.3 / 31.1 dB; fashion-dit W4A16 20.7 / 32.1 dB
    # (benchmarks/results/weight_rounding.md)
    weights = kw.get("weights", "int8")
    if weights != "none" and get_qtype(weights).kind == "int":
        kw.setdefault("weight_method", "gptq")
    return Recipe(name=name, **kw)


INT4 = {"weights": "int4", "weight_group_size": 32}
# Fine-tuned recipes (:mod:`diffquant.methods.finetune`): per-channel weights (what the CPU and CUDA
# integer kernels take). 4-bit activations: dynamic scales per 16 channels of each token (the default),
# or learned per step (EfficientDM's TALSQ table: one bucket per step of the calibration schedule,
# ``-table-``), or TDQ's generator trained with them (``-tdq-``), all trained with a five-step rollout.
# Measured (N = 500, DDIM-50, docs/quantization.md): per group + rollout=5, 400 steps: fashion-unet W4A4
# FD gap +20 %, fashion-dit W4A4 +15 %; the per-step table with the one-step loss, 2000 steps: +191 %.
PER_STEP = {"act_mode": "bucketed", "buckets": 50, "calibration": CalibrationConfig(selection="all")}
PER_GROUP = {"act_mode": "dynamic", "act_granularity": "group", "act_group_size": 16}
ROLLOUT = FinetuneConfig(rollout=5, rollout_fallback=True, iterations=400, eval_every=100)
# Below 4 bits (ternary, binary) the conditioning layers keep int8 weights, as binary-weight papers keep
# their first and last layers and embeddings at 8 bits (first and last are float here: DEFAULT_EXCLUDE).
CONDITIONING_INT8 = tuple(Override(p, weights="int8") for p in DEFAULT_WEIGHT_ONLY)


FULL_QAT = FinetuneConfig(train=("weights", "scales"))


def _fine_tuned(name: str, **kw) -> Recipe:
    kw.setdefault("finetune", FinetuneConfig())
    return _named(name, **kw)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        _named("w8a8"),
        # data-free: dynamic activations and round-to-nearest weights need no calibration trajectory
        _named("w8a8-dynamic", act_mode="dynamic", act_granularity="token", weight_method="rtn"),
        _named("w8a7", activations="int7"),
        _named("w8a6", activations="int6"),
        _named("w8a4", activations="int4"),
        # groups of 32 and the per-step output correction: fashion-unet W4A8 FD gap +52.5 % -> +11.8 % (N = 5000,
        # benchmarks/results/ptq_table_n5000.md)
        _named("w4a8", **INT4, output_correction=True),
        _named("w4a4", **INT4, activations="int4"),
        _named("fp8", weights="fp8_e4m3", activations="fp8_e4m3", attention=False),
        _named("fp8-attn", weights="fp8_e4m3", activations="fp8_e4m3", softmax="fp8_e4m3"),
        _named("w8a16", activations="none", attention=False),
        _named("w8a8-smoothquant", smoothquant=True),
        _named("auto", **INT4, weight_bits_budget=4.5),
        _named(
            "w8a8-percentile",
            observer="step-percentile",
            step_percentile=1.0,
            step_reduction="mean",
            calibration=CalibrationConfig(selection="all"),
        ),
        *(
            _named(f"{base}-tdq", act_mode="tdq", calibration=CalibrationConfig(selection="all"), **kw)
            # 4-bit activations refit the ranges to the output error: fashion-unet W8A4 FD gap +243 % -> +62 %,
            # W4A4 +292 % -> +140 % (fashion-dit: +73 % -> +79 %, within the intervals), at about twice the
            # calibration time (benchmarks/results/ptq_table_n500.md, rows tdq / tdq-out)
            for base, kw in (
                ("w8a8", {}),
                ("w8a7", {"activations": "int7"}),
                ("w8a6", {"activations": "int6"}),
                ("w8a4", {"activations": "int4", "tdq_fit": "output"}),
                ("w4a8", INT4),
                ("w4a4", {**INT4, "activations": "int4", "tdq_fit": "output"}),
            )
        ),
        _named("w4a16", **INT4, activations="none", attention=False),
        _fine_tuned("w8a4-ft", activations="int4", finetune=ROLLOUT, **PER_GROUP),
        _fine_tuned("w4a4-ft", weights="int4", activations="int4", finetune=ROLLOUT, **PER_GROUP),
        _fine_tuned("w8a4-table-ft", activations="int4", finetune=ROLLOUT, **PER_STEP),
        _fine_tuned("w4a4-table-ft", weights="int4", activations="int4", finetune=ROLLOUT, **PER_STEP),
        _fine_tuned(
            "w4a4-tdq-ft",
            weights="int4",
            activations="int4",
            act_mode="tdq",
            calibration=CalibrationConfig(selection="all"),
            finetune=ROLLOUT,
        ),
        # ternary / binary weights train themselves (full QAT), not a low-rank update: fashion-unet W2A8, 2000
        # steps, FD gap +218 % vs LoRA's +422 % (N = 500, benchmarks/results/finetune_probe.jsonl)
        _fine_tuned("w2a8-ft", weights="ternary", overrides=CONDITIONING_INT8, finetune=FULL_QAT, **PER_STEP),
        _fine_tuned("w1a8-ft", weights="binary", overrides=CONDITIONING_INT8, finetune=FULL_QAT, **PER_STEP),
    )
}


def get_recipe(recipe: str | Recipe) -> Recipe:
    """A named recipe (or the recipe itself). Unknown names raise a ``ValueError`` listing the valid ones."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"Unknown recipe {recipe!r}. Named recipes: {', '.join(RECIPES)}.")
    return RECIPES[recipe]
