"""Scaling-law fits recover known exponents from synthetic grids; bootstrap CIs cover the truth."""
import numpy as np
import pytest

from mambadm.study.fits import FitError, fit_joint, fit_power_law


def test_power_law_exact_recovery():
    x = np.array([1e4, 3e4, 1e5, 3e5])
    fit = fit_power_law(x, 3.0 * x**0.42, n_boot=50)
    assert fit.exponent == pytest.approx(0.42, abs=1e-9)
    assert fit.coef == pytest.approx(3.0, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.gain(2.0) == pytest.approx(2**0.42 - 1)


def test_power_law_ci_covers_truth_under_noise():
    """Over 30 independent noisy grids, the 95% CI holds the true exponent in most of them and is not vacuous."""
    true_k, x = -0.3, np.repeat([1e4, 2e4, 4e4, 8e4, 1.6e5], 5)
    covered, widths = 0, []
    for rep in range(30):
        rng = np.random.default_rng(rep)
        y = 50.0 * x**true_k * np.exp(rng.normal(0.0, 0.05, x.size))
        fit = fit_power_law(x, y, n_boot=300, seed=rep)
        lo, hi = fit.exponent_ci
        covered += lo <= true_k <= hi
        widths.append(hi - lo)
        assert abs(fit.exponent - true_k) < 0.08
    assert covered >= 24  # nominal 95%; the within-x bootstrap is slightly narrow with 5 points per x
    assert 0.005 < np.median(widths) < 0.2


def test_power_law_residual_bootstrap_with_single_points():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e3, 1e6, 8)
    fit = fit_power_law(x, 2 * x**0.5 * np.exp(rng.normal(0, 0.03, x.size)), n_boot=500)
    assert fit.exponent_ci[0] <= 0.5 <= fit.exponent_ci[1]
    assert fit.exponent_ci[1] - fit.exponent_ci[0] > 0


def test_power_law_drops_non_positive_and_rejects_too_few():
    fit = fit_power_law([1, 2, 4, 8], [-1.0, 2.0, 4.0, 8.0], n_boot=20)
    assert fit.n_dropped == 1 and fit.exponent == pytest.approx(1.0)
    with pytest.raises(FitError, match="distinct x"):
        fit_power_law([1, 1, 2], [1.0, 1.0, -2.0])


def test_joint_fit_recovers_exponents():
    n, d = np.meshgrid(np.geomspace(1e5, 1e7, 4), np.geomspace(1e4, 1e6, 4))
    n, d = n.ravel(), d.ravel()
    loss = 1.2 + 40.0 / n**0.35 + 25.0 / d**0.28
    fit = fit_joint(n, d, loss, n_boot=20)
    assert fit.alpha == pytest.approx(0.35, abs=0.03)
    assert fit.beta == pytest.approx(0.28, abs=0.03)
    assert fit.E == pytest.approx(1.2, rel=0.05)
    assert np.allclose(fit.predict(n, d), loss, rtol=1e-3)


def test_joint_fit_noisy_ci_covers_truth():
    rng = np.random.default_rng(3)
    n, d = np.meshgrid(np.geomspace(1e5, 1e7, 4), np.geomspace(1e4, 1e6, 4))
    n, d = np.repeat(n.ravel(), 2), np.repeat(d.ravel(), 2)
    loss = (1.2 + 40.0 / n**0.35 + 25.0 / d**0.28) * np.exp(rng.normal(0, 0.005, n.size))
    fit = fit_joint(n, d, loss, n_boot=60)
    assert fit.ci["alpha"][0] <= 0.35 <= fit.ci["alpha"][1]
    assert fit.ci["beta"][0] <= 0.28 <= fit.ci["beta"][1]


def test_joint_fit_needs_three_by_three():
    with pytest.raises(FitError, match=">= 3 model sizes"):
        fit_joint([1e5, 1e6, 1e5, 1e6], [1e4, 1e4, 1e5, 1e5], [2.0, 1.8, 1.7, 1.5])


def test_two_point_fit_is_exact_without_r2_or_interval():
    fit = fit_power_law([1e4, 2e4], [10.0, 9.86], n_boot=100)
    assert fit.dof == 0 and fit.exact and fit.ci_method == "exact"
    assert fit.r2 is None and fit.exponent_ci is None and fit.coef_ci is None
    assert fit.gain(2.0) == pytest.approx(9.86 / 10 - 1)
    seeds = fit_power_law([1e4, 1e4, 2e4, 2e4], [10.0, 10.4, 9.7, 10.1], n_boot=100)
    assert seeds.dof == 2 and seeds.ci_method == "seeds" and seeds.exponent_ci[0] < seeds.exponent_ci[1]
