"""Latency and weight memory of a quantized model against its FP32 original, measured side by side.

Every number comes from one process: the FP32 model (eager, and compiled when asked), the fake-quant
reference and the backend run the same inputs in turn, each after warm-up, timed as the median of
``repeats`` calls. Ratios are what to compare; absolute times depend on the machine and its load.

Example:
    >>> from diffquant.bench import bench_forward, quantized_for_bench
    >>> fp, q = quantized_for_bench("fashion-unet", "w8a7")   # doctest: +SKIP
    >>> bench_forward(fp, q, backend="cpu", batch=64)         # doctest: +SKIP
    {'backend': 'cpu', 'fp_ms': ..., 'q_ms': ..., 'speedup': ..., ...}
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from diffquant.denoiser import map_tensors, split_output
from diffquant.recipe import CalibrationConfig

# A small calibration: enough for representative scales, fast enough for a benchmark run.
BENCH_CALIBRATION = CalibrationConfig(n_samples=32, steps=20, every=2, batch_size=32)


def time_ms(fn: Callable[[], object], repeats: int = 5, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _sync() -> None:
    """Wait for queued GPU work, so a GPU call is timed to its end (no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def backend_device(backend: str) -> str:
    """Where a backend runs: ``cuda`` for the GPU GEMM backend, else ``cpu``."""
    return "cuda" if backend == "cuda" else "cpu"


def interleaved_ms(calls: dict[str, Callable[[int], object]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median ms of each ``call(round)``, every round calling each once in turn (load hits all alike).

    The round index lets callers vary the input per round (e.g. the time step) identically for all.
    """
    times = {name: [] for name in calls}
    for r in range(warmup + rounds):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn(r)
            if r >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def compile_forward(model: nn.Module) -> nn.Module:
    """Compile ``model.forward`` with Inductor (weights frozen as constants); hooks stay eager.

    The time-step hook :func:`diffquant.quantize` installs runs before the compiled forward, so
    per-step scales are looked up outside the graph and one graph serves every step.
    """
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    model.forward = torch.compile(model.forward, dynamic=False)
    return model


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """``10 log10(|ref|^2 / |ref - out|^2)`` (inf when identical)."""
    noise = (ref.double() - out.double()).pow(2).sum()
    return float("inf") if noise == 0 else float(10 * torch.log10(ref.double().pow(2).sum() / noise))


def example_inputs(model: nn.Module, batch: int, timestep: int = 500, seed: int = 0):
    """``(x, t, labels)`` for one denoiser call of a built-in model."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *model.sample_shape, generator=g)
    t = torch.full((batch,), timestep, dtype=torch.long)
    labels = torch.randint(0, model.num_classes, (batch,), generator=g)
    return x, t, labels


def quantized_for_bench(model: str, recipe="w8a7", progress: bool = False) -> tuple[nn.Module, nn.Module]:
    """``(fp, quantized)``: a built-in model and a copy quantized with ``recipe`` (a name or a
    :class:`~diffquant.recipe.Recipe`) on a small calibration."""
    from diffquant import quantize
    from diffquant.models import load_builtin

    fp = load_builtin(model).eval()
    return fp, quantize(copy.deepcopy(fp), recipe, BENCH_CALIBRATION, progress=progress).eval()


def _round_ms(result: dict) -> dict:
    return {k: round(v, 2) if k.endswith("_ms") else v for k, v in result.items()}


@torch.no_grad()
def bench_forward(
    fp: nn.Module,
    quantized: nn.Module,
    backend: str = "cpu",
    batch: int = 64,
    repeats: int = 5,
    compile: bool = True,
    inputs: tuple[tuple, dict] | None = None,
) -> dict:
    """One denoiser call: FP32 eager (and compiled) vs the quantized model on ``backend``.

    Args:
        fp: the full-precision model (a built-in one, or any denoiser with ``inputs``).
        quantized: its quantized copy (from :func:`quantized_for_bench`, ``quantize`` or ``load_quantized``).
        backend: ``reference`` (fake quant), ``cpu`` (oneDNN int8) or ``cuda`` (int8 / FP8 GEMMs on
            the GPU; both models are moved there, FP32 stays the baseline).
        batch: images per call.
        repeats: timed calls per variant (median reported).
        compile: also time ``torch.compile`` for FP32 and the backend; ``q_ms`` is then the compiled
            backend (eager times are reported beside it).
        inputs: ``(args, kwargs)`` of the call (default: a built-in model's ``(x, t, labels)`` of
            ``batch`` images; a diffusers denoiser's from
            :func:`diffquant.integrations.folders.example_call`).

    Returns:
        A dict with ``backend``, ``cpu`` (the CPU model, its int8 ISA flags and family / model
        numbers), ``fp_ms`` (FP32 eager), ``q_ms``, ``speedup`` (= fp_ms / q_ms), the eager and
        compiled variants, ``fp_weight_bytes``, ``q_weight_bytes``, ``threads``, the
        lowering report and ``sqnr_vs_reference_db`` (backend output against the fake-quant reference).
    """
    from diffquant.backends import lower
    from diffquant.backends.cpu import host as cpu_host
    from diffquant.serialization import weight_bytes

    device = backend_device(backend)
    fp, quantized = fp.to(device), quantized.to(device)
    args, kwargs = map_tensors(
        lambda v: v.to(device), inputs if inputs is not None else (example_inputs(fp, batch), {})
    )

    def call(m: nn.Module) -> Callable[[], torch.Tensor]:  # diffusers models return an output object: its tensor
        return lambda: split_output(m(*args, **kwargs))[0]

    result = {
        "recipe": quantized.diffquant_recipe.name,
        "backend": backend,
        "batch": batch,
        "cpu": cpu_host()["text"],  # int8 speed depends on the ISA class (docs/backends.md)
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "fp_weight_bytes": weight_bytes(fp),
        "q_weight_bytes": weight_bytes(quantized),
    }
    result["q_weight_ratio"] = round(result["q_weight_bytes"] / result["fp_weight_bytes"], 4)
    reference_out = call(quantized)()
    result["fp_eager_ms"] = time_ms(call(fp), repeats)
    result["reference_eager_ms"] = time_ms(call(quantized), repeats)
    runner, report = lower(copy.deepcopy(quantized), backend)
    if report is not None:
        result["lowered_layers"] = len(report.lowered)
        result["reference_layers"] = len(report.kept)
        result["lowering"] = report.summary()
    result["sqnr_vs_reference_db"] = round(sqnr_db(reference_out, call(runner)()), 2)
    result["q_eager_ms"] = time_ms(call(runner), repeats)
    if compile:
        result["fp_compiled_ms"] = time_ms(call(compile_forward(copy.deepcopy(fp))), repeats)
        result["q_compiled_ms"] = time_ms(call(compile_forward(runner)), repeats)
    result["fp_ms"] = result["fp_eager_ms"]
    result["q_ms"] = result["q_compiled_ms"] if compile else result["q_eager_ms"]
    result["speedup"] = round(result["fp_ms"] / result["q_ms"], 3)
    if compile:
        result["speedup_vs_fp_compiled"] = round(result["fp_compiled_ms"] / result["q_ms"], 3)
    return _round_ms(result)


@torch.no_grad()
def bench_sampling(
    fp: nn.Module, quantized: nn.Module, backend: str = "cpu", batch: int = 64, steps: int = 20,
    repeats: int = 3, compile: bool = True,
) -> dict:  # fmt: skip
    """A whole DDIM sampling run of ``batch`` images: FP32 eager vs the quantized model on ``backend``.

    Returns ``fp_ms``, ``q_ms`` (compiled backend when ``compile``), ``speedup`` and the variants.
    """
    from diffquant.backends import lower
    from diffquant.sampling import sample

    device = backend_device(backend)
    fp, quantized = fp.to(device), quantized.to(device)

    def run(m):
        return lambda: sample(m, batch, steps=steps, seed=0, batch_size=batch, progress=False, device=device)

    runner, _ = lower(copy.deepcopy(quantized), backend)
    result = {"steps": steps, "batch": batch, "sampler": "ddim", "repeats": repeats}
    result["fp_eager_ms"] = time_ms(run(fp), repeats, warmup=1)
    result["q_eager_ms"] = time_ms(run(runner), repeats, warmup=1)
    if compile:
        result["q_compiled_ms"] = time_ms(run(compile_forward(runner)), repeats, warmup=1)
    result["fp_ms"] = result["fp_eager_ms"]
    result["q_ms"] = result["q_compiled_ms"] if compile else result["q_eager_ms"]
    result["speedup"] = round(result["fp_ms"] / result["q_ms"], 3)
    return _round_ms(result)
