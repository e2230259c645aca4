"""Record the full-precision model's denoiser calls once; every calibration method replays them.

- :func:`recording` records from any loop (your sampler, a pipeline); :func:`record_builtin`
  runs a built-in model's own sampler;
- :class:`Trajectory` holds the calls (spilled to disk past a byte budget) and
  :meth:`Trajectory.select` picks a calibration selection's steps and samples;
- :meth:`DenoiserCall.replay` runs a call again on the (prepared) model.
"""

from diffquant.trajectory.builtin import has_builtin_sampler, record_builtin, schedule_of
from diffquant.trajectory.core import DenoiserCall, Trajectory, default_budget, memory_total
from diffquant.trajectory.recording import Recorder, model_num_timesteps, recording
from diffquant.trajectory.selection import selected_rows, step_buckets, union_rows

__all__ = [
    "DenoiserCall",
    "Recorder",
    "Trajectory",
    "default_budget",
    "has_builtin_sampler",
    "memory_total",
    "model_num_timesteps",
    "record_builtin",
    "recording",
    "schedule_of",
    "selected_rows",
    "step_buckets",
    "union_rows",
]
