"""Per-step output correction: fitting the gain table, applying it, switching it off, saving it."""

from dataclasses import replace

import pytest
import torch

from diffquant import CalibrationConfig, get_recipe, load_quantized, quantize, save_quantized
from diffquant.methods.output_correction import ATTR, fit_calibration, fit_output_correction, install, interp
from diffquant.modes import full_precision
from diffquant.nn.quantizer import ActQuantizer
from diffquant.sampling import sample
from diffquant.timestep import denoising_step
from diffquant.trajectory import record_builtin, recording, selected_rows
from tests.conftest import GaussianDenoiser, tiny_model

CAL = CalibrationConfig(n_samples=4, steps=6, every=2, batch_size=4)


def fp_trajectory(model, config):
    """The FP trajectory the fit replays (recorded with the model's quantization off)."""
    with full_precision(model):
        return record_builtin(model, config, [fit_calibration(config)], progress=False)


class ShrinkingDenoiser(GaussianDenoiser):
    """Exact Gaussian denoiser whose 'quantized' path under-predicts the noise by a time-dependent factor."""

    def __init__(self):
        super().__init__()
        self.switch = ActQuantizer("int8")  # only its ``enabled`` flag is used: full_precision turns it off

    def forward(self, x, t, class_labels=None):
        eps = super().forward(x, t, class_labels)
        if self.switch.enabled:
            eps = eps * (0.9 - 0.1 * t.float().view(-1, 1, 1, 1) / 1000)
        return eps


def test_gain_table_undoes_a_systematic_under_prediction_at_every_step():
    model = ShrinkingDenoiser()
    install(model, 1000)
    ks = fit_output_correction(model, fp_trajectory(model, CAL), CAL)
    assert len(ks) == CAL.steps  # every step of the calibration sampler is observed
    for t, k in ks.items():
        assert k == pytest.approx(-0.1 - 0.1 * t / 1000, abs=1e-6)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([500, 500])
    with denoising_step(0, 500, 1):  # between two fitted steps: interpolated gain
        corrected = model(x, t)
    with full_precision(model):
        reference = model(x, t)
    torch.testing.assert_close(corrected, reference, rtol=2e-3, atol=1e-5)
    with full_precision(model), denoising_step(0, 500, 1):  # the FP path is never corrected
        torch.testing.assert_close(model(x, t), reference)


def test_correction_lowers_the_sampling_error_of_a_shrunken_model():
    model = ShrinkingDenoiser()
    with full_precision(model):
        fp, _ = sample(model, n=8, steps=10, progress=False)
    before, _ = sample(model, n=8, steps=10, progress=False)
    install(model, 1000)
    fit_output_correction(model, fp_trajectory(model, replace(CAL, steps=10)), CAL)
    after, _ = sample(model, n=8, steps=10, progress=False)
    assert (after - fp).pow(2).mean() < 0.01 * (before - fp).pow(2).mean()


def test_interp_matches_numpy():
    np = pytest.importorskip("numpy")
    xp, fp = torch.tensor([10.0, 200.0, 900.0], dtype=torch.float64), torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)
    x = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(interp(x, xp, fp), torch.from_numpy(np.interp(x.numpy(), xp.numpy(), fp.numpy())))


def test_uniform_selection_can_count_from_the_last_step():
    ts = list(range(950, -1, -50))[:10]
    first = selected_rows(replace(CAL, steps=10, every=4), ts, 2, 1000)
    last = selected_rows(replace(CAL, steps=10, every=4, uniform_from="last"), ts, 2, 1000)
    assert [k for k, r in enumerate(first) if r] == [0, 4, 8]
    assert [k for k, r in enumerate(last) if r] == [1, 5, 9]
    with pytest.raises(ValueError, match="uniform_from"):
        replace(CAL, uniform_from="middle")


def test_recipe_with_output_correction_on_gptq_weights_saves_and_loads_exactly(tmp_path):
    recipe = get_recipe("w4a16").replace(name="t", output_correction=True, calibration=CAL)
    model = quantize(tiny_model("unet"), recipe, progress=False)
    gain = getattr(model, ATTR).gain
    assert torch.isfinite(gain).all() and not torch.equal(gain, torch.ones_like(gain))  # fitted against FP weights
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q", tiny_model("unet"))
    torch.testing.assert_close(getattr(loaded, ATTR).gain, gain, rtol=0, atol=0)
    a, _ = sample(model, n=2, steps=4, progress=False)
    b, _ = sample(loaded, n=2, steps=4, progress=False)
    assert torch.equal(a, b)


class DictDenoiser(GaussianDenoiser):
    def forward(self, x, t, class_labels=None):
        return {"eps": super().forward(x, t, class_labels)}


def test_fit_on_an_output_it_cannot_read_says_what_to_do():
    model = DictDenoiser()
    install(model, 1000)

    with full_precision(model), recording(model) as traj:  # one step of a sampler that reads the dict
        model(torch.randn(2, 1, 28, 28), torch.full((2,), 500), torch.zeros(2, dtype=torch.long))
    assert len(traj) == 1
    with pytest.raises(ValueError, match="output_correction=False"):
        fit_output_correction(model, traj, CAL)


class LearnedVariance(torch.nn.Module):
    """A denoiser named like diffusers' UNets that also predicts a variance: 2 x the input's channels."""

    def forward(self, sample, timestep, class_labels=None):
        return torch.cat([sample, 3 * sample], 1)


@pytest.mark.parametrize("by_keyword", [False, True])
def test_gain_scales_only_the_noise_half_of_a_learned_variance_output(by_keyword):
    model = LearnedVariance()
    install(model, 1000).gain.fill_(0.5)
    x = torch.randn(2, 3, 4, 4)
    with denoising_step(0, 500, 1):
        out = model(sample=x, timestep=500) if by_keyword else model(x, 500)
    torch.testing.assert_close(out, torch.cat([0.5 * x, 3 * x], 1))
