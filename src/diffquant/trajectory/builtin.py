"""Record the trajectory of a built-in-style denoiser with its own sampler (``config['scheduler']``,
``num_classes``, ``sample_shape``), as the evaluation protocol samples it (seeded per sample)."""

from __future__ import annotations

from torch import nn

from diffquant.recipe import CalibrationConfig
from diffquant.sampling import SamplerConfig, balanced_labels, make_scheduler, sample_batch
from diffquant.trajectory.core import Trajectory
from diffquant.trajectory.recording import Recorder
from diffquant.trajectory.selection import union_rows


def has_builtin_sampler(model: nn.Module) -> bool:
    """Whether the model carries its own sampler settings (built-in models: ``config``, ``num_classes``,
    ``sample_shape``); other models are recorded from the user's loop (:func:`~diffquant.recording`)."""
    return all(hasattr(model, a) for a in ("config", "num_classes", "sample_shape"))


def schedule_of(model: nn.Module, config: CalibrationConfig) -> list[int]:
    """The time steps of the calibration sampler on a built-in-style model."""
    return [int(t) for t in make_scheduler(config.sampler, model.config["scheduler"], config.steps).timesteps]


def record_builtin(
    model: nn.Module,
    config: CalibrationConfig,
    selections: list[CalibrationConfig] | None = None,
    *,
    outputs: bool = True,
    max_bytes: int | None = None,
    spill_dir=None,
    progress: bool = True,
) -> Trajectory:
    """Sample ``max(n_samples)`` calibration trajectories with the model's own sampler and record them.

    Args:
        model: a built-in-style denoiser (see :func:`has_builtin_sampler`).
        config: sampler, steps, seed and batch size of the trajectories.
        selections: the step / sample selections that will be replayed; only their rows are kept
            (default: ``[config]``). Their sampler settings must be ``config``'s.
        outputs, max_bytes, spill_dir: as :func:`~diffquant.trajectory.recording.recording`.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    if not has_builtin_sampler(model):
        raise TypeError(
            f"{type(model).__name__} has no built-in sampler settings (config['scheduler'], num_classes, "
            "sample_shape): record its trajectory from your own sampling loop, "
            "`with diffquant.recording(model) as traj: my_sampler(model)`, and pass calibration=traj"
        )
    selections = selections or [config]
    schedule = model.config["scheduler"]
    scheduler = make_scheduler(config.sampler, schedule, config.steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    T = int(schedule["num_train_timesteps"])
    n = max(c.n_samples for c in selections)
    traj = Trajectory(max_bytes, spill_dir, T)
    recorder = Recorder(model, traj, outputs=outputs, keep=union_rows(selections, timesteps, T))
    sampler = SamplerConfig(sampler=config.sampler, steps=config.steps, seed=config.seed)
    bar = tqdm(total=n * config.steps, desc="recording FP trajectory", unit="step", disable=not progress, leave=False)
    try:
        for lo in range(0, n, config.batch_size):
            hi = min(n, lo + config.batch_size)
            recorder.samples = list(range(lo, hi))
            sample_batch(
                model, range(lo, hi), balanced_labels(hi - lo, model.num_classes, lo), sampler, schedule,
                model.sample_shape, model.num_classes, on_step=lambda *a, m=hi - lo: bar.update(m),
            )  # fmt: skip
    finally:
        recorder.close()
        bar.close()
    traj.timesteps = timesteps
    traj.alphas_cumprod = scheduler.alphas_cumprod.float()
    return traj
