"""Weight rounding beyond round-to-nearest: a clipping search and GPTQ.

``weight_method`` in a recipe picks how integer weights are rounded:

``rtn``
    round to nearest with the absmax scale of each output channel or group (the ``Recipe`` default;
    named recipes with integer weights use ``gptq``, except the data-free ``w8a8-dynamic``).
``mse``
    round to nearest with each group's scale searched for the least squared rounding error
    (:func:`~diffquant.primitives.search_weight_scale`); data-free.
``gptq``
    GPTQ (Frantar et al., ICLR 2023): the columns of a layer's weight are rounded one at a time
    and the rounding error of each is pushed onto the columns not yet rounded, weighted by the
    inverse Hessian ``H = 2/n sum x x^T`` of the layer's inputs, so that the layer *output* error
    ``||X W^T - X Q^T||`` is small rather than the weight error. Group scales are chosen (by the
    clipping search) when the rounding reaches a group's first column, from the already-updated
    weights. ``H`` is collected on the full-precision model's own sampling trajectory, like the
    activation ranges, at the last step of the calibration sampler and every ``GPTQ_EVERY``-th
    step before it (counting from the first step instead never saw the last four steps, whose
    errors reach the image directly: fashion-unet ``w4a8``'s last-step error 0.73 % -> 0.50 % of
    the output's energy, ``benchmarks/results/error_by_step_fashion-unet.md``); convolution inputs
    are unfolded into their ``C * kh * kw`` patches. Layers are rounded independently from
    FP inputs. Calibrated on DDIM-50, the rounding carries to steps it was not
    fitted on: fashion-dit W4A16 32.0 / 32.2 dB PSNR vs FP on DDIM-20 / DPM-Solver++-20, and 30.7 /
    30.9 dB with Hessians from every step instead (``benchmarks/results/weight_rounding.md``).
``gptq-seq``
    GPTQ with the layers rounded one after another in the order the forward reaches them, each
    layer's Hessian collected from its inputs in the partly quantized model: the layers before it
    rounded, the activation quantizers on (its own input quantizer included). The denoiser calls of
    the calibration trajectory are recorded once and replayed per layer, stopping at that layer.
    The rounding then sees the input error the quantized model will feed it, as in the GPTQ
    paper's sequential mode. Costs one partial forward pass per layer over the recorded calls
    (fashion-unet: about 6 minutes on one CPU thread). Measured against ``gptq`` in
    ``docs/quantization.md`` ("Weight rounding"); the named recipes keep ``gptq``.

Integer and FP8 E4M3 weights are affected (an FP8 column is rounded to the nearest E4M3 value of the
scaled weight, with absmax scales); ternary and binary weights keep their own rule.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from diffquant import primitives as P
from diffquant.calibrate import CallRecorder
from diffquant.qtypes import QType
from diffquant.recipe import WEIGHT_METHODS

GPTQ_EVERY = 5  # Hessians from every 5th calibration step, counted back from the last (cleanest) one
GPTQ_FROM = "last"  # CalibrationConfig.uniform_from of the Hessian steps
GPTQ_MAX_SAMPLES = 64  # calibration trajectories used for the Hessians
GPTQ_ROWS_PER_CALL = 8192  # input rows (tokens / pixels) a layer adds to its Hessian per model call


class _Stop(Exception):
    """Raised by a pre-hook to end a replayed forward pass at the layer being rounded."""


def _stop(module, args):
    raise _Stop


class HessianCollector:
    """Accumulates ``sum x x^T`` of a layer's input (the weight's columns' space) while ``observing``.

    It is switched on and off with the activation quantizers' ``observing`` protocol (see
    :func:`diffquant.calibrate.observed_call`), so only the selected calibration rows count.
    Rows beyond ``GPTQ_ROWS_PER_CALL`` per call are subsampled (seeded), keeping the cost bounded.
    With ``quantized_input`` the rows are the input after the layer's own input quantizer (what the
    quantized weight multiplies), else the float input.
    """

    def __init__(self, module: nn.Module, seed: int = 0, quantized_input: bool = False):
        self.module = module
        self.quantized_input = quantized_input
        self.observing = False
        self.hessian: torch.Tensor | None = None
        self.rows = 0
        self.gen = torch.Generator().manual_seed(seed)
        self.handle = module.register_forward_pre_hook(self._hook)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if self.quantized_input:  # x / s (SmoothQuant) and the input quantizer, as the forward does
            x = m.quantize_input(x, 1 if m.weight.dim() == 4 else -1)
        elif m.smooth is not None:  # SmoothQuant (Linear layers): the quantized weight is W * s, its input x / s
            x = x / m.smooth.to(x.dtype)
        if m.weight.dim() == 4:  # Conv2d: (B, C*kh*kw, L) patches, in the weight's flattening order
            cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            return cols.transpose(1, 2).reshape(-1, cols.shape[1])
        return x.reshape(-1, x.shape[-1])

    def _hook(self, module, args):
        if not self.observing:
            return
        rows = self._rows(args[0].detach().float())
        if rows.shape[0] > GPTQ_ROWS_PER_CALL:
            rows = rows[torch.randperm(rows.shape[0], generator=self.gen)[:GPTQ_ROWS_PER_CALL].to(rows.device)]
        h = rows.T @ rows
        self.hessian = h if self.hessian is None else self.hessian + h
        self.rows += rows.shape[0]

    def remove(self) -> None:
        self.handle.remove()


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    qtype: QType,
    group_size: int | None,
    damp: float = 0.01,
    block: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ-round ``weight`` (``(out, k)`` or a conv weight) given its input Hessian ``(k, k)``.

    Returns ``(dequantized weight, scale)``: the weight on its integer grid (same shape) and the
    ``(out, n_groups)`` scales, such that :func:`~diffquant.primitives.quantize_weight` with that
    scale reproduces it exactly.
    """
    shape = weight.shape
    w = weight.detach().reshape(shape[0], -1).double().clone()
    out, k = w.shape
    g = k if group_size is None else group_size
    n_groups = math.ceil(k / g)
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype, device=h.device)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:  # not positive definite even after damping: fall back to RTN
        scale = P.search_weight_scale(weight, qtype, group_size)
        return P.fake_quant_weight(weight.detach().float(), qtype, group_size, scale=scale), scale
    scale = torch.zeros(out, n_groups, dtype=torch.float32, device=w.device)
    q = torch.zeros_like(w)
    block = max(g, block - block % g) if g < k else block  # a block holds whole groups
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # a new group: its scale from the weights as updated so far
                end = min(col + g, k)
                grp = torch.cat([w1[:, i : i + (end - col)], w[:, i2:end]], 1) if end > i2 else w1[:, i : i + end - col]
                s = P.search_weight_scale(grp.float(), qtype, None)[:, 0]
                scale[:, col // g] = s
                s_col = s.double()
            x = w1[:, i]
            if qtype.kind == "float":  # FP8: the nearest E4M3 value of the scaled weight
                y = (x / s_col).clamp(-qtype.max_value, qtype.max_value).float()
                qx = y.to(torch.float8_e4m3fn).double() * s_col
            else:
                qx = torch.clamp(torch.round(x / s_col), qtype.qmin, qtype.qmax) * s_col
            q[:, col] = qx
            e = (x - qx) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q.float().reshape(shape), scale


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from diffquant.nn.modules import QuantConv2d, QuantLinear

    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, (QuantLinear, QuantConv2d))
        and not m.frozen
        and m.weight_qtype is not None
        and m.weight_qtype.kind in ("int", "float")
        and getattr(m, "groups", 1) == 1
    ]


def float_weights(model: nn.Module) -> dict[nn.Module, torch.Tensor]:
    """Copies of the float weights :func:`round_weights` would overwrite (for comparing with FP later)."""
    return {m: m.weight.detach().clone() for _, m in _weight_layers(model)}


def weight_swap(fp_weights: dict[nn.Module, torch.Tensor]) -> Callable[[bool], None]:
    """``swap(to_fp)``: put the float weights of :func:`float_weights` back (``True``) or the model's
    current, rounded ones (``False``), for comparing the quantized model with the FP one."""
    rounded = {m: m.weight.detach() for m in fp_weights}

    def swap(to_fp: bool) -> None:
        for m, w in (fp_weights if to_fp else rounded).items():
            m.weight.data = w

    return swap


@torch.no_grad()
def round_weights(model: nn.Module, method: str, config=None, runner: Callable | None = None, progress=True) -> dict:
    """Choose the integer weights of a prepared model by ``method`` (``rtn``, ``mse``, ``gptq``, ``gptq-seq``).

    ``mse`` and ``gptq`` set each layer's ``weight_scale_fixed`` (and, for ``gptq``, its weight to the
    rounded values), which :meth:`~diffquant.nn.modules.QuantModule.freeze` then stores as they are.
    ``config`` is the calibration (:class:`~diffquant.recipe.CalibrationConfig`) whose sampler and
    seed the GPTQ Hessians use. Returns per-layer ``{name: output-error ratio vs RTN}`` for GPTQ
    (``< 1``: GPTQ's ``tr((W-Q) H (W-Q)^T)`` is lower than round-to-nearest's), else ``{}``.
    """
    if method not in WEIGHT_METHODS:
        raise ValueError(f"weight_method must be one of {WEIGHT_METHODS}, got {method!r}")
    layers = _weight_layers(model)
    if method == "rtn" or not layers:
        return {}
    if method == "mse":
        for _, m in layers:
            m.weight_scale_fixed = P.search_weight_scale(m.effective_weight(), m.weight_qtype, m.group_size)
        return {}
    import dataclasses

    from diffquant.calibrate import _builtin_runner, _make_observe, full_precision, has_builtin_sampler

    if runner is None and not has_builtin_sampler(model):
        raise TypeError(
            "GPTQ weight rounding needs the model's sampling trajectory, and this model has no built-in sampler "
            "settings: pass calibration=run(model, config, observe) that runs its sampler, or round to nearest "
            "without data: recipe.replace(weight_method='rtn')"
        )

    config = dataclasses.replace(
        config,
        selection="uniform",
        every=GPTQ_EVERY,
        uniform_from=GPTQ_FROM,
        n_samples=min(config.n_samples, GPTQ_MAX_SAMPLES),
    )
    if method == "gptq-seq":
        return _round_sequential(model, layers, config, runner, progress)
    collectors = {n: HessianCollector(m, seed=config.seed) for n, m in layers}
    try:
        with full_precision(model):
            (runner or _builtin_runner)(model, config, _make_observe(model, list(collectors.values())), progress)
    finally:
        for c in collectors.values():
            c.remove()
    ratios = {}
    for name, m in layers:
        ratio = _round_layer(m, collectors[name])
        if ratio is not None:
            ratios[name] = ratio
    return ratios


def _round_layer(m: nn.Module, c: HessianCollector) -> float | None:
    """GPTQ-round ``m``'s weight in place from ``c``'s Hessian; its output-error ratio vs RTN
    (``None``: no calibration row reached the layer, which keeps round-to-nearest)."""
    if c.hessian is None:
        return None
    w = m.effective_weight().detach().float()
    h = c.hessian / max(c.rows, 1)
    qw, scale = gptq_quantize(w, h, m.weight_qtype, m.group_size)
    rtn = P.fake_quant_weight(w, m.weight_qtype, m.group_size)
    e_gptq, e_rtn = _output_error(w - qw, h), _output_error(w - rtn, h)
    new = qw if m.smooth is None else qw / m.smooth.to(qw.dtype)
    m.weight.copy_(new.to(m.weight.dtype))
    m.weight_scale_fixed = scale.to(m.weight.device)
    return e_gptq / e_rtn if e_rtn > 0 else 1.0


def _replay(model: nn.Module, call: tuple) -> None:
    """Run one recorded call (the model's forward, without its hooks) at its step; a ``_Stop`` ends it."""
    from diffquant.timestep import denoising_step

    args, kwargs, step = call
    with denoising_step(step.index, step.timestep, step.num_steps), contextlib.suppress(_Stop):
        model.forward(*args, **kwargs)


@torch.no_grad()
def _round_sequential(model: nn.Module, layers, config, runner, progress: bool) -> dict:
    """``gptq-seq``: round the layers in forward order, each from its inputs in the partly quantized model."""
    from tqdm.auto import tqdm

    from diffquant.calibrate import _builtin_runner, _make_observe, _quant_switches, full_precision
    from diffquant.methods.output_correction import OutputCorrection
    from diffquant.nn.modules import QuantModule

    recorder = CallRecorder(model)
    try:
        with full_precision(model):
            (runner or _builtin_runner)(model, config, _make_observe(model, [recorder]), progress)
    finally:
        recorder.remove()
    calls = recorder.calls
    if not calls:
        raise ValueError(
            "gptq-seq: no calibration call reached the denoiser at a selected step, so there is nothing to "
            "replay; check the calibration runner, or use weight_method='gptq'"
        )
    # forward order: the first time each layer is reached in one recorded call
    order: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, a, n=n: None if n in order else order.append(n)) for n, m in layers
    ]
    try:
        with full_precision(model):
            _replay(model, calls[0])
    finally:
        for h in hooks:
            h.remove()
    by_name = dict(layers)
    switches = _quant_switches(model)
    before = [getattr(o, a) for o, a in switches]
    for o, a in switches:  # activation quantizers on, output correction and weight quantization off
        setattr(o, a, not isinstance(o, (QuantModule, OutputCorrection)))
    ratios = {}
    try:
        for name in tqdm(order, desc="gptq-seq", unit="layer", disable=not progress, leave=False):
            m = by_name[name]
            c = HessianCollector(m, seed=config.seed, quantized_input=True)
            c.observing = True
            stop = m.register_forward_pre_hook(_stop)  # after the collector's hook
            try:
                for call in calls:
                    _replay(model, call)
            finally:
                c.remove()
                stop.remove()
            ratio = _round_layer(m, c)
            if ratio is not None:
                ratios[name] = ratio
            m.weight_quant_enabled = True  # the layers after it see its rounded output
    finally:
        for (o, a), b in zip(switches, before, strict=True):
            setattr(o, a, b)
    return ratios


def _output_error(delta: torch.Tensor, h: torch.Tensor) -> float:
    d = delta.reshape(delta.shape[0], -1).double()
    return float(((d @ h.double()) * d).sum())
