"""A recorded full-precision trajectory: the denoiser calls of one or more sampling runs.

Each :class:`DenoiserCall` holds one call's arguments (``args``, ``kwargs``), the step it ran at
(:class:`~diffquant.timestep.StepInfo`), the sample (trajectory) each batch row belongs to, and the
FP noise prediction. A :class:`Trajectory` keeps its calls in memory up to ``max_bytes``; calls past
that are written to a spill directory as safetensors files (one per call) and read back one at a
time when iterated, so memory stays bounded whatever the calibration size.

Every method that needs the FP model's inputs (range calibration, SmoothQuant, GPTQ, the TDQ output
fit, the output correction) replays the calls of one recording (:meth:`DenoiserCall.replay`),
selecting the steps and samples it wants with :meth:`Trajectory.select`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from diffquant.denoiser import batch_size, map_tensors, take_rows
from diffquant.memory import trim
from diffquant.recipe import CalibrationConfig
from diffquant.timestep import StepInfo, denoising_step
from diffquant.trajectory.selection import selected_rows


def memory_total() -> int:
    """Physical memory of this machine in bytes (``/proc/meminfo``; 16 GiB where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 << 30


def default_budget() -> int:
    """The default byte budget of one in-memory buffer of ``quantize`` (a trajectory, a Hessian group):
    a tenth of physical memory (2.4 GB on the 24 GiB reference machine)."""
    return memory_total() // 10


def _nbytes(value) -> int:
    total = 0

    def add(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    map_tensors(add, value)
    return total


class _Ref:
    """A tensor's place in a spilled call (its key in the call's safetensors file)."""

    __slots__ = ("key",)

    def __init__(self, key: str):
        self.key = key


@dataclasses.dataclass
class DenoiserCall:
    """One recorded denoiser call.

    Attributes:
        args, kwargs: the call's arguments (tensors detached copies).
        step: where the call sits in its sampling run (index in the schedule, time step, steps).
        samples: per batch row, the index of the sample (trajectory) it belongs to; classifier-free
            guidance batches hold each sample twice.
        output: the FP model's noise prediction (``None`` when not recorded).
    """

    args: tuple
    kwargs: dict
    step: StepInfo
    samples: list[int]
    output: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return len(self.samples)

    def rows(self, positions: list[int]) -> DenoiserCall:
        """The call cut to the batch rows at ``positions`` (the same call when that is all of them)."""
        if len(positions) == self.batch and positions == list(range(self.batch)):
            return self
        idx = torch.tensor(positions, dtype=torch.long)
        n = self.batch
        return DenoiserCall(
            take_rows(self.args, idx, n), take_rows(self.kwargs, idx, n), self.step,
            [self.samples[p] for p in positions], None if self.output is None else self.output[idx],
        )  # fmt: skip

    def replay(self, model: nn.Module, forward: Callable | None = None):
        """Run the call again on ``model`` at its step and return the output.

        ``forward`` defaults to ``model.forward``: the model's own forward hooks (a recorder, the step
        hook) do not run, the step is set here; its submodules' hooks run as usual.
        """
        fn = forward or model.forward
        with denoising_step(self.step.index, self.step.timestep, self.step.num_steps):
            try:
                return fn(*self.args, **self.kwargs)
            finally:
                trim()  # the call's activations are freed: give their pages back (diffquant.memory)

    def nbytes(self) -> int:
        return _nbytes((self.args, self.kwargs, self.output))


class _Spilled:
    """A call whose tensors live in ``path`` (safetensors), loaded when the call is used."""

    def __init__(self, path: Path, structure, step: StepInfo, samples: list[int]):
        self.path, self.structure, self.step, self.samples = path, structure, step, samples

    @classmethod
    def write(cls, call: DenoiserCall, path: Path) -> _Spilled:
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}

        def ref(t):
            key = f"t{len(tensors)}"
            tensors[key] = t.detach().contiguous().clone()  # own storage: safetensors refuses shared ones
            return _Ref(key)

        structure = map_tensors(ref, (call.args, call.kwargs, call.output))
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        return cls(path, structure, call.step, call.samples)

    def load(self) -> DenoiserCall:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            args, kwargs, output = map_tensors(lambda r: f.get_tensor(r.key), self.structure, (_Ref,))
        return DenoiserCall(args, kwargs, self.step, self.samples, output)


@dataclasses.dataclass
class _View:
    """A call of the trajectory, possibly cut to some of its rows."""

    source: DenoiserCall | _Spilled
    positions: list[int] | None = None  # None: every row

    @property
    def step(self) -> StepInfo:
        return self.source.step

    @property
    def samples(self) -> list[int]:
        s = self.source.samples
        return s if self.positions is None else [s[p] for p in self.positions]

    def load(self) -> DenoiserCall:
        call = self.source if isinstance(self.source, DenoiserCall) else self.source.load()
        return call if self.positions is None else call.rows(self.positions)


class Trajectory:
    """The recorded denoiser calls of FP sampling runs (see the module docstring).

    Args:
        max_bytes: bytes of calls kept in memory (default :func:`default_budget`); calls beyond it
            go to ``spill_dir``.
        spill_dir: where spilled calls are written (default: a temporary directory, removed with the
            trajectory).
        num_timesteps: the model's training time steps ``T`` (for PTQ4DM's step selection).
    """

    def __init__(self, max_bytes: int | None = None, spill_dir: str | os.PathLike | None = None, num_timesteps=None):
        self.max_bytes = default_budget() if max_bytes is None else int(max_bytes)
        self._spill_root = Path(spill_dir) if spill_dir is not None else None
        self._spill_dir: Path | None = None
        self._views: list[_View] = []
        self.timesteps: list[int] = []  # the schedule: time step of each step index (the first run's)
        self.num_timesteps = num_timesteps
        self.timestep_scale = 1.0  # how the caller rescaled t before the denoiser saw it (Flux: 1 / 1000)
        self.alphas_cumprod: torch.Tensor | None = None  # the noise schedule per training step, where known
        self.memory_bytes = 0
        self.spilled_bytes = 0
        self.recorded_samples: set[int] = set()  # every sample the recording saw, kept rows or not
        self.n_runs = 0  # sampling runs (batches of trajectories) recorded

    # ------------------------------------------------------------------ building
    def _spill_path(self) -> Path:
        if self._spill_dir is None:
            root = self._spill_root or Path(tempfile.gettempdir())
            root.mkdir(parents=True, exist_ok=True)
            self._spill_dir = Path(tempfile.mkdtemp(prefix="diffquant-trajectory-", dir=root))
            weakref.finalize(self, shutil.rmtree, str(self._spill_dir), True)
        return self._spill_dir / f"call-{len(self._views):07d}.safetensors"

    def append(self, call: DenoiserCall) -> _View:
        """Add a call: kept in memory while under ``max_bytes``, else spilled to disk."""
        size = call.nbytes()
        if self.memory_bytes + size <= self.max_bytes:
            view = _View(call)
            self.memory_bytes += size
        else:
            view = _View(_Spilled.write(call, self._spill_path()))
            self.spilled_bytes += size
        self._views.append(view)
        self.recorded_samples.update(call.samples)
        return view

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self._views)

    def __iter__(self) -> Iterator[DenoiserCall]:
        for v in self._views:
            yield v.load()

    def __getitem__(self, i: int) -> DenoiserCall:
        """Call ``i`` (read from disk if it was spilled; nothing is kept)."""
        return self._views[i].load()

    @property
    def spilled(self) -> bool:
        return self.spilled_bytes > 0

    @property
    def samples(self) -> list[int]:
        """The samples (trajectories) recorded, in order."""
        return sorted({s for v in self._views for s in v.samples})

    @property
    def steps(self) -> list[StepInfo]:
        return [v.step for v in self._views]

    def _derived(self, views: list[_View]) -> Trajectory:
        out = Trajectory.__new__(Trajectory)
        out.__dict__.update(self.__dict__)
        out._views = views
        out._parent = self  # keeps the spill directory alive while the selection is used
        return out

    def select(self, config: CalibrationConfig | None = None, **changes) -> Trajectory:
        """The calls and rows a calibration selection observes (a view: nothing is copied).

        Args:
            config: the :class:`~diffquant.recipe.CalibrationConfig` whose ``selection``,
                ``n_samples`` (the first samples recorded), ``every``, ``uniform_from``,
                ``single_index`` and PTQ4DM settings pick steps and samples; ``None``: every call.
            changes: fields replaced in ``config`` (``selection="all"``, ``n_samples=64``...).
        """
        if config is None and not changes:
            return self._derived(list(self._views))
        config = dataclasses.replace(config or CalibrationConfig(), **changes)
        order = sorted(self.recorded_samples or self.samples)[: config.n_samples]
        rank = {s: i for i, s in enumerate(order)}  # recorded sample -> 0..n-1, as the selection counts them
        T = self.num_timesteps or 1000
        rows = [set(r) for r in selected_rows(config, self.timesteps, len(order), T)]
        views = []
        for v in self._views:
            k = v.step.index
            if not 0 <= k < len(rows):
                continue
            samples = v.samples
            keep = [p for p, s in enumerate(samples) if s in rank and rank[s] in rows[k]]
            if not keep:
                continue
            base = v.positions
            positions = keep if base is None else [base[p] for p in keep]
            views.append(_View(v.source, None if base is None and len(keep) == len(samples) else positions))
        return self._derived(views)

    def summary(self) -> dict:
        """What was recorded: calls, samples, steps, runs, bytes in memory and spilled (JSON-ready)."""
        return {
            "calls": len(self), "samples": len(self.samples), "steps": len(self.timesteps), "runs": self.n_runs,
            "memory_bytes": self.memory_bytes, "spilled_bytes": self.spilled_bytes,
        }  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"Trajectory({len(self)} calls, {len(self.samples)} samples, {len(self.timesteps)} steps, "
            f"{self.memory_bytes / 1e6:.1f} MB in memory, {self.spilled_bytes / 1e6:.1f} MB spilled)"
        )


def call_batch(args: tuple, kwargs: dict) -> int:
    """The batch of a call (1 when no argument has a batch dimension)."""
    return batch_size(args, kwargs) or 1
