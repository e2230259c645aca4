"""Temporal Dynamic Quantization (So et al., NeurIPS 2023): activation ranges as a function of t.

Each activation quantizer gets a tiny generator ``g(t) = softplus(MLP(fourier(t / T)))`` (3 layers
of 64 hidden units with ReLU, as in the paper) that outputs the negative and positive extents of
the clipping range, ``lo(t) = -g_0(t)`` and ``hi(t) = g_1(t)``. It is fitted after calibration, on
the model's own trajectory and without any data set, to the per-step optimal ranges the observer
found (a PTQ fit; ``ActQuantizer(..., learnable=True)`` trains it instead with LSQ's straight-
through gradient). Since ``g`` depends on ``t`` alone, it is then evaluated once for every
training time step into the quantizer's scale table: at run time a TDQ quantizer does one table
lookup, exactly like a bucketed one, and never calls the generator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TDQGenerator(nn.Module):
    """``t -> (extent below 0, extent above 0)``, both positive.

    Args:
        num_timesteps: ``T``; inputs are scaled to ``t / T``.
        n_freqs: Fourier frequencies ``pi * 2^k``, ``k < n_freqs``, as sin and cos features.
        hidden: hidden width.
        depth: number of Linear layers.
    """

    def __init__(self, num_timesteps: int = 1000, n_freqs: int = 8, hidden: int = 64, depth: int = 3):
        super().__init__()
        self.num_timesteps = num_timesteps
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freqs, dtype=torch.float32), persistent=False)
        dims = [2 * n_freqs + 1, *([hidden] * (depth - 1)), 2]
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < depth - 1:
                layers.append(nn.ReLU())
        self.mlp = nn.Sequential(*layers)

    def features(self, t: torch.Tensor) -> torch.Tensor:
        x = t.float().reshape(-1, 1) / self.num_timesteps
        ang = x * self.freqs
        return torch.cat([x, ang.sin(), ang.cos()], dim=1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Extents ``(N, 2)``: ``[-lo(t), hi(t)]``."""
        return F.softplus(self.mlp(self.features(t)))

    def ranges(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo(t), hi(t))``."""
        e = self(t)
        return -e[:, 0], e[:, 1]


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


@torch.enable_grad()
def fit_generators(
    generators: list[TDQGenerator],
    timesteps: list[torch.Tensor],
    targets: list[torch.Tensor],
    iters: int = 600,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Fit generators to per-step target extents, all at once (one batched MLP).

    The loss is the squared error of ``log`` extents (relative error, so small and large layers
    weigh alike). The last layer's bias starts at the mean target, so fitting begins from the
    static (all-steps) range.

    Args:
        generators: generators of identical shape.
        timesteps: per generator, the ``(S,)`` time steps with targets.
        targets: per generator, ``(S, 2)`` positive extents ``[-lo, hi]``.

    Returns:
        The final RMS log error per generator.
    """
    if not generators:
        return []
    torch.manual_seed(seed)
    q = len(generators)
    s_max = max(int(t.numel()) for t in timesteps)
    feats = torch.zeros(q, s_max, generators[0].features(torch.zeros(1)).shape[1])
    y = torch.zeros(q, s_max, 2)
    mask = torch.zeros(q, s_max, 1)
    for i, (g, t, tgt) in enumerate(zip(generators, timesteps, targets, strict=True)):
        n = t.numel()
        feats[i, :n] = g.features(t)
        y[i, :n] = tgt.float().clamp_min(1e-8).log()
        mask[i, :n] = 1
    # stack the per-generator layers into batched weights: (q, in, out)
    linears = [[m for m in g.mlp if isinstance(m, nn.Linear)] for g in generators]
    weights = [
        torch.stack([ls[k].weight.detach().T for ls in linears]).clone().requires_grad_()
        for k in range(len(linears[0]))
    ]
    biases = [torch.stack([ls[k].bias.detach() for ls in linears]).clone() for k in range(len(linears[0]))]
    mean_target = (y * mask).sum(1) / mask.sum(1)  # (q, 2), log extents
    biases[-1] = _inverse_softplus(mean_target.exp())
    weights[-1].data.mul_(0.1)
    biases = [b.requires_grad_() for b in biases]
    opt = torch.optim.Adam([*weights, *biases], lr=lr)
    for _ in range(iters):
        h = feats
        for k, (w, b) in enumerate(zip(weights, biases, strict=True)):
            h = torch.baddbmm(b.unsqueeze(1), h, w)
            if k < len(weights) - 1:
                h = torch.relu(h)
        pred = F.softplus(h).clamp_min(1e-8).log()
        loss = (((pred - y) ** 2) * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        per = ((((pred - y) ** 2) * mask).sum((1, 2)) / (2 * mask.sum((1, 2)))).sqrt()
        for i, ls in enumerate(linears):
            for k, lin in enumerate(ls):
                lin.weight.copy_(weights[k][i].T)
                lin.bias.copy_(biases[k][i])
    return per.tolist()


def _generator_quantizers(model: nn.Module) -> list:
    from diffquant.nn.quantizer import ActQuantizer

    return [q for q in model.modules() if isinstance(q, ActQuantizer) and q.generator is not None]


def _take_rows(value, rows: torch.Tensor, n: int):
    """``value`` with the tensors whose first dimension is ``n`` (the batch) cut to ``rows``."""
    from diffquant.calibrate import map_tensors

    return map_tensors(lambda t: t[rows] if t.dim() >= 1 and t.shape[0] == n else t, value)


def fit_to_output(
    model: nn.Module,
    config,
    runner=None,
    progress: bool = True,
    fp_weights: dict | None = None,
    iters: int = 16,
    lr: float = 0.01,
    n_samples: int = 128,
    batch: int = 32,
    refit_iters: int = 600,
    seed: int = 0,
) -> dict:
    """Refit the TDQ generators of a calibrated model to ranges chosen by the denoiser's output error.

    The range fit (:func:`fit_generators`) makes each ``g(t)`` follow the per-step range that is
    best for its own layer; at 4-bit activations the ranges that are best for the denoiser's output
    differ (clipping one layer harder can cost less downstream than the rounding noise it saves).
    The FP model's calls are recorded once (inputs and outputs, every step of ``n_samples``
    trajectories), and every row is put in a training or a held-out half. Since the output at step
    ``t`` depends only on the ranges at ``t``, the steps are fitted one at a time: per step, a
    log-multiplier of each quantizer's two extents is trained (``iters`` Adam steps on ``batch``
    training rows, LSQ's straight-through gradient through the quantized model, every other
    parameter frozen) to minimise ``||eps_q(x_t, t) - eps(x_t, t)||^2``, and kept only if it lowers
    that step's held-out error. The generators are then refitted (:func:`fit_generators`) to the new
    per-step extents, which keeps ``g`` a smooth function of ``t`` for unseen steps; if the refitted
    generators do not lower the held-out error over all steps, the range fit is kept. Call it after
    weight rounding, so the ranges are fitted to the weights that run; pass ``fp_weights`` when the
    model's own were replaced by rounded ones (GPTQ).

    Returns ``{"loss_before", "loss_after", "kept", "steps_improved", "steps"}`` (held-out mean
    squared output error before and after).
    """
    import copy
    import dataclasses

    from tqdm.auto import tqdm

    from diffquant.calibrate import (
        CallRecorder,
        _builtin_runner,
        _make_observe,
        _quant_switches,
        clone_tensors,
        full_precision,
    )  # fmt: skip
    from diffquant.methods.gptq import weight_swap
    from diffquant.methods.output_correction import OutputCorrection, _input_channels, _input_name, _split_output
    from diffquant.timestep import denoising_step

    quants = _generator_quantizers(model)
    if not quants:
        return {}
    config = dataclasses.replace(config, selection="all", n_samples=max(2, n_samples))
    swap = weight_swap(fp_weights or {})
    swap(True)

    class OutputRecorder(CallRecorder):  # the noise prediction itself (diffusers outputs are dict-like)
        def on_call(self, args, kwargs, output, step):
            eps, _ = _split_output(output)
            self.calls.append((clone_tensors(args), clone_tensors(kwargs), step, clone_tensors(eps)))

    recorder = OutputRecorder(model)
    try:
        with torch.no_grad(), full_precision(model):
            (runner or _builtin_runner)(model, config, _make_observe(model, [recorder]), progress)
    finally:
        swap(False)
        recorder.remove()
    name = _input_name(model)
    train: dict[int, list] = {}  # time step -> [(args, kwargs, step, eps, channels)] of training rows
    held: dict[int, list] = {}
    for args, kwargs, step, eps in recorder.calls:
        if eps is None or eps.shape[0] < 2:
            continue
        c = _input_channels(args, kwargs, name)
        eps = eps if c is None or eps.shape[1] != 2 * c else eps[:, :c]
        n = eps.shape[0]
        for part, rows in ((train, torch.arange(0, n, 2)), (held, torch.arange(1, n, 2))):
            cut = (_take_rows(args, rows, n), _take_rows(kwargs, rows, n), step, eps[rows], c)
            part.setdefault(int(step.timestep), []).append(cut)
    if not train:
        raise ValueError(
            "TDQ output fit: no calibration call returned a tensor noise prediction for two or more rows, so "
            "there is nothing to train and hold out; use tdq_fit='range'"
        )
    forward = model.forward  # after the runner: no wrapper; without hooks, the step is set here

    def loss_of(call, rows=None) -> torch.Tensor:
        args, kwargs, step, eps, c = call
        if rows is not None:
            n = eps.shape[0]
            args, kwargs, eps = _take_rows(args, rows, n), _take_rows(kwargs, rows, n), eps[rows]
        with denoising_step(step.index, step.timestep, step.num_steps):
            out, _ = _split_output(forward(*args, **kwargs))
        if c is not None and out.shape[1] == 2 * c:
            out = out[:, :c]
        return F.mse_loss(out.float(), eps.float())

    def mean_loss(calls) -> float:
        with torch.no_grad():
            return sum(float(loss_of(c)) for c in calls) / len(calls)

    switches = _quant_switches(model)
    before = [getattr(o, a) for o, a in switches]
    grads = {p: p.requires_grad for p in model.parameters()}
    start = [copy.deepcopy(q.generator.state_dict()) for q in quants]
    steps = sorted(train)
    rng = torch.Generator().manual_seed(seed)
    try:
        for o, a in switches:  # quantized, output correction off (fitted afterwards, on these ranges)
            setattr(o, a, not isinstance(o, OutputCorrection))
        for p in model.parameters():
            p.requires_grad_(False)
        for q in quants:
            q.learnable = True
        with torch.no_grad():
            base = torch.stack([q.generator(torch.tensor(steps)) for q in quants])  # (Q, S, 2) extents
        offsets = torch.zeros(len(quants), len(steps), 2)
        held_before, improved = {}, 0
        for k, t in enumerate(tqdm(steps, desc="tdq output fit", unit="step", disable=not progress, leave=False)):
            off = torch.zeros(len(quants), 2, requires_grad=True)
            for i, q in enumerate(quants):
                q.range_offset = off[i]
            held_before[t] = before_t = mean_loss(held[t])
            opt = torch.optim.Adam([off], lr=lr)
            with torch.enable_grad():
                for _ in range(iters):
                    call = train[t][int(torch.randint(len(train[t]), (1,), generator=rng))]
                    n = call[3].shape[0]
                    rows = torch.randperm(n, generator=rng)[:batch] if batch < n else None
                    loss = loss_of(call, rows)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            if mean_loss(held[t]) < before_t:
                offsets[:, k] = off.detach()
                improved += 1
        for q in quants:
            q.range_offset = None
        loss_before = loss_after = sum(held_before.values()) / len(steps)
        if improved:  # else the range fit stands as it is
            ts = torch.tensor(steps)
            targets = list(base * offsets.exp())
            fit_generators([q.generator for q in quants], [ts] * len(quants), targets, iters=refit_iters, seed=seed)
            loss_after = sum(mean_loss(held[t]) for t in steps) / len(steps)
        kept = loss_after < loss_before
        if not kept:
            for q, state in zip(quants, start, strict=True):
                q.generator.load_state_dict(state)
    finally:
        for q in quants:
            q.learnable = False
            q.range_offset = None
        for p, g in grads.items():
            p.requires_grad_(g)
        for (o, a), b in zip(switches, before, strict=True):
            setattr(o, a, b)
    for q in quants:
        q.write_tdq_table()
    return {
        "loss_before": loss_before, "loss_after": loss_after, "kept": kept,
        "steps_improved": improved, "steps": len(steps),
    }  # fmt: skip
