"""Sensitivity-based mixed precision: the allocator respects the budget; auto recipes round-trip."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffquant import get_recipe, load_quantized, quantize, save_quantized
from diffquant.methods.mixed import LayerChoice, allocate
from diffquant.nn import QuantModule
from tests.conftest import tiny_model

layers = st.lists(
    st.tuples(st.integers(1, 10_000), st.floats(0, 1, allow_nan=False), st.floats(0, 1, allow_nan=False)),
    min_size=1,
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(layers, st.floats(4.0, 8.0))
def test_allocator_respects_the_budget(spec, budget):
    choices = [LayerChoice(f"l{i}", p, lo, hi) for i, (p, lo, hi) in enumerate(spec)]
    allocate(choices, 4.0, 8.0, budget)
    total = sum(c.params for c in choices)
    bits = sum(c.params * (8 if c.upgraded else 4) for c in choices) / total
    assert bits <= budget + 1e-9
    assert all(c.error_low > c.error_high for c in choices if c.upgraded)


def test_allocator_upgrades_the_most_sensitive_per_bit_first():
    choices = [LayerChoice("a", 100, 0.5, 0.1), LayerChoice("b", 100, 0.9, 0.1), LayerChoice("c", 1000, 0.95, 0.1)]
    allocate(choices, 4.0, 8.0, 4.0 + 4.0 * 100 / 1200)  # room for exactly one small layer
    assert [c.name for c in choices if c.upgraded] == ["b"]


def test_auto_recipe_resolves_overrides_and_round_trips(tmp_path):
    recipe = get_recipe("auto").replace(calibration={"n_samples": 4, "steps": 6, "every": 2, "batch_size": 4})
    q = quantize(tiny_model("dit"), recipe, progress=False)
    resolved = q.diffquant_recipe
    assert resolved.weight_bits_budget is None and resolved.overrides
    mods = [m for m in q.modules() if isinstance(m, QuantModule) and m.weight_qtype is not None]
    params = {m: int(m.weight_shape.prod()) for m in mods}
    avg = sum(params[m] * m.weight_qtype.bits for m in mods) / sum(params.values())
    assert 4.0 < avg <= 4.5
    x, t, y = torch.randn(2, 1, 28, 28), torch.full((2,), 400), torch.tensor([1, 2])
    out = q(x, t, y)
    save_quantized(q, tmp_path / "q")
    assert torch.equal(load_quantized(tmp_path / "q", model=tiny_model("dit"))(x, t, y), out)


def test_sensitivity_probes_hold_one_prepared_copy_at_a_time(monkeypatch):
    """Each format's probe copy is freed before the next is made: peak memory is the model plus one copy."""
    import copy
    import gc
    import weakref
    from types import SimpleNamespace

    from diffquant.methods import mixed

    real, copies, alive = copy.deepcopy, [], []

    def deepcopy(obj, memo=None):
        gc.collect()
        alive.append(sum(ref() is not None for ref in copies))
        out = real(obj, memo)
        copies.append(weakref.ref(out))
        return out

    model = tiny_model("dit")
    recipe = get_recipe("auto").replace(calibration={"n_samples": 4, "steps": 6, "every": 2, "batch_size": 4})
    monkeypatch.setattr(mixed, "copy", SimpleNamespace(deepcopy=deepcopy))  # mixed's copies only
    quantize(model, recipe, progress=False)
    assert alive == [0, 0]
