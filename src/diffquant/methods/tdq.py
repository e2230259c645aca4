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

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.nn.tdq import TDQGenerator


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


NAME = "tdq_output_fit"


def output_fit_calibration(recipe):
    """The trajectory rows the output fit trains on: every step of the calibration trajectories."""
    return dataclasses.replace(recipe.calibration, selection="all", n_samples=max(2, recipe.calibration.n_samples))


def applies(recipe) -> bool:
    return recipe.act_mode == "tdq" and recipe.tdq_fit == "output"


def selections(recipe) -> list:
    return [output_fit_calibration(recipe)] if applies(recipe) else []


def run(model: nn.Module, recipe, trajectory, progress: bool = True) -> dict:
    """The TDQ output-fit step of :func:`diffquant.quantize` (after weight rounding)."""
    cfg = recipe.output_fit
    return fit_to_output(
        model, trajectory.select(output_fit_calibration(recipe)), progress=progress, iters=recipe.tdq_fit_iters,
        lr=cfg.tdq_lr, batch=cfg.tdq_batch, refit_iters=cfg.tdq_refit_iters, seed=cfg.seed,
    )  # fmt: skip


def fit_to_output(
    model: nn.Module,
    trajectory,
    progress: bool = True,
    iters: int = 16,
    lr: float = 0.01,
    batch: int = 32,
    refit_iters: int = 600,
    seed: int = 0,
) -> dict:
    """Refit the TDQ generators of a calibrated model to ranges chosen by the denoiser's output error.

    The range fit (:func:`fit_generators`) makes each ``g(t)`` follow the per-step range that is
    best for its own layer; at 4-bit activations the ranges that are best for the denoiser's output
    differ (clipping one layer harder can cost less downstream than the rounding noise it saves).
    The calls of ``trajectory`` (the FP model's, with their recorded FP outputs; every step of the
    calibration trajectories, :func:`output_fit_calibration`) are split row by row into a training
    and a held-out half. Since the output at step ``t`` depends only on the ranges at ``t``, the
    steps are fitted one at a time: per step, a log-multiplier of each quantizer's two extents is
    trained (``iters`` Adam steps on ``batch`` training rows, LSQ's straight-through gradient through
    the quantized model, every other parameter frozen) to minimise ``||eps_q(x_t, t) - eps(x_t, t)||^2``,
    and kept only if it lowers that step's held-out error. The generators are then refitted
    (:func:`fit_generators`) to the new per-step extents, which keeps ``g`` a smooth function of
    ``t`` for unseen steps; if the refitted generators do not lower the held-out error over all
    steps, the range fit is kept. Call it after weight rounding, so the ranges are fitted to the
    weights that run.

    Returns ``{"loss_before", "loss_after", "kept", "steps_improved", "steps"}`` (held-out mean
    squared output error before and after).
    """
    import copy

    from tqdm.auto import tqdm

    from diffquant.denoiser import input_channels, input_name, noise_prediction
    from diffquant.modes import without_output_gain

    quants = _generator_quantizers(model)
    if not quants:
        return {}
    name = input_name(model)
    # time step -> [(call index, rows, channels)]: references, so a spilled trajectory stays on disk
    train: dict[int, list] = {}
    held: dict[int, list] = {}
    for i, call in enumerate(trajectory):
        if call.output is None or call.output.shape[0] < 2:
            continue
        c = input_channels(call.args, call.kwargs, name)
        n = call.output.shape[0]
        for part, rows in ((train, range(0, n, 2)), (held, range(1, n, 2))):
            part.setdefault(int(call.step.timestep), []).append((i, list(rows), c))
    if not train:
        raise ValueError(
            "TDQ output fit: no recorded call has an FP noise prediction for two or more rows, so "
            "there is nothing to train and hold out; use tdq_fit='range'"
        )

    def loss_of(entry, rows=None) -> torch.Tensor:
        i, positions, c = entry
        if rows is not None:
            positions = [positions[r] for r in rows.tolist()]
        call = trajectory[i].rows(positions)
        out = noise_prediction(call.replay(model), c)
        return F.mse_loss(out.float(), call.output.float())

    def mean_loss(calls) -> float:
        with torch.no_grad():
            return sum(float(loss_of(c)) for c in calls) / len(calls)

    grads = {p: p.requires_grad for p in model.parameters()}
    start = [copy.deepcopy(q.generator.state_dict()) for q in quants]
    steps = sorted(train)
    rng = torch.Generator().manual_seed(seed)
    try:
        with without_output_gain(model):  # quantized; the output correction is fitted afterwards, on these ranges
            for p in model.parameters():
                p.requires_grad_(False)
            for q in quants:
                q.learnable = True
            with torch.no_grad():
                base = torch.stack([q.generator(torch.tensor(steps)) for q in quants])  # (Q, S, 2) extents
            offsets = torch.zeros(len(quants), len(steps), 2)
            held_before, improved = {}, 0
            bar = tqdm(steps, desc="tdq output fit", unit="step", disable=not progress, leave=False)
            for k, t in enumerate(bar):
                off = torch.zeros(len(quants), 2, requires_grad=True)
                for i, q in enumerate(quants):
                    q.range_offset = off[i]
                held_before[t] = before_t = mean_loss(held[t])
                opt = torch.optim.Adam([off], lr=lr)
                with torch.enable_grad():
                    for _ in range(iters):
                        entry = train[t][int(torch.randint(len(train[t]), (1,), generator=rng))]
                        n = len(entry[1])
                        rows = torch.randperm(n, generator=rng)[:batch] if batch < n else None
                        loss = loss_of(entry, rows)
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
    for q in quants:
        q.write_tdq_table()
    return {
        "loss_before": loss_before, "loss_after": loss_after, "kept": kept,
        "steps_improved": improved, "steps": len(steps),
    }  # fmt: skip
