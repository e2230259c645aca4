import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from diffquant.eval.fd import GaussianStats, feature_stats, frechet_distance


def _random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_fd_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16))
    s = feature_stats(feats)
    assert frechet_distance(s, s) == pytest.approx(0.0, abs=1e-8)


def test_fd_diagonal_gaussians_closed_form():
    # for diagonal covariances FD = |m1 - m2|^2 + sum_i (sigma1_i - sigma2_i)^2
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 3.0]), np.array([2.0, 0.5, 3.0])
    a = GaussianStats(m1, np.diag(s1**2), 10)
    b = GaussianStats(m2, np.diag(s2**2), 10)
    expected = ((m1 - m2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 12))
def test_fd_matches_sqrtm_formula_and_is_symmetric(seed, d):
    rng = np.random.default_rng(seed)
    a = GaussianStats(rng.standard_normal(d), _random_spd(rng, d), 10)
    b = GaussianStats(rng.standard_normal(d), _random_spd(rng, d), 10)
    covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma).real
    ref = ((a.mu - b.mu) ** 2).sum() + np.trace(a.sigma + b.sigma - 2 * covmean)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6, abs=1e-8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6, abs=1e-8)


def test_fd_from_samples_approaches_closed_form():
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, (200_000, 2))
    y = rng.normal([3.0, 0.0], [2.0, 1.0], (200_000, 2))
    # closed form: 3^2 + (1 - 2)^2 = 10
    assert frechet_distance(feature_stats(x), feature_stats(y)) == pytest.approx(10.0, rel=0.02)


def test_fd_rejects_mismatched_dims():
    a = GaussianStats(np.zeros(2), np.eye(2), 2)
    b = GaussianStats(np.zeros(3), np.eye(3), 2)
    with pytest.raises(ValueError, match="dimension"):
        frechet_distance(a, b)


def test_feature_stats_needs_two_samples():
    with pytest.raises(ValueError):
        feature_stats(np.zeros((1, 4)))


def test_stats_tensor_roundtrip():
    s = feature_stats(np.random.default_rng(2).standard_normal((10, 3)))
    back = GaussianStats.from_tensors(s.to_tensors())
    np.testing.assert_array_equal(back.mu, s.mu)
    np.testing.assert_array_equal(back.sigma, s.sigma)
    assert back.n == 10


def test_paired_gap_interval_is_zero_for_identical_sets_and_excludes_zero_for_a_real_shift():
    from diffquant.eval import paired_fd_gap_interval

    rng = np.random.default_rng(0)
    ref = feature_stats(rng.normal(size=(4000, 8)))
    base = rng.normal(0.3, 1.2, size=(400, 8))  # FD to the reference about 1, like a model's samples
    assert paired_fd_gap_interval(base, base.copy(), ref, n_boot=50) == (0.0, 0.0)
    lo, hi = paired_fd_gap_interval(base, base + 0.5, ref, n_boot=100)  # a mean shift: FD grows by about 8 * 0.25 + ...
    point = frechet_distance(feature_stats(base + 0.5), ref) / frechet_distance(feature_stats(base), ref) - 1
    assert 0 < lo <= point <= hi
    # a small paired perturbation gives a narrow interval around a small gap
    lo, hi = paired_fd_gap_interval(base, base + rng.normal(scale=0.01, size=base.shape), ref, n_boot=100)
    assert -0.05 < lo <= hi < 0.05
    with pytest.raises(ValueError, match="same shape"):
        paired_fd_gap_interval(base, base[:10], ref)
