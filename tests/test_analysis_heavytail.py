"""Heavy-tail alpha: the power-law fit recovers known exponents; blocks below a quantile are the ones frozen."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.analysis.heavytail import eigenvalues, fit_power_law, lowest_alpha_blocks


def matrix_with_spectrum(evals: np.ndarray, seed: int) -> np.ndarray:
    """W = U diag(sqrt(lambda)) V^T with Haar-random orthogonal U, V, so the eigenvalues of W^T W are lambda."""
    rng = np.random.default_rng(seed)
    n = len(evals)
    u = np.linalg.qr(rng.standard_normal((n, n)))[0]
    v = np.linalg.qr(rng.standard_normal((n, n)))[0]
    return u @ np.diag(np.sqrt(evals)) @ v.T


def pareto(a: float, n: int, xmin: float, seed: int) -> np.ndarray:
    """n draws of a density ~ x^-a on [xmin, inf) (inverse CDF: xmin * U^(-1 / (a - 1)))."""
    return xmin * np.random.default_rng(seed).random(n) ** (-1.0 / (a - 1.0))


# The MLE's standard error is (alpha - 1) / sqrt(n) and it is asymptotically normal: 4 standard errors bound a
# miss with probability < 1e-4 (the data are seeded, so the test is deterministic either way).
Z = 4.0


@pytest.mark.parametrize("a", [2.0, 3.0, 4.5])
def test_alpha_recovers_the_exponent_of_a_matrix_built_with_a_power_law_spectrum(a):
    evals = pareto(a, 250, 1.0, seed=int(a * 10))
    w = matrix_with_spectrum(evals, seed=1)
    assert np.allclose(eigenvalues(w), np.sort(evals), rtol=1e-9)  # the SVD gives the spectrum back
    fit = fit_power_law(eigenvalues(w))
    assert fit.sigma == pytest.approx((fit.alpha - 1) / math.sqrt(fit.num_tail))
    assert abs(fit.alpha - a) <= Z * fit.sigma, fit
    # the whole sample is a power law: the fixed cut at the smallest eigenvalue is within the bound as well
    whole = fit_power_law(eigenvalues(w), xmin=evals.min() * (1 - 1e-9))
    assert whole.num_tail == 250 and abs(whole.alpha - a) <= Z * whole.sigma
    # ...and an exponent 1.5x as far from 1 is not: Z sigma = 4 (a - 1) / sqrt(250) = 0.25 (a - 1) is half
    # the gap, so the bound is tight enough to tell them apart
    assert abs(whole.alpha - (1 + 1.5 * (a - 1))) > Z * whole.sigma


def test_the_ks_search_puts_xmin_at_the_start_of_the_tail_above_a_bulk():
    bulk = np.random.default_rng(0).uniform(0.05, 0.5, 300)  # a Marchenko-Pastur-like bulk below the tail
    tail = pareto(2.5, 300, 1.0, seed=1)
    fit = fit_power_law(np.concatenate([bulk, tail]))
    assert 0.5 < fit.xmin <= np.sort(tail)[30]  # within the tail's smallest 10%
    assert abs(fit.alpha - 2.5) <= Z * fit.sigma
    fixed = fit_power_law(np.concatenate([bulk, tail]), tail_fraction=0.5)
    assert fixed.num_tail == 300 and fixed.xmin == pytest.approx(tail.min())


def test_bad_input_is_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="weight"):
        eigenvalues(np.ones(3))
    with pytest.raises(ValueError, match="evals"):
        fit_power_law(np.zeros(5))
    with pytest.raises(ValueError, match="quantile"):
        lowest_alpha_blocks([1.0], 1.5)


def test_the_blocks_below_the_quantile_are_the_ones_with_the_smallest_alpha():
    alphas = [3.0, 2.0, 5.0, 4.0, None]
    assert lowest_alpha_blocks(alphas, 0.0) == []
    assert lowest_alpha_blocks(alphas, 0.5) == [0, 1]  # floor(2.5) blocks
    assert lowest_alpha_blocks(alphas, 0.6) == [0, 1, 3]
    assert lowest_alpha_blocks(alphas, 1.0) == [0, 1, 2, 3, 4]  # None (no spectrum) ranks last
