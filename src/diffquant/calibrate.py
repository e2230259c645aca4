"""Calibration on the full-precision model's own sampling trajectory.

The quantized model runs the sampler with weight and activation quantization switched off (so the
trajectory is the FP one); at the steps the selection picks, its activation quantizers observe
their inputs. Nothing is stored but the observers' per-step histograms, so memory does not grow
with the number of calibration samples.

Step selection (see :class:`~diffquant.recipe.CalibrationConfig`): ``single`` (one step),
``uniform`` (Q-Diffusion, Li et al. 2023: every k-th step), ``ndtc`` (PTQ4DM, Shang et al. 2023:
per sample, the step nearest ``t = int(N(0.4, 0.4) T)`` clamped to ``[0, T)``), ``all``.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from diffquant.nn.quantizer import ActQuantizer, CalibrationError
from diffquant.observers import make_observer
from diffquant.recipe import CalibrationConfig, Recipe
from diffquant.sampling import SamplerConfig, balanced_labels, make_scheduler, sample_batch
from diffquant.timestep import current_step


def selected_rows(config: CalibrationConfig, timesteps: list[int], n: int, num_timesteps: int) -> list[list[int]]:
    """For each sampler step index, the calibration samples (0..n-1) observed at it."""
    steps = len(timesteps)
    rows: list[list[int]] = [[] for _ in range(steps)]
    everyone = list(range(n))
    if config.selection == "all":
        return [everyone[:] for _ in range(steps)]
    if config.selection == "single":
        rows[config.single_index % steps] = everyone
        return rows
    if config.selection == "uniform":
        chosen = (
            range(0, steps, config.every) if config.uniform_from == "first" else range(steps - 1, -1, -config.every)
        )
        for k in chosen:
            rows[k] = everyone[:]
        return rows
    # ndtc: t_i = clamp(int(N(mean, std) * T), 0, T - 1); observe sample i at the step nearest t_i
    rng = np.random.default_rng(config.seed)
    t_draw = np.clip(
        (rng.normal(config.ndtc_mean, config.ndtc_std, n) * num_timesteps).astype(int), 0, num_timesteps - 1
    )
    ts = np.asarray(timesteps)
    for i, t in enumerate(t_draw):
        rows[int(np.abs(ts - t).argmin())].append(i)
    return rows


def step_buckets(timesteps: list[int], buckets: int) -> list[list[int]]:
    """Split a schedule's time steps (noisiest first) into ``buckets`` contiguous groups."""
    return [list(map(int, g)) for g in np.array_split(np.asarray(timesteps), buckets) if len(g)]


@contextlib.contextmanager
def observing(quantizers: list[ActQuantizer], on: bool = True):
    """Switch the observers of ``quantizers`` on (or off) inside the block."""
    before = [q.observing for q in quantizers]
    for q in quantizers:
        q.observing = on
    try:
        yield
    finally:
        for q, b in zip(quantizers, before, strict=True):
            q.observing = b


class CallObserver(abc.ABC):
    """Base of observers that act on whole denoiser calls at the observed steps.

    Runners switch ``observing`` on inside the sampler step around the FP call of the selected rows;
    that arms the observer with the step, and a forward hook on the model (which a pipeline runner's
    own forward wrapper may run outside that step) reads it and passes the call to :meth:`on_call`.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.busy = False  # set while the observer itself calls the model
        self.armed = None
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True, prepend=True)

    @property
    def observing(self) -> bool:
        return self.armed is not None

    @observing.setter
    def observing(self, on: bool):
        if on and not self.busy:
            self.armed = current_step()

    def _hook(self, module, args, kwargs, output):
        step, self.armed = self.armed, None
        if step is not None and not self.busy:
            self.on_call(args, kwargs, output, step)

    @abc.abstractmethod
    def on_call(self, args: tuple, kwargs: dict, output, step) -> None:
        """One observed call of the model: its inputs, its output and the step it was armed with."""

    def remove(self) -> None:
        self.handle.remove()


def map_tensors(fn: Callable, value):
    """``value`` with ``fn`` applied to every tensor in it (tuples, lists and dicts walked)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(fn, v) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(fn, v) for k, v in value.items()}
    return value


def clone_tensors(value):
    """Detached copies of the tensors in a call's arguments."""
    return map_tensors(lambda t: t.detach().clone(), value)


class CallRecorder(CallObserver):
    """Keeps the observed denoiser calls ``(args, kwargs, step)`` for replaying them."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.calls: list[tuple] = []

    def on_call(self, args, kwargs, output, step):
        self.calls.append((clone_tensors(args), clone_tensors(kwargs), step))


def _quant_switches(model: nn.Module) -> list[tuple[object, str]]:
    from diffquant.methods.output_correction import OutputCorrection
    from diffquant.nn.modules import QuantModule

    out: list[tuple[object, str]] = []
    for m in model.modules():
        if isinstance(m, QuantModule):
            out.append((m, "weight_quant_enabled"))
        elif isinstance(m, (ActQuantizer, OutputCorrection)):
            out.append((m, "enabled"))
    return out


@contextlib.contextmanager
def _switched(model: nn.Module, on: bool):
    switches = _quant_switches(model)
    before = [getattr(m, a) for m, a in switches]
    for m, a in switches:
        setattr(m, a, on)
    try:
        yield
    finally:
        for (m, a), b in zip(switches, before, strict=True):
            setattr(m, a, b)


def full_precision(model: nn.Module):
    """Run the model in float: weight fake-quant, activation quantizers and the output correction off
    (for the FP trajectory)."""
    return _switched(model, False)


def quantized(model: nn.Module):
    """Run the model quantized (inside :func:`full_precision`, for comparing the two on one input)."""
    return _switched(model, True)


def has_builtin_sampler(model: nn.Module) -> bool:
    """Whether calibration can run the model's own sampler (built-in models: ``config``, ``num_classes``,
    ``sample_shape``); other models need a runner."""
    return all(hasattr(model, a) for a in ("config", "num_classes", "sample_shape"))


def _builtin_runner(model: nn.Module, config: CalibrationConfig, observe: Callable, progress: bool) -> list[int]:
    """Run calibration trajectories of a built-in-style denoiser (``config``, ``num_classes``, ``sample_shape``)."""
    from tqdm.auto import tqdm

    if not has_builtin_sampler(model):
        raise TypeError(
            "this model has no built-in sampler settings (config['scheduler'], num_classes, sample_shape); "
            "pass calibration=run(model, config, observe) that runs its sampler"
        )
    schedule = model.config["scheduler"]
    timesteps = [int(t) for t in make_scheduler(config.sampler, schedule, config.steps).timesteps]
    rows = selected_rows(config, timesteps, config.n_samples, schedule["num_train_timesteps"])
    sampler = SamplerConfig(sampler=config.sampler, steps=config.steps, seed=config.seed)
    bar = tqdm(
        total=config.n_samples * config.steps, desc="calibrating", unit="step", disable=not progress, leave=False
    )
    for lo in range(0, config.n_samples, config.batch_size):
        hi = min(config.n_samples, lo + config.batch_size)
        labels = balanced_labels(hi - lo, model.num_classes, lo)
        batch_rows = [[r - lo for r in rs if lo <= r < hi] for rs in rows]

        def model_fn(x, t, y, batch_rows=batch_rows):
            return observe(model, x, t, y, batch_rows[current_step().index])

        sample_batch(
            model_fn, range(lo, hi), labels, sampler, schedule, model.sample_shape, model.num_classes,
            on_step=lambda *a, m=hi - lo: bar.update(m),
        )  # fmt: skip
    bar.close()
    return timesteps


def _make_observe(model: nn.Module, observers: list | None = None) -> Callable:
    """``observe(model, x, t, cond, rows)``: the FP model call of one step, observing the selected rows.

    ``observers`` are the objects switched on (anything with an ``observing`` flag; default: the
    model's activation quantizers). ``observe.quantizers`` lists them, for runners that call the
    model their own way (see :func:`observed_call`).
    """
    quants = observers if observers is not None else [m for m in model.modules() if isinstance(m, ActQuantizer)]

    def observe(model, x, t, y, rows):
        def call(idx):
            return model(x, t, y) if idx is None else model(x[idx], t[idx], y[idx])

        return observed_call(quants, call, rows, x.shape[0])

    observe.quantizers = quants
    return observe


def observed_call(quantizers: list[ActQuantizer], call: Callable, rows: list[int], batch: int):
    """One model evaluation that lets ``quantizers`` observe only the batch rows ``rows``.

    ``call(None)`` runs the whole batch, ``call(idx)`` the rows ``idx`` (a long tensor). When some
    but not all rows are selected, they are run once more with the observers on; the returned output
    is always the whole batch's, computed with the observers off, so the trajectory is unchanged.
    """
    if len(rows) == batch:
        with observing(quantizers):
            return call(None)
    if rows:
        with observing(quantizers):
            call(torch.tensor(rows))
    return call(None)


def recipe_observer(recipe: Recipe):
    """A fresh observer of the kind (and settings) ``recipe`` calibrates activations with."""
    kwargs = {"percentile": {"percentile": recipe.percentile}, "mse": {"p": recipe.lp_norm}}.get(recipe.observer, {})
    return make_observer(recipe.observer, **kwargs)


def _observed_range(recipe: Recipe, qtype, symmetric: bool):
    """``x -> (lo, hi)``: the range the recipe's observer picks for ``x`` seen at one step."""

    def act_range(x: torch.Tensor):
        obs = recipe_observer(recipe)
        obs.update(x, 0)
        return obs.range(qtype, symmetric)

    return act_range


@torch.no_grad()
def smooth(
    model: nn.Module, recipe: Recipe, config: CalibrationConfig, runner=None, progress=True
) -> dict[str, float | None]:
    """SmoothQuant's first pass: per-channel activation maxima and sample rows on the trajectory,
    then each layer's factors with a fixed or searched alpha. Returns ``{layer: alpha}`` (``None``:
    the search kept the layer unsmoothed)."""
    from diffquant.methods.smoothquant import SmoothStats, search_alpha, smoothing_factors
    from diffquant.nn.modules import QuantModule

    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantModule) and m.smooth is not None}
    for m in layers.values():
        m.smooth.fill_(1.0)
        m.smooth_stats = SmoothStats()
    try:
        with full_precision(model):
            (runner or _builtin_runner)(model, config, _make_observe(model), progress)
        alphas = {}
        for name, m in layers.items():
            stats = m.smooth_stats
            if stats.absmax is None:
                raise CalibrationError(f"{name}: no calibration data reached this layer")
            if recipe.smoothquant_alpha is not None:
                alpha, s = recipe.smoothquant_alpha, smoothing_factors(stats.absmax, m.weight, recipe.smoothquant_alpha)
            else:
                q = m.input_quantizer
                alpha, s, _ = search_alpha(
                    stats, m.weight, q.qtype, m.weight_qtype, m.group_size, q.symmetric,
                    act_range=_observed_range(recipe, q.qtype, q.symmetric),
                )  # fmt: skip
            m.smooth.copy_(s.to(m.smooth.dtype))
            alphas[name] = alpha
        model.diffquant_smoothquant_alphas = alphas
        return alphas
    finally:
        for m in layers.values():
            m.smooth_stats = None


def fit_tdq(quantizers: list[ActQuantizer], recipe: Recipe) -> list[float]:
    """Fit the TDQ generators of ``quantizers`` to their per-step optimal ranges, then freeze tables.

    Returns the RMS log-range error of each fit (how far the smooth ``g(t)`` is from the per-step optimum).
    """
    from diffquant.methods.tdq import fit_generators

    if not quantizers:
        return []
    pairs = [q.tdq_targets() for q in quantizers]
    for q, pair in zip(quantizers, pairs, strict=True):
        q.fit_targets = pair  # in memory, for plots (report.plots.plot_tdq_intervals); not saved
    errors = fit_generators(
        [q.generator for q in quantizers], [p[0] for p in pairs], [p[1] for p in pairs], iters=recipe.tdq_iters
    )
    for q in quantizers:
        q.write_tdq_table()
    return errors


@torch.no_grad()
def calibrate(
    model: nn.Module,
    recipe: Recipe,
    config: CalibrationConfig | None = None,
    runner: Callable | None = None,
    progress: bool = True,
) -> None:
    """Observe activations along FP trajectories and set every static/bucketed quantizer's scales.

    Args:
        model: a model prepared by :func:`diffquant.quantize.prepare`.
        recipe: gives the observer and the bucket count.
        config: the calibration (default: ``recipe.calibration``).
        runner: ``runner(model, config, observe, progress) -> timesteps`` running trajectories for
            models without built-in sampler settings; it must call ``observe(model, x, t, cond,
            rows)`` for each model evaluation inside a ``denoising_step`` context and return the
            schedule's time steps.
        progress: show a progress bar.
    """
    config = config or recipe.calibration
    if recipe.smoothquant:
        smooth(model, recipe, config, runner, progress)
    quants = [m for m in model.modules() if isinstance(m, ActQuantizer) and m.mode != "dynamic"]
    for q in quants:
        q.observer = recipe_observer(recipe)
    try:
        with full_precision(model):
            timesteps = (runner or _builtin_runner)(model, config, _make_observe(model), progress)
        groups = step_buckets(timesteps, recipe.buckets) if recipe.act_mode == "bucketed" else None
        for q in quants:
            if q.mode != "tdq":
                q.finalize(groups)
        fit_tdq([q for q in quants if q.mode == "tdq"], recipe)
    finally:
        for q in quants:
            q.observer = None
            q.observing = False
