"""Quantization-aware fine-tuning, data-free: the quantized model distilled from the FP model on the
FP model's own recorded trajectory (EfficientDM's recipe).

    loss = || eps_q(x_t, t, c) - eps_fp(x_t, t, c) ||^2        (x_t, t, c, eps_fp: recorded FP calls)

What trains (``FinetuneConfig.train``):

- ``lora``: QALoRA (:mod:`diffquant.nn.lora`) on every quantized Conv2d / Linear, added to the
  float weight before its fake-quant (straight-through rounding); merged into the weight at the end,
  so the model is integer weights and scales again with no extra inference cost.
- ``weights``: the quantized layers' float weights themselves (full QAT, straight-through rounding),
  re-quantized when the model is frozen; what ternary and binary weights need on small models. A layer
  that keeps float weights (``weights="none"``) trains them too (QAT of the activations alone).
- ``scales``: LSQ step sizes, as log-multipliers (a relative change, one learning rate for every
  layer): each static / bucketed activation quantizer's scale per bucket (one bucket per step is
  EfficientDM's TALSQ table), each TDQ quantizer's generator itself (the learnable mode TDQ was built
  for; its per-step table is rewritten from it; a TDQ model loaded from disk has no generator, the
  table itself trains), and each layer's weight scales (per channel or
  group: the learnable scales ternary and binary weights need).
- ``smooth``: a factor per input channel of each activation-quantized layer (``x / s`` into its
  quantizer, ``W * s`` into its weight; OmniQuant's learnable equivalent scaling), kept as the
  layer's ``smooth`` buffer.

``FinetuneConfig.rollout = k > 1`` replaces that loss by trajectory matching (:class:`Rollout`): the
student takes ``k`` DDIM steps from the FP ``x_t`` on its own predictions and is scored where it lands
against the FP trajectory, in the same units (``k = 1`` is the loss above).

Every call of the recording holds rows of one step (one row per sample); a quarter of the samples
is held out and scored every ``eval_every`` steps, and the state with the lowest held-out loss is
the one kept (a fine-tuned model overfits a few trajectories quickly: on fashion-unet W4A4 with 16
of them, the training loss fell to 0.0037 while the held-out one rose from 0.0078 after 200 steps to
0.0088 after 1000). Rows are drawn from every recorded step.

Data parallel: inside a ``torch.distributed`` process group (``torchrun --nproc-per-node 2``, gloo on
CPU) every rank draws the same rows (one generator, one seed), computes the loss of its share of the
batch and the gradients are averaged with each rank weighted by its rows before every step, so the
ranks hold the one-process model (to float summation order) at ``1 / world`` of the compute each;
the held-out score is sharded likewise and only rank 0 writes checkpoints. The recording can be spilled to disk (:class:`~diffquant.trajectory.Trajectory`):
a training step reads one call.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from diffquant.denoiser import input_channels, input_name, noise_prediction, noisy_input
from diffquant.eval.distributed import rank_and_world
from diffquant.modes import act_quantizers, quant_modules, without_output_gain
from diffquant.nn import lora as L
from diffquant.primitives import weight_scale
from diffquant.recipe import CalibrationConfig, FinetuneConfig
from diffquant.trajectory import DenoiserCall, Trajectory

NAME = "finetune"
HELD_OUT_CALLS = 64  # held-out calls scored (spread over the steps)
HELD_EVERY = 4  # a quarter of the recorded rows (samples) is held out


def learning_rate_factor(step: int, iterations: int, warmup: int) -> float:
    """The learning rate of step ``step`` (from 0) relative to the configured one: a linear warm-up
    over ``warmup`` steps, then a cosine decay to a tenth at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, iterations - warmup - 1)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))


class FinetuneError(RuntimeError):
    """Fine-tuning cannot go on (a non-finite loss); the message names where and what was kept."""


def finetune_calibration(config: CalibrationConfig, finetune: FinetuneConfig) -> CalibrationConfig:
    """The trajectory rows fine-tuning trains on: every step of the first ``finetune.samples`` trajectories."""
    return dataclasses.replace(config, selection="all", n_samples=finetune.samples)


def applies(recipe) -> bool:
    return recipe.finetune is not None


def selections(recipe) -> list[CalibrationConfig]:
    return [finetune_calibration(recipe.calibration, recipe.finetune)] if applies(recipe) else []


def run(model: nn.Module, recipe, trajectory: Trajectory, progress: bool = True, checkpoint=None) -> dict:
    """The fine-tuning step of :func:`diffquant.quantize` (after GPTQ and the TDQ fit)."""
    rows = trajectory.select(finetune_calibration(recipe.calibration, recipe.finetune))
    return finetune(model, rows, recipe.finetune, checkpoint=checkpoint, progress=progress)


def step_weights(trajectory: Trajectory, entries: list, sigma_weight: float) -> torch.Tensor:
    """``1 + sigma_weight * sigma_t`` of each entry's time step (``sigma_t = sqrt((1 - alpha_bar_t) /
    alpha_bar_t)``), normalised to mean 1; all ones for ``sigma_weight == 0``."""
    if sigma_weight == 0:
        return torch.ones(len(entries), dtype=torch.float64)
    schedule = trajectory.alphas_cumprod
    if schedule is None:
        raise ValueError(
            "fine-tuning with sigma_weight > 0 needs the noise schedule (alphas_cumprod) on the trajectory: set "
            "trajectory.alphas_cumprod = scheduler.alphas_cumprod after recording, or use sigma_weight=0"
        )
    abar = schedule.double()[torch.tensor([e[3] for e in entries])]
    w = 1 + sigma_weight * ((1 - abar) / abar).sqrt()
    return w / w.mean()


def _split(trajectory: Trajectory, name: str | None) -> tuple[list, list]:
    """``(train, held)``: ``(call index, row positions, input channels, timestep)`` per recorded call;
    every ``HELD_EVERY``-th row (the last of each group) is held out, the others train (a call of
    fewer rows holds out its last row, a one-row call only trains)."""
    train, held = [], []
    for i, call in enumerate(trajectory):
        if call.output is None:
            continue
        c, n, t = input_channels(call.args, call.kwargs, name), call.output.shape[0], int(call.step.timestep)
        out = [r for r in range(n) if r % HELD_EVERY == HELD_EVERY - 1] or ([n - 1] if n > 1 else [])
        train.append((i, [r for r in range(n) if r not in out], c, t))
        if out:
            held.append((i, out, c, t))
    return train, held


class Rollout:
    """``FinetuneConfig.rollout = k``: from the FP ``x_t`` of a drawn call the student takes ``k``
    deterministic DDIM steps on its own noise predictions; the loss is the squared distance of the
    ``x`` it reaches to the FP trajectory's ``x`` there (past the last recorded call: of its ``x0``
    prediction to the FP one).

    The trajectory must hold every step of each sample in the same batch order (``selection="all"``)
    and its noise schedule; that it is a DDIM (eta 0) trajectory of noise predictions is checked on the
    recording itself: the DDIM update of a recorded call must give the next recorded input.
    """

    def __init__(self, trajectory: Trajectory, name: str | None, k: int):
        if trajectory.alphas_cumprod is None:
            raise ValueError(
                "fine-tuning with rollout > 1 needs the noise schedule (alphas_cumprod) on the trajectory: set "
                "trajectory.alphas_cumprod = scheduler.alphas_cumprod after recording, or use rollout=1"
            )
        self.trajectory, self.name, self.k = trajectory, name, k
        self.abar = trajectory.alphas_cumprod.double().tolist()
        at: dict[tuple, int] = {}
        for i, call in enumerate(trajectory):
            if len(set(call.samples)) != len(call.samples):
                raise ValueError(
                    "fine-tuning with rollout > 1: the recording holds classifier-free guidance batches (a sample "
                    "twice in one call); record without guidance, or use rollout=1 (a recipe file: "
                    "`diffquant recipes NAME --json`, its finetune.rollout set to 1)"
                )
            at[(tuple(call.samples), call.step.index)] = i
        self.next = {i: at.get((key[0], key[1] + 1)) for key, i in at.items()}
        self._check()

    def _check(self) -> None:
        i = next((i for i, j in self.next.items() if j is not None and self.trajectory[i].output is not None), None)
        if i is None:
            raise ValueError("fine-tuning with rollout > 1 needs consecutive steps of one sample (selection='all')")
        call, following = self.trajectory[i], self.trajectory[self.next[i]]
        x = self.step(noisy_input(call.args, call.kwargs, self.name).double(), call.output.double(), call, following)
        want = noisy_input(following.args, following.kwargs, self.name).double()
        error = float((x - want).norm() / want.norm().clamp_min(1e-12))
        if not error < 1e-3:
            raise ValueError(
                f"fine-tuning with rollout > 1: the DDIM (eta 0) update of a recorded call is {error:.2g} away (relative) "
                "from the next recorded input; rollout needs a deterministic DDIM trajectory of noise predictions"
            )

    def x0(self, x: torch.Tensor, eps: torch.Tensor, call: DenoiserCall) -> torch.Tensor:
        a = self.abar[int(call.step.timestep)]
        return (x - math.sqrt(1 - a) * eps) / math.sqrt(a)

    def abar_next(self, call: DenoiserCall, following: DenoiserCall) -> float:
        """``alpha_bar`` DDIM steps ``call`` to, as diffusers' ``DDIMScheduler`` takes it: at ``t - T // steps``
        (with "trailing" spacing and ``T / steps`` not whole, one off the next call's own ``t``)."""
        prev = int(call.step.timestep) - len(self.abar) // int(call.step.num_steps)
        return self.abar[prev if prev >= 0 else int(following.step.timestep)]

    def step(self, x: torch.Tensor, eps: torch.Tensor, call: DenoiserCall, following: DenoiserCall) -> torch.Tensor:
        """DDIM's (eta 0) update of ``x`` from ``call`` to ``following``."""
        a = self.abar_next(call, following)
        return math.sqrt(a) * self.x0(x, eps, call) + math.sqrt(1 - a) * eps

    def with_input(self, call: DenoiserCall, x: torch.Tensor) -> DenoiserCall:
        if call.args and isinstance(call.args[0], torch.Tensor):
            return dataclasses.replace(call, args=(x, *call.args[1:]))
        return dataclasses.replace(call, kwargs={**call.kwargs, self.name: x})

    def gain(self, call: DenoiserCall, following: DenoiserCall | None) -> float:
        """What one step turns an error of the noise prediction into: in the next ``x`` (the DDIM step's
        ``sqrt(1 - a') - sqrt(a') sqrt(1 - a) / sqrt(a)``) or, past the last call, in ``x0``."""
        a = self.abar[int(call.step.timestep)]
        if following is None:
            return math.sqrt((1 - a) / a)
        a2 = self.abar_next(call, following)
        return abs(math.sqrt(1 - a2) - math.sqrt(a2) * math.sqrt((1 - a) / a))

    def loss(self, model: nn.Module, entry, positions: list[int]) -> torch.Tensor:
        """The squared distance at the end of the rollout, divided by the squared gain of its first step:
        in the units of the noise-prediction loss (``k = 1`` is that loss at every step but the last,
        where it is the ``x0`` distance so divided), so that no step outweighs another by the scale of
        ``x`` alone; how much the error grows over the next ``k - 1`` steps stays in."""
        i, _, c, _ = entry
        call = self.trajectory[i].rows(positions)
        j = self.next.get(i)
        scale = self.gain(call, self.trajectory[j] if j is not None else None) ** 2
        x = noisy_input(call.args, call.kwargs, self.name)
        for _ in range(self.k):
            eps = noise_prediction(self.with_input(call, x).replay(model), c).float()
            j = self.next.get(i)
            if j is None:  # past the last recorded call: the x0 predictions
                fp_x = noisy_input(call.args, call.kwargs, self.name).float()
                fp_x0 = self.x0(fp_x, call.output.float(), call)
                return F.mse_loss(self.x0(x.float(), eps, call), fp_x0) / scale
            following = self.trajectory[j].rows(positions)  # the same samples in the same rows
            x = self.step(x.float(), eps, call, following).to(x.dtype)
            i, call = j, following
        return F.mse_loss(x.float(), noisy_input(call.args, call.kwargs, self.name).float()) / scale


class Trainables:
    """What fine-tuning trains, set up on the model, and written back into it (:meth:`finish`)."""

    def __init__(self, model: nn.Module, config: FinetuneConfig):
        self.model, self.config = model, config
        for m in quant_modules(model):
            m.thaw()  # a frozen (saved, loaded, quantize()d) model trains from its integer weights
        for p in model.parameters():
            p.requires_grad_(False)
        self.adapters = L.attach(model, config.rank, config.seed) if "lora" in config.train else []
        self.weights = [  # a layer kept at float weights (weights="none") trains them too: QAT of the activations
            m.weight
            for m in quant_modules(model)
            if "weights" in config.train and getattr(m, "weight", None) is not None
        ]
        self.act, self.tdq, self.weight = [], [], []
        if "scales" in config.train:
            for q in act_quantizers(model):
                if q.mode == "dynamic" or not q.enabled:
                    continue
                if q.mode == "tdq" and q.generator is not None:
                    q.learnable = True
                    self.tdq.append(q)
                else:  # static, bucketed, and a loaded tdq one (its generator is not saved): LSQ on its table
                    q.scale_offset = nn.Parameter(torch.zeros_like(q.scale))
                    self.act.append(q)
        self.smooth = []
        if "smooth" in config.train:  # per input channel: x / s into the quantizer, W * s into the weight
            for m in quant_modules(model):
                if m.input_quantizer is None or getattr(m, "weight", None) is None or getattr(m, "groups", 1) != 1:
                    continue
                m.enable_smoothing()
                m.smooth_offset = nn.Parameter(torch.zeros_like(m.smooth))
                self.smooth.append(m)
        if "weight_scales" in config.train:
            for m in quant_modules(model):
                if m.weight_qtype is None or m.weight_qtype.kind == "float":
                    continue
                if m.weight_scale_fixed is None:
                    m.weight_scale_fixed = weight_scale(m.effective_weight().detach(), m.weight_qtype, m.group_size)
                m.weight_scale_offset = nn.Parameter(torch.zeros_like(m.weight_scale_fixed))
                self.weight.append(m)

    def groups(self) -> list[dict]:
        lora = [p for a in self.adapters for p in a.parameters()]
        gen = [p for q in self.tdq for p in q.generator.parameters()]
        for p in gen:
            p.requires_grad_(True)
        scales = [q.scale_offset for q in self.act] + [m.weight_scale_offset for m in self.weight]
        scales += [m.smooth_offset for m in self.smooth]
        for p in self.weights:
            p.requires_grad_(True)
        out = []
        if lora:
            out.append({"params": lora, "lr": self.config.lr, "weight_decay": 0.0})
        if self.weights:
            out.append({"params": self.weights, "lr": self.config.weight_lr, "weight_decay": 0.0})
        if scales or gen:
            out.append({"params": scales + gen, "lr": self.config.scale_lr, "weight_decay": 0.0})
        return out

    def state(self) -> dict:
        """What a checkpoint holds of the model: adapters, trained weights, scale offsets, TDQ generators,
        smoothing offsets."""

        def copied(module: nn.Module) -> dict:  # a snapshot: state_dict() shares the live storage
            return {k: v.detach().clone() for k, v in module.state_dict().items()}

        return {
            "lora": [copied(a) for a in self.adapters],
            "weights": [w.detach().clone() for w in self.weights],
            "act": [q.scale_offset.detach().clone() for q in self.act],
            "weight": [m.weight_scale_offset.detach().clone() for m in self.weight],
            "tdq": [copied(q.generator) for q in self.tdq],
            "smooth": [m.smooth_offset.detach().clone() for m in self.smooth],
        }

    @torch.no_grad()
    def load(self, state: dict) -> None:
        for a, s in zip(self.adapters, state["lora"], strict=True):
            a.load_state_dict(s)
        for w, s in zip(self.weights, state.get("weights", []), strict=True):
            w.copy_(s)
        for q, s in zip(self.act, state["act"], strict=True):
            q.scale_offset.copy_(s)
        for m, s in zip(self.weight, state["weight"], strict=True):
            m.weight_scale_offset.copy_(s)
        for q, s in zip(self.tdq, state["tdq"], strict=True):
            q.generator.load_state_dict(s)
        for m, s in zip(self.smooth, state.get("smooth", []), strict=True):
            m.smooth_offset.copy_(s)

    def broken(self) -> list[str]:
        """Names of trained tensors holding NaN / inf (what a non-finite loss came from)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        named = [(names.get(id(p), "a scale offset"), p) for g in self.groups() for p in g["params"]]
        return [n for n, p in named if not bool(torch.isfinite(p).all())]

    @torch.no_grad()
    def finish(self) -> None:
        """Merge the adapters, bake the scale and smoothing offsets in, rewrite TDQ tables; nothing trains."""
        L.merge(self.model)
        for q in self.act:
            q.scale.mul_(q.scale_offset.exp())
            q.scale_offset = None
        for m in self.weight:
            m.weight_scale_fixed = m.weight_scale_fixed * m.weight_scale_offset.exp()
            m.weight_scale_offset = None
        for m in self.smooth:
            m.smooth.mul_(m.smooth_offset.exp())
            m.smooth_offset = None
        for q in self.tdq:
            q.learnable = False
            q.write_tdq_table()
        for p in self.model.parameters():
            p.requires_grad_(False)


def finetune(
    model: nn.Module,
    trajectory: Trajectory,
    config: FinetuneConfig | None = None,
    *,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Fine-tune a quantized model on the FP trajectory ``trajectory`` (its recorded FP outputs are the
    teacher); in place, leaving it ready to :func:`~diffquant.prepare.freeze` (not frozen).

    Args:
        model: a quantized model (prepared and calibrated, or frozen: it is thawed to its integers).
        trajectory: the FP model's recorded calls with their outputs (every step of a few samples:
            :func:`finetune_calibration`).
        config: the :class:`~diffquant.recipe.FinetuneConfig` (default: its defaults).
        checkpoint: a directory for resumable checkpoints (every ``config.checkpoint_every`` steps,
            and when training stops: done, or by ``max_minutes``); an existing checkpoint there is
            resumed (one of a finished run: only merged again).
        progress: a progress bar with the running loss.

    Returns:
        ``{"iterations", "held_before", "held_after", "train_loss", "trained", "seconds", "stopped",
        "resumed_at", "best_step", "held_curve", "rows"}``: held-out mean squared noise-prediction
        error before and after (of the state kept: the best scored), the step a checkpoint resumed
        from (0: none), the step kept and the held-out loss at every scoring.

    Raises:
        FinetuneError: a non-finite loss (the step, the iteration, the tensors that broke); the
            model keeps the last finite state.
    """
    from tqdm.auto import tqdm

    config = config or FinetuneConfig()
    name = input_name(model)
    train, held = _split(trajectory, name)
    if not train:
        raise ValueError("fine-tuning: the trajectory holds no call with a recorded FP output to distill from")
    if len(held) > HELD_OUT_CALLS:  # spread over the steps
        held = [held[round(i * (len(held) - 1) / (HELD_OUT_CALLS - 1))] for i in range(HELD_OUT_CALLS)]
    draw = step_weights(trajectory, train, config.sigma_weight)  # calls drawn in proportion (sigma_weight > 0)
    held_weight = step_weights(trajectory, held, config.sigma_weight).tolist() if held else []
    gen = torch.Generator().manual_seed(config.seed)

    rollout, fallback = None, None
    if config.rollout > 1:
        try:
            rollout = Rollout(trajectory, name, config.rollout)
        except ValueError as error:
            if not config.rollout_fallback:
                raise
            fallback = str(error)
            warnings.warn(f"fine-tuning with rollout=1 instead of {config.rollout}: {error}", stacklevel=2)

    def loss_of(entry, rows: torch.Tensor | None = None) -> torch.Tensor:
        i, positions, c, _ = entry
        if rows is not None:
            positions = [positions[r] for r in rows.tolist()]
        if rollout is not None:
            return rollout.loss(model, entry, positions)
        call = trajectory[i].rows(positions)
        out = noise_prediction(call.replay(model), c)
        return F.mse_loss(out.float(), call.output.float())

    rank, world = rank_and_world()

    def held_loss() -> float:
        if not held:
            return float("nan")
        with torch.no_grad():
            mine = zip(held[rank::world], held_weight[rank::world], strict=True)
            total = torch.tensor(sum(w * float(loss_of(e)) for e, w in mine), dtype=torch.float64)
        if world > 1:
            dist.all_reduce(total)
        return float(total) / len(held)

    def average_gradients(params: list[torch.Tensor], share: float) -> None:
        """Sum over ranks of each rank's gradient times its share of the batch's rows; a tensor no
        rank has a gradient for keeps none (the optimizer skips it, as in one process)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([float(p.grad is not None) for p in params])])
        flat[: -len(params)] *= share
        dist.all_reduce(flat)
        chunks = flat.split([g.numel() for g in grads] + [len(params)])
        for p, chunk, seen in zip(params, chunks, chunks[-1].tolist(), strict=False):
            p.grad = chunk.view_as(p).clone() if seen else None

    def out_of_time() -> bool:  # rank 0's clock decides, so every rank stops at the same step
        late = torch.tensor(float(time.perf_counter() - start_time > 60 * config.max_minutes))
        if world > 1:
            dist.broadcast(late, 0)
        return bool(late)

    start_time = time.perf_counter()
    with without_output_gain(model):  # the output correction (if any) is fitted afterwards
        trainables = Trainables(model, config)
        groups = trainables.groups()
        trained = {
            "lora_layers": len(trainables.adapters), "weights": len(trainables.weights), "act_scales": len(trainables.act),
            "tdq_generators": len(trainables.tdq), "weight_scales": len(trainables.weight),
            "smooth_layers": len(trainables.smooth),
        }  # fmt: skip
        opt = torch.optim.AdamW(groups) if groups else None
        base_lr = [g["lr"] for g in groups]
        ckpt = Path(checkpoint) / "finetune.pt" if checkpoint is not None else None
        step = 0
        if ckpt is not None and ckpt.is_file():
            saved = torch.load(ckpt, weights_only=False)
            trainables.load(saved["model"])
            if opt is not None:
                opt.load_state_dict(saved["opt"])
            gen.set_state(saved["generator"])
            step, best, curve = saved["step"], saved["best"], saved["curve"]
        else:
            curve = [(0, held_loss())]  # the held-out loss at every scoring, from the start
            best = {"step": 0, "held": curve[0][1], "state": trainables.state()}
        resumed_at, held_before = step, curve[0][1]

        def save() -> None:
            if ckpt is None or rank != 0:
                return
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            state = {"model": trainables.state(), "opt": opt.state_dict() if opt else None, "step": step}
            state.update(best=best, curve=curve)
            state["generator"] = gen.get_state()
            tmp = ckpt.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(ckpt)

        losses: list[float] = []
        stopped = None
        good = trainables.state()  # the last finite state (a NaN loss restores it)

        def score() -> None:  # the held-out loss now; the best state so far is what is kept
            h = held_loss()
            curve.append((step, h))
            if not h >= best["held"]:  # NaN-safe: a NaN is never best
                best.update(step=step, held=h, state=trainables.state())

        params = [p for g in groups for p in g["params"]]
        bar = tqdm(
            total=config.iterations, initial=step, desc="finetune", unit="step", disable=not progress or rank != 0
        )
        try:
            with torch.enable_grad():
                while step < config.iterations and opt is not None:
                    if config.sigma_weight:
                        entry = train[int(torch.multinomial(draw, 1, generator=gen))]
                    else:
                        entry = train[int(torch.randint(len(train), (1,), generator=gen))]
                    n = len(entry[1])
                    rows = torch.randperm(n, generator=gen)[: config.batch] if config.batch < n else torch.arange(n)
                    mine = rows[rank::world]  # every rank drew the same rows: each takes its share
                    loss = loss_of(entry, mine) if len(mine) else None
                    if world > 1:  # the batch's loss, for the bar and the NaN check (as one process has it)
                        total = torch.tensor(0.0 if loss is None else float(loss.detach()) * len(mine) / len(rows))
                        dist.all_reduce(total)
                        batch_loss = total
                    else:
                        batch_loss = loss.detach()
                    if not bool(torch.isfinite(batch_loss)):
                        broken = trainables.broken()
                        trainables.load(good)
                        raise FinetuneError(
                            f"fine-tuning: the loss is {float(batch_loss)} at time step {entry[3]} (iteration {step + 1})"
                            + (f"; non-finite values in {', '.join(broken[:3])}" if broken else "")
                            + "; the model keeps the last finite state. Lower finetune.lr / scale_lr."
                        )
                    opt.zero_grad(set_to_none=True)
                    if loss is not None:
                        loss.backward()
                    if world > 1:
                        average_gradients(params, len(mine) / len(rows))
                    for g, lr in zip(opt.param_groups, base_lr, strict=True):  # stateless: resumes as it was
                        g["lr"] = lr * learning_rate_factor(step, config.iterations, config.warmup)
                    opt.step()
                    step += 1
                    losses.append(float(batch_loss))
                    if step % 50 == 0:
                        good = trainables.state()
                    bar.update(1)
                    if step % 10 == 0:
                        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3g}")
                    if config.eval_every and step % config.eval_every == 0:
                        score()
                    if config.checkpoint_every and step % config.checkpoint_every == 0:
                        save()
                    if config.max_minutes is not None and out_of_time():
                        stopped = f"max_minutes ({config.max_minutes}) at step {step}"
                        break
            if stopped is None and curve[-1][0] != step:
                score()  # the final state competes for best
            save()  # the end state too: the same call again resumes (or, when done, only merges)
            if stopped is not None and curve[-1][0] != step:
                score()  # after saving: a resumed run scores at the steps an uninterrupted one does
        finally:
            bar.close()
        if held:
            trainables.load(best["state"])
        trainables.finish()
        held_after = held_loss()
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "iterations": step, "held_before": held_before, "held_after": held_after,
        "train_loss": sum(tail) / len(tail) if tail else float("nan"), "trained": trained,
        "seconds": round(time.perf_counter() - start_time, 1), "stopped": stopped, "resumed_at": resumed_at,
        "best_step": best["step"], "held_curve": [[k, round(h, 8)] for k, h in curve],
        "rows": {"train_calls": len(train), "held_calls": len(held)},
        "rollout": rollout.k if rollout is not None else 1, **({"rollout_fallback": fallback} if fallback else {}),
    }  # fmt: skip
