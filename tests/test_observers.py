"""Observers: exact streaming histograms, the three range rules, per-step statistics."""

import pytest
import torch

from diffquant import primitives as P
from diffquant.eval.metrics import sqnr
from diffquant.observers import (
    MinMaxObserver,
    MseObserver,
    PercentileObserver,
    StepAmaxObserver,
    StepHistogram,
    make_observer,
)
from diffquant.qtypes import fp8_e4m3, int4, int8


def test_histogram_growth_keeps_counts_and_extremes():
    h = StepHistogram(64)
    h.update(torch.tensor([0.1, -0.2, 0.3]))
    h.update(torch.tensor([5.0]))  # radius 0.5 -> 8: bins merge by 16
    h.update(torch.tensor([-100.0]))
    assert h.counts.sum() == 5 and h.n == 5
    assert h.min == -100.0 and h.max == 5.0 and h.radius == 128.0


def test_histogram_merge_is_exact_for_power_of_two_ranges():
    torch.manual_seed(0)
    a, b = torch.randn(1000) * 0.3, torch.randn(1000) * 7
    ha, hb, hab = StepHistogram(256), StepHistogram(256), StepHistogram(256)
    ha.update(a)
    hb.update(b)
    hab.update(torch.cat([a, b]))
    merged = ha.merged_with(hb)
    assert merged.radius == hab.radius
    assert torch.allclose(merged.counts, hab.counts)


def test_minmax_is_exact():
    obs = MinMaxObserver()
    obs.update(torch.tensor([-1.5, 2.0]), timestep=10)
    obs.update(torch.tensor([3.25]), timestep=20)
    assert obs.range(int8, symmetric=False) == (-1.5, 3.25)
    assert obs.range(int8, symmetric=False, timesteps=[10]) == (-1.5, 2.0)
    assert obs.timesteps == [10, 20]


def test_percentile_clips_rare_outliers():
    x = torch.cat([torch.randn(100_000), torch.tensor([1000.0])])
    obs = PercentileObserver(99.9)
    obs.update(x, 0)
    lo, hi = obs.range(int8, symmetric=True)
    assert 3.0 < hi < 4.0 and lo == -hi  # |N(0,1)| at 99.9 % is 3.29


def test_mse_search_beats_minmax_on_heavy_tails_at_4_bits():
    torch.manual_seed(1)
    x = torch.distributions.StudentT(3.0).sample((50_000,))
    errors = {}
    for obs in (MinMaxObserver(), MseObserver(p=2.0)):
        obs.update(x, 0)
        lo, hi = obs.range(int4, symmetric=True)
        scale, zp = P.scale_from_range(torch.tensor(lo), torch.tensor(hi), int4, True)
        errors[obs.name] = sqnr(x, P.fake_quant(x, int4, scale, zp))
    assert errors["mse"] > errors["minmax"] + 3


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_search_is_near_the_brute_force_optimum(symmetric):
    torch.manual_seed(2)
    x = torch.relu(torch.randn(20_000)) * 2 - 0.3 if not symmetric else torch.randn(20_000)
    obs = MseObserver(p=2.0)
    obs.update(x, 0)
    lo, hi = obs.range(int4, symmetric)

    def err(lo, hi):
        scale, zp = P.scale_from_range(torch.tensor(lo), torch.tensor(hi), int4, symmetric)
        return (P.fake_quant(x, int4, scale, zp, symmetric) - x).pow(2).mean().item()

    grid = torch.linspace(0.05, 1.0, 40).tolist()
    if symmetric:
        amax = x.abs().max().item()
        best = min(err(-f * amax, f * amax) for f in grid)
    else:
        best = min(err(fl * x.min().item(), fh * x.max().item()) for fl in grid for fh in grid)
    assert err(lo, hi) <= best * 1.1


def test_mse_for_fp8_keeps_most_of_the_range():
    obs = MseObserver()
    obs.update(torch.randn(10_000), 0)
    _, hi = obs.range(fp8_e4m3, symmetric=True)
    assert hi > 2.5  # FP8's relative error makes clipping costly: no aggressive clip


def held_tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from ``obj`` (attributes, dicts, lists, tuples), each storage once."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(held_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple | set):
        return sum(held_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return held_tensor_bytes(vars(obj), seen)
    return 0


@pytest.mark.parametrize("cls", [MinMaxObserver, PercentileObserver, MseObserver, StepAmaxObserver])
def test_observer_memory_does_not_grow_with_samples(cls):
    obs = cls()
    obs.update(torch.randn(64, 256), 5)
    one = held_tensor_bytes(obs)
    for _ in range(50):
        obs.update(torch.randn(64, 256), 5)
    assert len(obs.per_step) == 1 and held_tensor_bytes(obs) == one  # a histogram, not the batches
    assert one <= 2048 * 8 + 1024  # 2048 float64 bins (and a few scalars)


def test_non_finite_values_are_reported_with_the_step():
    obs = MinMaxObserver()
    with pytest.raises(FloatingPointError, match="time step 7"):
        obs.update(torch.tensor([1.0, float("nan")]), 7)


def test_make_observer_and_errors():
    assert isinstance(make_observer("percentile", percentile=99.0), PercentileObserver)
    with pytest.raises(ValueError, match="Unknown observer"):
        make_observer("kl")
    with pytest.raises(ValueError, match="no data"):
        MinMaxObserver().range(int8, True)


def test_step_percentile_reduces_over_the_first_steps():
    from diffquant.observers import StepAmaxObserver

    # per-step amax 1, 2, ..., 10 in denoising order (t = 900 is the first step)
    amax = {900 - 100 * i: float(i + 1) for i in range(10)}
    for reduction, share, expected in (("mean", 1.0, 5.5), ("mean", 0.5, 3.0), ("min", 0.5, 1.0), ("min", 0.01, 1.0)):
        obs = StepAmaxObserver(step_percentile=share, reduction=reduction)
        for t, a in amax.items():
            obs.update(torch.tensor([-a / 2, a]), t)
        lo, hi = obs.range(int8, symmetric=True)
        assert (lo, hi) == pytest.approx((-expected, expected)), (reduction, share)
    obs = StepAmaxObserver(step_percentile=0.3, reduction="mean")
    for t, a in amax.items():
        obs.update(torch.tensor([-a / 2, a]), t)
    assert obs.range(int8, symmetric=False) == pytest.approx((-1.0, 2.0))  # mean of steps 1-3
