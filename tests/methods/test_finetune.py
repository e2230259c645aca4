"""Quantization-aware fine-tuning: QALoRA merge, distillation on the recorded trajectory, resume, NaN."""

import copy
import dataclasses

import pytest
import torch

import diffquant
from diffquant import get_recipe, quantize
from diffquant.methods.finetune import FinetuneError, finetune, step_weights
from diffquant.modes import quant_modules
from diffquant.nn import QuantLinear
from diffquant.nn import lora as L
from diffquant.recipe import FinetuneConfig
from tests.test_trajectory import PlainDenoiser, my_sampler

FAST = FinetuneConfig(iterations=40, samples=32, batch=16, rank=4, lr=1e-2, scale_lr=3e-3, warmup=5)
# 2-bit weights per channel, round to nearest: PTQ is far from FP here (on this toy W4A4 is within 0.7 %
# of FP already, and fine-tuning has little to gain)
INT2 = get_recipe("w4a4").replace(name="w2a4-rtn", weights="int2", weight_group_size=None, weight_method="rtn")


@pytest.fixture(scope="module")
def recorded():
    fp = PlainDenoiser().eval()
    with diffquant.recording(fp) as trajectory:
        my_sampler(fp, n=32)
    return fp, trajectory


def test_merged_lora_equals_the_unmerged_forward_before_requantization():
    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.nn.Linear(24, 12), "int4", 8, None)
    (adapter,) = L.attach(torch.nn.Sequential(layer), rank=4)
    with torch.no_grad():
        adapter.up.normal_(0, 0.05)  # a trained-looking update (B = 0 at the start)
    x = torch.randn(5, 24)
    unmerged = layer(x)
    assert not torch.allclose(unmerged, torch.nn.functional.linear(x, layer.quantized_weight().detach() * 0))
    assert L.merge(torch.nn.Sequential(layer)) == 1 and layer.lora is None
    torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=1e-6)
    layer.freeze()  # re-quantized: the same integers the fake-quant used
    torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=1e-5)


def test_finetuning_lowers_the_held_out_distillation_loss(recorded):
    fp, trajectory = recorded
    q = quantize(copy.deepcopy(fp), INT2, trajectory, progress=False)
    before = [m.integer_weight().clone() for m in quant_modules(q) if m.weight_qtype is not None]
    config = FinetuneConfig(**{**FAST.__dict__, "iterations": 100})
    report = finetune(q, trajectory, config, progress=False)
    assert report["iterations"] == 100 and report["trained"]["lora_layers"] == len(before)
    assert report["trained"]["act_scales"] > 0 and report["trained"]["weight_scales"] == 0
    assert report["held_after"] < 0.5 * report["held_before"], report  # measured: 0.00474 -> 0.00075 (n = 64)
    diffquant.freeze(q)
    after = [m.integer_weight() for m in quant_modules(q) if m.weight_qtype is not None]
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))  # the integers moved
    assert all(m.lora is None and m.frozen for m in quant_modules(q) if m.weight_qtype is not None)
    assert not any(p.requires_grad for p in q.parameters())


def test_full_weight_finetuning_trains_the_float_weights_of_ternary_layers(recorded, tmp_path):
    """``train=("weights",)``: no adapters, the float weights move (re-quantized when frozen), and a
    checkpoint carries them: a run stopped and resumed equals an uninterrupted one."""
    fp, trajectory = recorded
    ternary = INT2.replace(name="w2a4-ternary", weights="ternary")
    config = dataclasses.replace(FAST, train=("weights",), weight_lr=3e-3, iterations=60)
    q = quantize(copy.deepcopy(fp), ternary, trajectory, progress=False)
    before = [m.integer_weight().clone() for m in quant_modules(q) if m.weight_qtype is not None]
    whole = copy.deepcopy(q)
    report = finetune(whole, trajectory, config, progress=False)
    with_weights = [m for m in quant_modules(q) if getattr(m, "weight", None) is not None or m.frozen]
    assert report["trained"]["weights"] == len(with_weights) >= len(before) and report["trained"]["lora_layers"] == 0
    assert report["held_after"] < 0.8 * report["held_before"], report
    stopped = dataclasses.replace(config, max_minutes=1e-9)  # stopped after its first step, the same schedule
    assert finetune(copy.deepcopy(q), trajectory, stopped, checkpoint=tmp_path, progress=False)["stopped"]
    resumed = copy.deepcopy(q)
    assert finetune(resumed, trajectory, config, checkpoint=tmp_path, progress=False)["resumed_at"] > 0
    for a, b in zip(resumed.state_dict().values(), whole.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    diffquant.freeze(whole)
    after = [m.integer_weight() for m in quant_modules(whole) if m.weight_qtype is not None]
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))  # the ternary codes moved


def test_full_weight_finetuning_of_float_weights_trains_the_activations_alone(recorded):
    """``weights="none"`` with low-bit activations and ``train=("weights",)``: the float weights train
    (QAT of the activations alone, the floor of any setting at those activations) and stay float."""
    fp, trajectory = recorded
    float_weights = INT2.replace(name="wfa2", weights="none", activations="int2")
    q = quantize(copy.deepcopy(fp), float_weights, trajectory, progress=False)
    assert all(m.weight_qtype is None for m in quant_modules(q))
    before = [m.weight.detach().clone() for m in quant_modules(q)]
    config = dataclasses.replace(FAST, train=("weights",), weight_lr=3e-3, iterations=40)
    report = finetune(q, trajectory, config, progress=False)
    assert report["trained"]["weights"] == len(before) > 0 and report["held_after"] < report["held_before"], report
    after = [m.weight for m in quant_modules(q)]
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert not any(p.requires_grad for p in q.parameters())


def test_a_recipe_with_finetuning_quantizes_saves_and_loads(recorded, tmp_path):
    fp, trajectory = recorded
    recipe = INT2.replace(act_mode="tdq", calibration={"selection": "all"}, finetune=FAST)
    q = quantize(copy.deepcopy(fp), recipe, trajectory, progress=False)
    report = q.diffquant_report["finetune"]
    assert report["trained"]["tdq_generators"] > 0 and report["held_after"] < report["held_before"], report
    diffquant.save_quantized(q, tmp_path / "q")
    loaded = diffquant.load_quantized(tmp_path / "q", PlainDenoiser)
    x, t, y = torch.randn(3, 1, 8, 8), torch.full((3,), 500), torch.tensor([1, 2, 3])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), q(x, t, y))
    assert loaded.diffquant_recipe.finetune == FAST
    # a loaded TDQ model has its tables and no generators (they are not saved): fine-tuning it trains the tables
    again = finetune(loaded, trajectory, FAST, progress=False)
    assert again["trained"]["tdq_generators"] == 0 and again["trained"]["act_scales"] > 0, again
    assert again["held_after"] < again["held_before"], again


def test_public_finetune_thaws_a_quantized_model_and_freezes_it_again(recorded):
    fp, trajectory = recorded
    q = quantize(copy.deepcopy(fp), INT2, trajectory, progress=False)
    with torch.no_grad():
        base = sum(float((q(c.args[0], *c.args[1:]) - c.output).pow(2).mean()) for c in trajectory)
    out = diffquant.finetune(q, trajectory, {"iterations": 40, "samples": 32, "batch": 16, "rank": 4, "lr": 3e-3})
    assert out is q and all(m.frozen for m in quant_modules(q) if m.weight_qtype is not None)
    with torch.no_grad():
        tuned = sum(float((q(c.args[0], *c.args[1:]) - c.output).pow(2).mean()) for c in trajectory)
    assert tuned < base and "finetune" in q.diffquant_report and q.diffquant_recipe.finetune.iterations == 40
    with pytest.raises(TypeError, match="recording"):
        diffquant.finetune(q, my_sampler)


def test_resuming_from_a_checkpoint_equals_an_uninterrupted_run(recorded, tmp_path):
    fp, trajectory = recorded
    q0 = quantize(copy.deepcopy(fp), INT2, trajectory, progress=False)
    straight = copy.deepcopy(q0)
    assert finetune(straight, trajectory, FAST, progress=False)["best_step"] == FAST.iterations  # it trained
    # stopped by its time budget (after its first step: any step would do), the same schedule
    stopped = FinetuneConfig(**{**FAST.__dict__, "max_minutes": 1e-9})
    first = finetune(copy.deepcopy(q0), trajectory, stopped, checkpoint=tmp_path, progress=False)
    assert first["stopped"] and 0 < first["iterations"] < FAST.iterations
    resumed = copy.deepcopy(q0)
    report = finetune(resumed, trajectory, FAST, checkpoint=tmp_path, progress=False)
    assert report["iterations"] == FAST.iterations and report["resumed_at"] == first["iterations"]
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_non_finite_loss_is_caught_and_named(recorded):
    fp, trajectory = recorded
    q = quantize(copy.deepcopy(fp), "w8a8", trajectory, progress=False)
    broken = copy.deepcopy(trajectory)
    for call in broken:
        call.output[0] = float("nan")
    with pytest.raises(FinetuneError, match=r"the loss is nan at time step \d+ \(iteration 1\)"):
        finetune(q, broken, FAST, progress=False)


def test_the_last_good_state_is_a_snapshot_not_a_view(recorded):
    from diffquant.methods.finetune import Trainables

    fp, trajectory = recorded
    q = quantize(
        copy.deepcopy(fp), INT2.replace(act_mode="tdq", calibration={"selection": "all"}), trajectory, progress=False
    )
    trainables = Trainables(q, FAST)
    good = trainables.state()
    with torch.no_grad():
        for a in trainables.adapters:
            a.up.add_(1.0)
        for quantizer in trainables.tdq:
            for p in quantizer.generator.parameters():
                p.add_(1.0)
    assert all(float(s["up"].abs().max()) == 0 for s in good["lora"])  # still the zero-initialised B
    trainables.load(good)
    assert all(float(a.up.detach().abs().max()) == 0 for a in trainables.adapters)


def test_two_processes_train_the_one_process_weights(tmp_path):
    """torchrun --nproc-per-node 2 (gloo): each rank takes its share of every batch and the gradients
    are averaged by rows, so the ranks end with the one-process model (to float summation order)."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(__file__).parent / "ddp_finetune.py")
    subprocess.run([sys.executable, script, str(tmp_path / "one.pt")], check=True, timeout=300)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    proc = subprocess.run(
        [*torchrun, "--master-port", str(port), script, str(tmp_path / "two.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in ("one", "two"))
    assert (one["world"], two["world"]) == (1, 2)
    for key, a in one["state"].items():
        b = two["state"][key]
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=key)
        else:  # integer codes: a code may sit on a rounding boundary, never more than one step away
            assert (a.long() - b.long()).abs().max() <= 1 and (a != b).float().mean() < 1e-3, key
    for key in ("held_before", "held_after", "train_loss"):
        assert two["report"][key] == pytest.approx(one["report"][key], rel=1e-4), key
    assert one["report"]["held_after"] < one["report"]["held_before"]


def test_the_best_held_out_state_is_the_one_kept(recorded):
    fp, trajectory = recorded
    q = quantize(copy.deepcopy(fp), INT2, trajectory, progress=False)
    config = FinetuneConfig(**{**FAST.__dict__, "iterations": 60, "eval_every": 10, "lr": 1.0})  # too high: it wanders
    report = finetune(q, trajectory, config, progress=False)
    steps, held = zip(*report["held_curve"], strict=True)
    assert steps == (0, 10, 20, 30, 40, 50, 60)
    best = min(range(len(held)), key=held.__getitem__)
    assert report["best_step"] == steps[best] and report["held_after"] == pytest.approx(held[best], rel=1e-6)
    assert best < len(held) - 1 and held[best] < held[-1]  # not the last: keeping the last would fail


def test_sigma_weight_weighs_the_noisy_steps_and_needs_the_schedule(recorded):
    fp, trajectory = recorded
    q = quantize(copy.deepcopy(fp), INT2, trajectory, progress=False)
    config = FinetuneConfig(**{**FAST.__dict__, "iterations": 100, "sigma_weight": 0.1})
    with pytest.raises(ValueError, match="alphas_cumprod"):  # a user's loop records no schedule
        finetune(copy.deepcopy(q), trajectory, config, progress=False)
    scheduled = trajectory.select()  # a view; the schedule set on it as the error says
    scheduled.alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    entries = [(i, [0], 1, int(c.step.timestep)) for i, c in enumerate(scheduled)]  # (call, rows, channels, t)
    w = step_weights(scheduled, entries, 0.1)
    abar = scheduled.alphas_cumprod.double()[[e[3] for e in entries]]
    expected = 1 + 0.1 * ((1 - abar) / abar).sqrt()
    torch.testing.assert_close(w, expected / expected.mean())  # t = 999 (sigma 157) weighs most, t = 0 least
    assert float(w[0]) > 10 * float(w[-1]) and torch.equal(step_weights(scheduled, entries, 0.0), torch.ones(10))
    report = finetune(q, scheduled, config, progress=False)
    assert report["held_after"] < 0.5 * report["held_before"], report  # the sigma-weighted held-out score


@pytest.fixture(scope="module")
def ddim_recorded():
    """A tiny built-in UNet's own DDIM trajectory, every step (the built-in recorder sets the schedule)."""
    from diffquant import CalibrationConfig
    from diffquant.trajectory import record_builtin
    from tests.conftest import tiny_model

    fp = tiny_model("unet")
    config = CalibrationConfig(selection="all", n_samples=8, steps=6, batch_size=8, sampler="ddim")
    return fp, record_builtin(fp, config, progress=False), config


def test_a_one_step_rollout_is_the_eps_loss(ddim_recorded):
    """One DDIM step from the FP ``x`` moves ``x`` by ``(sqrt(1 - a') - sqrt(a') sqrt(1 - a) / sqrt(a))
    (eps - eps_fp)``; the rollout loss divides by that gain, so ``k = 1`` is the noise-prediction loss;
    past the last call the ``x0`` distance over ``(1 - a) / a`` is too."""
    import math

    from diffquant.methods.finetune import Rollout

    fp, trajectory, config = ddim_recorded
    q = quantize(copy.deepcopy(fp), INT2, trajectory, progress=False)
    rollout = Rollout(trajectory, "x", 1)
    mid = next(i for i, j in rollout.next.items() if j is not None and trajectory[i].step.index == 2)
    last = next(i for i, j in rollout.next.items() if j is None)
    call = trajectory[mid]
    a = float(trajectory.alphas_cumprod[int(call.step.timestep)])
    a2 = float(trajectory.alphas_cumprod[int(call.step.timestep) - 1000 // config.steps])
    gain = math.sqrt(1 - a2) - math.sqrt(a2) * math.sqrt(1 - a) / math.sqrt(a)
    assert rollout.gain(call, trajectory[rollout.next[mid]]) == pytest.approx(abs(gain), rel=1e-9)
    for i in (mid, last):
        call, rows = trajectory[i], list(range(trajectory[i].batch))
        with torch.no_grad():
            eps_loss = float(torch.nn.functional.mse_loss(call.replay(q), call.output))
            got = float(rollout.loss(q, (i, rows, 1, int(call.step.timestep)), rows))
        assert got == pytest.approx(eps_loss, rel=2e-3), (i, got, eps_loss)


def my_ddim_sampler(model, abar: torch.Tensor, n: int = 32, steps: int = 10):
    """A user's own deterministic DDIM loop (eta 0, t = 999, 899, ..., 99; the last step to x0)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 10
    for t in range(999, 0, -1000 // steps):
        eps = model(x, torch.full((n,), t), y)
        a, a2 = float(abar[t]), float(abar[t - 1000 // steps]) if t >= 1000 // steps else 1.0
        x = a2**0.5 * (x - (1 - a) ** 0.5 * eps) / a**0.5 + (1 - a2) ** 0.5 * eps
    return x


def test_rollout_finetuning_lowers_its_loss_and_refuses_what_it_cannot_roll(ddim_recorded, recorded):
    from diffquant.trajectory import record_builtin

    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    fp = PlainDenoiser().eval()
    with diffquant.recording(fp) as trajectory:
        my_ddim_sampler(fp, abar)
    rolled = dataclasses.replace(FAST, rollout=3, iterations=60)
    q = quantize(copy.deepcopy(fp), INT2, trajectory, progress=False)
    with pytest.raises(ValueError, match="alphas_cumprod"):  # the loop's schedule is not recorded by itself
        finetune(copy.deepcopy(q), trajectory, rolled, progress=False)
    short = dataclasses.replace(rolled, rollout_fallback=True, iterations=2)  # the named recipes': warn, k = 1
    with pytest.warns(UserWarning, match="rollout=1 instead of 3: .*alphas_cumprod"):
        report = finetune(copy.deepcopy(q), trajectory, short, progress=False)
    assert report["rollout"] == 1 and "alphas_cumprod" in report["rollout_fallback"]
    trajectory.alphas_cumprod = abar
    report = finetune(q, trajectory, rolled, progress=False)
    assert report["rollout"] == 3 and "rollout_fallback" not in report
    # measured 155.9 -> 65.1 at 1 and 2 threads (a random toy: its untrained eps makes x large); the
    # random tiny UNet's 6-step recording learned too little with rollout to test this on (3 % at one
    # thread, nothing at two)
    assert report["held_after"] < 0.6 * report["held_before"], report
    fp_unet, unet_trajectory, config = ddim_recorded
    ddpm = record_builtin(fp_unet, dataclasses.replace(config, sampler="ddpm"), progress=False)  # stochastic steps
    q_unet = quantize(copy.deepcopy(fp_unet), INT2, unet_trajectory, progress=False)
    with pytest.raises(ValueError, match="deterministic DDIM"):
        finetune(q_unet, ddpm, rolled, progress=False)
    plain_fp, plain = recorded  # a user's Euler-like loop with a schedule set: not DDIM
    plain = plain.select()
    plain.alphas_cumprod = abar
    with pytest.raises(ValueError, match="deterministic DDIM"):
        finetune(quantize(copy.deepcopy(plain_fp), INT2, plain, progress=False), plain, rolled, progress=False)
    with pytest.raises(ValueError, match="rollout must be >= 1"):
        FinetuneConfig(rollout=0)


def test_learned_smoothing_trains_saves_loads_and_lowers(recorded, tmp_path):
    """``train`` with ``smooth``: a factor per input channel of every activation-quantized layer
    (``x / s``, ``W * s``) starts at 1 (the forward unchanged), lowers the held-out loss, is kept in the
    layer's ``smooth`` buffer, saved and loaded bit-exact, and the CPU backend runs it."""
    from diffquant.backends import lower

    fp, trajectory = recorded
    recipe = INT2.replace(act_mode="dynamic", act_granularity="group", act_group_size=4)
    q = quantize(copy.deepcopy(fp), recipe, trajectory, progress=False)
    x, t, y = torch.randn(3, 1, 8, 8), torch.full((3,), 500), torch.tensor([1, 2, 3])
    config = dataclasses.replace(FAST, train=("smooth",), scale_lr=3e-2, iterations=60)
    report = finetune(q, trajectory, config, progress=False)
    layers = [m for m in quant_modules(q) if m.input_quantizer is not None]
    assert report["trained"]["smooth_layers"] == len(layers) > 0 and report["trained"]["lora_layers"] == 0
    assert report["held_after"] < 0.9 * report["held_before"], report
    assert all(m.smooth_offset is None for m in layers)
    assert any(not torch.allclose(m.smooth, torch.ones_like(m.smooth)) for m in layers)  # baked in
    diffquant.freeze(q)
    diffquant.save_quantized(q, tmp_path / "q")
    loaded = diffquant.load_quantized(tmp_path / "q", PlainDenoiser)
    with torch.no_grad():
        ref = q(x, t, y)
        assert torch.equal(loaded(x, t, y), ref)
        for m in quant_modules(loaded):  # what fine-tuning it again starts from (convolutions smoothed too)
            m.thaw()
        torch.testing.assert_close(loaded(x, t, y), ref, rtol=0, atol=1e-5)
        lowered, _ = lower(copy.deepcopy(q), "cpu")
        out = lowered(x, t, y)
    assert 10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean()) > 30  # measured 33.0 dB


def test_smoothing_starts_as_the_identity(recorded):
    from diffquant.methods.finetune import Trainables

    fp, trajectory = recorded
    q = quantize(copy.deepcopy(fp), INT2, trajectory, progress=False)
    x, t, y = torch.randn(3, 1, 8, 8), torch.full((3,), 500), torch.tensor([1, 2, 3])
    with torch.no_grad():
        before = q(x, t, y)
        Trainables(q, dataclasses.replace(FAST, train=("smooth",)))
        assert torch.equal(q(x, t, y), before)
