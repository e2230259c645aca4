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
    activation ranges, at the last step of the calibration sampler and every ``GPTQConfig.every``-th
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
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from diffquant import primitives as P
from diffquant.memory import trim
from diffquant.modes import activations_only, full_precision, observing
from diffquant.nn.modules import QuantConv2d, QuantLinear
from diffquant.qtypes import QType
from diffquant.recipe import WEIGHT_METHODS, CalibrationConfig, GPTQConfig
from diffquant.trajectory import Trajectory, default_budget

# columns per inner lazy-update block of the GPTQ loop: a 1280 x 2304 float32 layer rounds in 0.25-0.32 s
# instead of 0.80 s with one level of 128-column blocks (one thread; the same codes up to float rounding)
INNER_BLOCK = 16
ERROR_ROWS = 64  # output rows per block when a large layer's rounding error is scored from its factor
LARGE_HESSIAN_BYTES = 1 << 28  # past this a Hessian accumulates in place (addmm_), with no k x k temporary


class _Stop(Exception):
    """Raised by a pre-hook to end a replayed forward pass at the layer being rounded."""


def _stop(module, args):
    raise _Stop


class HessianCollector:
    """Accumulates ``sum x x^T`` of a layer's input (the weight's columns' space) while ``observing``.

    It counts while ``observing`` is on (:func:`diffquant.modes.observing`), so only the replayed
    calibration rows count.
    Rows beyond ``rows_per_call`` per call are subsampled (seeded), keeping the cost bounded.
    With ``quantized_input`` the rows are the input after the layer's own input quantizer (what the
    quantized weight multiplies), else the float input.
    """

    def __init__(self, module: nn.Module, seed: int = 0, quantized_input: bool = False, rows_per_call: int = 8192):
        self.module = module
        self.rows_per_call = rows_per_call
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
        elif m.smooth is not None:  # SmoothQuant: the quantized weight is W * s, its input x / s
            x = x / m.smooth_like(x, 1 if m.weight.dim() == 4 else -1)
        if m.weight.dim() == 4:  # Conv2d: (B, C*kh*kw, L) patches, in the weight's flattening order
            cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            return cols.transpose(1, 2).reshape(-1, cols.shape[1])
        return x.reshape(-1, x.shape[-1])

    def _hook(self, module, args):
        if not self.observing:
            return
        rows = self._rows(args[0].detach().float())
        if rows.shape[0] > self.rows_per_call:
            rows = rows[torch.randperm(rows.shape[0], generator=self.gen)[: self.rows_per_call].to(rows.device)]
        if self.hessian is None:
            self.hessian = rows.T @ rows
        elif self.hessian.numel() * 4 > LARGE_HESSIAN_BYTES:  # no k x k temporary beside the sum
            self.hessian.addmm_(rows.T, rows)
        else:
            self.hessian += rows.T @ rows
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
    dtype: torch.dtype = torch.float64,
    overwrite: bool = False,
):
    """GPTQ-round ``weight`` (``(out, k)`` or a conv weight) given its input Hessian ``(k, k)``.

    ``dtype`` is the precision of the factorisation (float64; float32 for Hessians too large to hold
    in float64, as GPTQ's reference code does). The factorisation runs in place in one ``k x k``
    matrix of that dtype: a copy of ``hessian``, or with ``overwrite`` (and ``hessian`` already of
    ``dtype``) ``hessian``'s own storage, which it destroys; then a third value is returned,
    ``error(delta) -> tr(delta H delta^T)`` of the undamped ``H`` computed from the factor (no
    ``k x k`` copy), so the caller can score roundings without keeping ``H``.

    Returns ``(dequantized weight, scale)``: the weight on its integer grid (same shape) and the
    ``(out, n_groups)`` scales, such that :func:`~diffquant.primitives.quantize_weight` with that
    scale reproduces it exactly.
    """
    shape = weight.shape
    w = weight.detach().reshape(shape[0], -1).to(dtype).clone()
    out, k = w.shape
    g = k if group_size is None else group_size
    n_groups = math.ceil(k / g)
    in_place = overwrite and hessian.dtype == dtype
    h = hessian if in_place else hessian.to(dtype, copy=True)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    lam = damp * float(torch.diagonal(h).mean())
    h.diagonal().add_(lam)
    try:  # H -> L -> (L L^T)^-1 -> U = its upper Cholesky factor, each in place: one k x k matrix
        a = h.mT  # H is symmetric: its column-major view, which LAPACK factorises without a k x k copy
        torch.linalg.cholesky(a, out=a)
        torch.cholesky_inverse(a, out=a)
        torch.linalg.cholesky(a, upper=True, out=a)
        hinv = a if in_place else a.contiguous()  # a copy (small layers) runs the loop on row-major slices
        del h, a
    except torch.linalg.LinAlgError:  # not positive definite even after damping: fall back to RTN
        scale = P.search_weight_scale(weight, qtype, group_size)
        q = P.fake_quant_weight(weight.detach().float(), qtype, group_size, scale=scale)
        return (q, scale, None) if overwrite else (q, scale)
    scale = torch.zeros(out, n_groups, dtype=torch.float32, device=w.device)
    # The columns of W are rows of wt (k, out): each column's work is on contiguous memory. Lazy
    # updates on two levels: inside an ``inner`` block of columns the error goes to the block's other
    # columns one by one; to the rest of the ``block`` and then to the rest of W as matrix products.
    # A group always starts at an inner block's start or lies inside one, so its scale is searched
    # on its columns with every earlier column's error applied (as with one level of blocks).
    wt, w = w.T.contiguous(), None
    qt = torch.zeros_like(wt)
    block = max(g, block - block % g) if g < k else block  # a block holds whole groups
    inner = INNER_BLOCK if g >= k or g % INNER_BLOCK == 0 else g
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, h1 = wt[i1:i2], hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for j1 in range(0, i2 - i1, inner):
            j2 = min(j1 + inner, i2 - i1)
            w2, h2 = w1[j1:j2], h1[j1:j2, j1:j2]
            for i in range(j2 - j1):
                col = i1 + j1 + i
                if col % g == 0:  # a new group: its scale from the weights as updated so far
                    end = min(col + g, k)
                    s_col = P.search_weight_scale(wt[col:end].T.float(), qtype, None)[:, 0]
                    scale[:, col // g] = s_col
                    s_col = s_col.to(dtype)
                x = w2[i]
                if qtype.kind == "float":  # FP8: the nearest E4M3 value of the scaled weight
                    y = (x / s_col).clamp(-qtype.max_value, qtype.max_value).float()
                    qx = y.to(torch.float8_e4m3fn).to(dtype) * s_col
                else:
                    qx = torch.clamp(torch.round(x / s_col), qtype.qmin, qtype.qmax) * s_col
                qt[col] = qx
                e = (x - qx) / h2[i, i]
                w2[i:] -= h2[i, i:].unsqueeze(1) * e.unsqueeze(0)
                err1[j1 + i] = e
            w1[j2:] -= h1[j1:j2, j2:].T @ err1[j1:j2]
        wt[i2:] -= hinv[i1:i2, i2:].T @ err1
    q = qt.T
    if not overwrite:
        return q.float().reshape(shape), scale

    def error(delta: torch.Tensor) -> float:
        # H' = H + lam I (dead columns: 1 + lam) = U^-1 U^-T, so tr(D H' D^T) = ||D U^-1||^2, summed over
        # blocks of output rows (a few MB of temporaries at a time beside the k x k factor, not 3 x (out, k))
        total = 0.0
        flat = delta.reshape(delta.shape[0], -1)
        for r in range(0, flat.shape[0], ERROR_ROWS):
            d = flat[r : r + ERROR_ROWS].to(dtype)
            total += float(torch.linalg.solve_triangular(hinv, d, upper=True, left=False).pow(2).sum())
            total -= lam * float(d.pow(2).sum()) + float(d[:, dead].pow(2).sum())
        return total

    return q.float().reshape(shape), scale, error


FLOAT64_BYTES = 1 << 30  # GPTQ factorises in float64 while 16 k^2 bytes (a float64 copy, twice) fit this


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, (QuantLinear, QuantConv2d))
        and not m.frozen
        and m.weight_qtype is not None
        and m.weight_qtype.kind in ("int", "float")
        and getattr(m, "groups", 1) == 1
    ]


def hessian_bytes(m: nn.Module) -> int:
    """Bytes of a layer's float32 input Hessian (``k x k``, ``k`` = the flattened input of its weight)."""
    k = m.weight[0].numel()
    return 4 * k * k


def gptq_calibration(config: CalibrationConfig, gptq: GPTQConfig | None = None) -> CalibrationConfig:
    """The trajectory rows GPTQ's Hessians come from: the last step and every ``gptq.every``-th before it,
    of the first ``gptq.max_samples`` calibration trajectories."""
    gptq = gptq or GPTQConfig()
    return dataclasses.replace(
        config, selection="uniform", every=gptq.every, uniform_from=gptq.uniform_from,
        n_samples=min(config.n_samples, gptq.max_samples),
    )  # fmt: skip


NAME = "gptq"


def applies(recipe) -> bool:
    return recipe.weight_method != "rtn"


def selections(recipe) -> list[CalibrationConfig]:
    return [gptq_calibration(recipe.calibration, recipe.gptq)] if recipe.weight_method.startswith("gptq") else []


def run(model: nn.Module, recipe, trajectory: Trajectory, progress: bool = True) -> dict:
    """The weight-rounding step of :func:`diffquant.quantize`: ``{"error_ratios": {layer: ratio}, ...}``."""
    return round_weights(
        model, recipe.weight_method, trajectory, recipe.calibration, gptq=recipe.gptq, progress=progress
    )


class _Rounded:
    """A layer's GPTQ result kept compact until every group is rounded: integer (or E4M3) codes and scales."""

    def __init__(self, qw: torch.Tensor, scale: torch.Tensor, qtype: QType, group_size: int | None):
        self.shape, self.qtype, self.group_size = qw.shape, qtype, group_size
        self.scale = scale
        s = self._expanded(qw.reshape(qw.shape[0], -1).shape[1])
        codes = qw.reshape(qw.shape[0], -1) / s
        self.codes = codes.to(torch.float8_e4m3fn) if qtype.kind == "float" else torch.round(codes).to(torch.int8)

    def _expanded(self, k: int) -> torch.Tensor:
        g = k if self.group_size is None else self.group_size
        return self.scale.repeat_interleave(g, dim=1)[:, :k]

    def weight(self) -> torch.Tensor:
        """The dequantized weight, bit for bit what :func:`gptq_quantize` returned."""
        k = self.codes.shape[1]
        return (self.codes.to(torch.float32) * self._expanded(k)).reshape(self.shape)


@torch.no_grad()
def round_weights(
    model: nn.Module,
    method: str,
    trajectory: Trajectory | None = None,
    config: CalibrationConfig | None = None,
    *,
    gptq: GPTQConfig | None = None,
    progress: bool = True,
) -> dict:
    """Choose the integer weights of a prepared model by ``method`` (``rtn``, ``mse``, ``gptq``, ``gptq-seq``).

    ``mse`` and ``gptq`` set each layer's ``weight_scale_fixed`` (and, for ``gptq``, its weight to the
    rounded values), which :meth:`~diffquant.nn.modules.QuantModule.freeze` then stores as they are.

    GPTQ collects the Hessians of as many layers at a time as fit ``gptq.hessian_bytes`` (default:
    :func:`~diffquant.trajectory.default_budget`), replaying the trajectory's GPTQ rows
    (:func:`gptq_calibration` of ``config``) once per group, each replay stopped after the group's
    last layer. Every group sees the FP model's inputs (the rounded weights are put in place only
    when all groups are done), so the result equals collecting every Hessian at once.

    Returns ``{"error_ratios": {name: output-error ratio vs RTN}, "groups": n, "replays": calls}`` for
    GPTQ (``< 1``: GPTQ's ``tr((W-Q) H (W-Q)^T)`` is lower than round-to-nearest's), else ``{}``.
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
    if trajectory is None:
        raise TypeError(
            "GPTQ weight rounding needs the model's FP trajectory: pass one (diffquant.recording), or round "
            "to nearest without data: recipe.replace(weight_method='rtn')"
        )
    gptq = gptq or GPTQConfig()
    rows = trajectory.select(gptq_calibration(config or CalibrationConfig(), gptq))
    if not len(rows):
        raise ValueError(
            "GPTQ: the trajectory has no call at the steps GPTQ's Hessians use (the last step and every "
            f"{gptq.every}th before it); record the whole sampling run, or use weight_method='rtn'"
        )
    budget = default_budget() if gptq.hessian_bytes is None else int(gptq.hessian_bytes)
    seed = config.seed if config is not None else 0
    if method == "gptq-seq":
        return _round_sequential(model, layers, rows, seed, gptq, progress)
    order, once = _forward_order(model, rows, layers)
    groups: list[list[tuple[str, nn.Module]]] = [[]]
    size = 0
    for item in order:
        b = hessian_bytes(item[1])
        if groups[-1] and size + b > budget:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += b
    from tqdm.auto import tqdm

    rounded: dict[str, _Rounded] = {}
    ratios: dict[str, float] = {}
    replays = 0
    bar = tqdm(total=len(order), desc="gptq", unit="layer", disable=not progress, leave=False)
    for group in groups:
        collectors = {n: HessianCollector(m, seed=seed, rows_per_call=gptq.rows_per_call) for n, m in group}
        stop = group[-1][1].register_forward_hook(_stop_after) if once else None
        try:
            with full_precision(model), observing(collectors.values()):
                for call in rows:
                    with contextlib.suppress(_Stop):
                        call.replay(model)
                    replays += 1
        finally:
            for c in collectors.values():
                c.remove()
            if stop is not None:
                stop.remove()
        for name, m in group:
            result = _round_layer(m, collectors.pop(name), gptq.damp)
            trim()  # the layer's Hessian and factorisation buffers are freed (diffquant.memory)
            if result is not None:
                rounded[name], ratios[name] = result
            bar.update(1)
    bar.close()
    for name, m in layers:  # every Hessian saw FP inputs; now the rounded weights go in
        if name in rounded:
            _assign(m, rounded.pop(name))
    return {"error_ratios": ratios, "groups": len(groups), "replays": replays}


def _stop_after(module, args, output):
    raise _Stop


def _forward_order(model: nn.Module, rows: Trajectory, layers) -> tuple[list, bool]:
    """``layers`` in the order one replayed call first reaches them, and whether each runs once per call
    (then a replay may stop after a group's last layer)."""
    seen: dict[str, int] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, seen.get(n, 0) + 1)) for n, m in layers
    ]
    try:
        with full_precision(model):
            next(iter(rows)).replay(model)
    finally:
        for h in hooks:
            h.remove()
    by_name = dict(layers)
    order = [(n, by_name[n]) for n in seen] + [(n, m) for n, m in layers if n not in seen]
    return order, all(v == 1 for v in seen.values()) and len(seen) == len(layers)


def _round_layer(m: nn.Module, c: HessianCollector, damp: float) -> tuple[_Rounded, float] | None:
    """GPTQ-round ``m``'s weight from ``c``'s Hessian (released on the way): its compact result and its
    output-error ratio vs RTN (``None``: no calibration row reached the layer, which keeps round-to-nearest)."""
    if c.hessian is None:
        return None
    h, c.hessian = c.hessian, None
    h /= max(c.rows, 1)
    k = h.shape[0]
    dtype = torch.float64 if 16 * k * k <= FLOAT64_BYTES else torch.float32
    w = m.effective_weight().detach().float()
    rtn = P.fake_quant_weight(w, m.weight_qtype, m.group_size)
    if dtype == torch.float64:
        qw, scale = gptq_quantize(w, h, m.weight_qtype, m.group_size, damp=damp, dtype=dtype)
        e_gptq, e_rtn = _output_error(w - qw, h), _output_error(w - rtn, h)
    else:  # a large Hessian: factorised in its own storage, the errors from the factor
        qw, scale, error = gptq_quantize(w, h, m.weight_qtype, m.group_size, damp=damp, dtype=dtype, overwrite=True)
        del h
        e_gptq, e_rtn = (error(w - qw), error(w - rtn)) if error is not None else (1.0, 1.0)
        del error
    return _Rounded(qw, scale, m.weight_qtype, m.group_size), (e_gptq / e_rtn if e_rtn > 0 else 1.0)


def _assign(m: nn.Module, r: _Rounded) -> None:
    qw = r.weight()
    new = qw if m.smooth is None else qw / m.smooth_like(qw, 1)
    m.weight.copy_(new.to(m.weight.dtype))
    m.weight_scale_fixed = r.scale.to(m.weight.device)


@torch.no_grad()
def _round_sequential(model: nn.Module, layers, rows: Trajectory, seed: int, gptq: GPTQConfig, progress: bool) -> dict:
    """``gptq-seq``: round the layers in forward order, each from its inputs in the partly quantized model."""
    from tqdm.auto import tqdm

    order, _ = _forward_order(model, rows, layers)
    ratios = {}
    replays = 0
    with activations_only(model):  # activation quantizers on; weight quantization and the output gain off
        for name, m in tqdm(order, desc="gptq-seq", unit="layer", disable=not progress, leave=False):
            c = HessianCollector(m, seed=seed, quantized_input=True, rows_per_call=gptq.rows_per_call)
            c.observing = True
            stop = m.register_forward_pre_hook(_stop)  # after the collector's hook
            try:
                for call in rows:
                    with contextlib.suppress(_Stop):
                        call.replay(model)
                    replays += 1
            finally:
                c.remove()
                stop.remove()
            result = _round_layer(m, c, gptq.damp)
            if result is not None:
                _assign(m, result[0])
                ratios[name] = result[1]
            m.weight_quant_enabled = True  # the layers after it see its rounded output
    return {"error_ratios": ratios, "groups": len(order), "replays": replays}


def _output_error(delta: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(D H D^T)``, in float64 while a float64 copy of ``H`` fits :data:`FLOAT64_BYTES`."""
    dtype = torch.float64 if 8 * h.numel() <= FLOAT64_BYTES else torch.float32
    d = delta.reshape(delta.shape[0], -1).to(dtype)
    return float(((d @ h.to(dtype)) * d).sum())
