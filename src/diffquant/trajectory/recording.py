"""Record a denoiser's calls from any sampling loop: the built-in sampler, a pipeline, your own.

    with diffquant.recording(model) as trajectory:
        my_sampler(model)                      # any loop that calls model(x, t, ...)
    qmodel = diffquant.quantize(model, "w8a8", calibration=trajectory)

Where each call sits is read from the sampler's :func:`~diffquant.timestep.denoising_step` when one
is set (the built-in sampler sets it), else from the model's own time-step argument: a call whose
``t`` is higher than the previous call's starts a new sampling run, calls at the same ``t`` are one
step (classifier-free guidance as two calls), and the batch rows of a run are new samples
(a batch twice the run's first one holds each sample twice: guidance stacked in one call).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from diffquant.denoiser import (
    clone_tensors,
    input_channels,
    input_name,
    noise_prediction,
    take_rows,
    timestep_argument,
    timestep_of,
)  # fmt: skip
from diffquant.memory import trim
from diffquant.timestep import StepInfo, current_step
from diffquant.trajectory.core import DenoiserCall, Trajectory, call_batch

Locate = Callable[[tuple, dict], tuple[StepInfo, list[int]]]


def model_num_timesteps(model: nn.Module) -> int | None:
    """The training time steps ``T`` a model declares (built-in models' scheduler config), else ``None``."""
    cfg = getattr(model, "config", None)
    if isinstance(cfg, dict) and "scheduler" in cfg:
        return int(cfg["scheduler"]["num_train_timesteps"])
    return getattr(model, "diffquant_num_timesteps", None)


class _Runs:
    """Finds sampling runs, step indices and sample indices in a stream of calls (see the module docstring)."""

    def __init__(self):
        self.prev_key = None
        self.steps: list[int] = []  # distinct time steps of the current run
        self.base = 0
        self.next_base = 0
        self.batch: int | None = None

    def new_run(self) -> None:
        self.steps, self.base, self.batch = [], self.next_base, None

    def samples(self, batch: int) -> list[int]:
        if self.batch is None:
            self.batch = batch
            self.next_base = self.base + batch
        if batch % self.batch:
            raise ValueError(
                f"recording: a call with a batch of {batch} in a sampling run that started with {self.batch}; "
                "each call of a run must hold the run's samples (or a multiple, for guidance)"
            )
        return [self.base + j % self.batch for j in range(batch)]


class Recorder:
    """Forward hooks on ``model`` that append each call to ``trajectory``.

    Args:
        model: the denoiser.
        trajectory: where calls go.
        outputs: also keep the FP noise prediction of each call.
        keep: per step index, the samples to keep (``None``: every call and row).
        locate: ``locate(args, kwargs) -> (StepInfo, samples)`` for runners that know where each call
            sits (pipelines); default: the sampler's step, or the model's ``t`` (module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        trajectory: Trajectory,
        outputs: bool = True,
        keep: list[set[int]] | None = None,
        locate: Locate | None = None,
    ):
        self.model = model
        self.trajectory = trajectory
        self.outputs = outputs
        self.keep = keep
        self.locate = locate
        self.samples: list[int] | None = None  # a runner's sample indices of the current batch
        self.t_name, self.t_pos = timestep_argument(model)
        self.input_name = input_name(model)
        self.runs = _Runs()
        self.run_views: list = []
        self.depth = 0
        self.pending: list = []
        self.handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True),
            model.register_forward_hook(self._post, with_kwargs=True, prepend=True, always_call=True),
        ]

    # ------------------------------------------------------------------ where a call sits
    def _auto(self, args, kwargs) -> tuple[StepInfo, list[int]]:
        step = current_step()
        batch = call_batch(args, kwargs)
        if step is not None and step.index >= 0:
            key = -step.index  # a run's indices rise: a lower index (or a restart at 0) is a new run
            if self.runs.prev_key is None or key > self.runs.prev_key:
                self._close_run()
                self.runs.new_run()
            self.runs.prev_key = key
            if step.timestep not in self.runs.steps:
                self.runs.steps.append(step.timestep)
            return step, self.samples if self.samples is not None else self.runs.samples(batch)
        t = timestep_of(args, kwargs, self.t_name, self.t_pos)
        if t is None:
            raise ValueError("recording: a call without its time-step argument")
        flat = t.flatten()
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            raise ValueError(
                "recording: a batch of different time steps in one call; a sampler calls the denoiser at one "
                "time step per call (sample them in separate calls)"
            )
        t_int = round(float(flat[0]) * self.trajectory.timestep_scale)
        if self.runs.prev_key is None or t_int > self.runs.prev_key:  # t rose: a new sampling run
            self._close_run()
            self.runs.new_run()
        self.runs.prev_key = t_int
        if not self.runs.steps or self.runs.steps[-1] != t_int:
            self.runs.steps.append(t_int)
        index = len(self.runs.steps) - 1
        samples = self.samples if self.samples is not None else self.runs.samples(batch)
        return StepInfo(index, t_int, -1), samples

    def _close_run(self) -> None:
        """Give the calls of the finished run their step count; the first run's steps are the schedule."""
        steps = self.runs.steps
        if not steps:
            return
        if not self.trajectory.timesteps:
            self.trajectory.timesteps = list(steps)
        for view in self.run_views:
            s = view.source.step
            if s.num_steps < 0:
                view.source.step = StepInfo(s.index, s.timestep, len(steps))
        self.run_views = []
        self.trajectory.n_runs += 1
        self.runs.steps = []

    # ------------------------------------------------------------------ hooks
    def _pre(self, module, args, kwargs):
        self.depth += 1
        if self.depth > 1:
            self.pending.append(None)
            return
        step, samples = self.locate(args, kwargs) if self.locate is not None else self._auto(args, kwargs)
        if len(samples) != call_batch(args, kwargs):
            raise ValueError(f"recording: {len(samples)} sample indices for a batch of {call_batch(args, kwargs)}")
        self.trajectory.recorded_samples.update(samples)
        positions = list(range(len(samples)))
        if self.keep is not None:
            wanted = self.keep[step.index] if 0 <= step.index < len(self.keep) else set()
            positions = [p for p, s in enumerate(samples) if s in wanted]
        if not positions:
            self.pending.append(None)
            return
        n = len(samples)
        if len(positions) < n:
            idx = torch.tensor(positions, dtype=torch.long)
            a, k = take_rows(args, idx, n), take_rows(kwargs, idx, n)
        else:
            idx, a, k = None, args, kwargs
        self.pending.append((clone_tensors(a), clone_tensors(k), step, [samples[p] for p in positions], idx, n))

    def _post(self, module, args, kwargs, output):
        self.depth -= 1
        entry = self.pending.pop() if self.pending else None
        if entry is None:
            return
        a, k, step, samples, idx, n = entry
        eps = None
        if self.outputs:
            eps = noise_prediction(output, input_channels(args, kwargs, self.input_name))
            if eps is not None:
                eps = eps.detach()
                eps = (eps[idx] if idx is not None and eps.shape[0] == n else eps).clone()
        view = self.trajectory.append(DenoiserCall(a, k, step, samples, eps))
        if step.num_steps < 0:
            self.run_views.append(view)
        trim()  # the FP forward's activations are freed (diffquant.memory)

    def close(self) -> Trajectory:
        """Remove the hooks and finish the last run; returns the trajectory."""
        for h in self.handles:
            h.remove()
        self.handles = []
        self._close_run()
        return self.trajectory


@contextlib.contextmanager
def recording(
    model: nn.Module,
    *,
    max_bytes: int | None = None,
    spill_dir=None,
    outputs: bool = True,
    num_timesteps: int | None = None,
    trajectory: Trajectory | None = None,
):
    """Record the calls of ``model`` made inside the block into a :class:`Trajectory`.

    Args:
        model: the full-precision denoiser, called as ``model(x, t, ...)``.
        max_bytes: bytes kept in memory before calls are spilled to disk (default a tenth of RAM).
        spill_dir: where spilled calls go (default: a temporary directory).
        outputs: keep the FP noise predictions too (the output correction and the TDQ output fit use them).
        num_timesteps: the model's training time steps ``T`` (default: from the model, or 1000).
        trajectory: append to this trajectory instead of a new one.

    Example:
        >>> with diffquant.recording(model) as traj:          # doctest: +SKIP
        ...     my_sampler(model)
        >>> diffquant.quantize(model, "w8a8-tdq", calibration=traj)  # doctest: +SKIP
    """
    traj = trajectory or Trajectory(max_bytes, spill_dir, num_timesteps or model_num_timesteps(model) or 1000)
    rec = Recorder(model, traj, outputs=outputs)
    try:
        with torch.no_grad():
            yield traj
    finally:
        rec.close()
