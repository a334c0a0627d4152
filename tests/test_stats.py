"""The verdict machinery: the permutation p of Spearman's rho against scipy and a hand loop, BH q-values
against scipy, the verdict rule, and the reason for all of it, a null simulation where only a few images
change: the permutation test keeps its 5% level there, the percentile bootstrap's "excludes 0" does not.
The adjustment: the within-strata rho, its stratified permutation test and the drop-one check against
brute force, and a null simulation where a covariate drives both measures: the plain test rejects far
too often, the stratified one keeps its level."""

import functools
import itertools
import math

import numpy as np
import pytest
from scipy.stats import binomtest, false_discovery_control, permutation_test, rankdata, spearmanr

from conngeo.report.stats import (bh_cutoff, bh_qvalues, changed_count, spearman, spearman_ci, spearman_permutation,
                                  strata_ids, stratified_rho, verdict_rule, weakest_drop)


def _rho(x, y, axis=-1):
    """Spearman's rho along an axis, vectorised for scipy.stats.permutation_test."""
    rx = rankdata(x, axis=axis)
    ry = rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    return (rx * ry).sum(axis=axis) / np.sqrt((rx * rx).sum(axis=axis) * (ry * ry).sum(axis=axis))


def _abs_rho(x, y, axis=-1):
    return np.abs(_rho(x, y, axis))


def _scipy_p(x, y, alternative, n_resamples=np.inf, seed=0):
    # scipy's two-sided p doubles the smaller tail; ours counts |rho*| >= |rho|. With ties on both sides
    # the null distribution can be asymmetric and the two differ, so there the reference is |rho| upper-tailed.
    if alternative == "abs":
        stat, alternative = _abs_rho, "greater"
    else:
        stat = _rho
    return permutation_test((x, y), stat, permutation_type="pairings", vectorized=True, alternative=alternative,
                            n_resamples=n_resamples, rng=np.random.default_rng(seed)).pvalue


# --- spearman_permutation --------------------------------------------------------------------------

# scipy's exact "pairings" null runs over n!^2 pairings (both samples permuted; same distribution, n!
# times over): n = 6 takes a few seconds, n = 7 minutes, so the exact comparisons stop at 6.
@pytest.mark.parametrize("n,alternative", [(5, "two-sided"), (5, "greater"), (5, "less"), (6, "two-sided")])
def test_exact_p_equals_scipy_exact(n, alternative):
    rng = np.random.default_rng(n)
    x = rng.normal(size=n)  # no ties in x: rho*'s null distribution is symmetric, scipy's two-sided is ours
    y = 0.8 * x + rng.normal(size=n)
    y[:2] = y[2]  # ties in y
    out = spearman_permutation(x, y, n_perm=9999, alternative=alternative)
    assert out["exact"] and out["n_perm"] == math.factorial(n)
    assert out["p_resolution"] == 1 / math.factorial(n)
    assert out["rho"] == spearman(x, y)[0]
    assert out["p"] == pytest.approx(_scipy_p(x, y, alternative), rel=1e-12, abs=1e-15)


def test_exact_p_with_ties_on_both_sides_equals_scipy_on_abs_rho():
    x = np.array([1.0, 1.0, 1.0, 2.0, 3.0, 4.0])
    y = np.array([0.0, 0.0, 0.0, 0.2, 0.0, 0.7])
    out = spearman_permutation(x, y, n_perm=10_000)
    assert out["exact"]
    assert out["p"] == pytest.approx(_scipy_p(x, y, "abs"), rel=1e-12)


def test_exact_p_equals_a_hand_loop_over_all_permutations():
    x = np.array([0.3, 1.2, 1.2, -0.4, 2.0, 0.9])
    y = np.array([0.0, 0.5, 0.0, 0.0, 0.5, 0.1])
    rho = spearmanr(x, y).statistic
    extreme = sum(abs(spearmanr(x, y[list(perm)]).statistic) >= abs(rho) - 1e-12
                  for perm in itertools.permutations(range(len(x))))
    out = spearman_permutation(x, y, n_perm=720)  # 6! = 720: exact exactly at the boundary
    assert out["exact"]
    assert out["rho"] == pytest.approx(rho)
    assert out["p"] == extreme / 720


def test_monte_carlo_p_with_many_ties_agrees_with_scipy():
    rng = np.random.default_rng(12)
    n = 80
    x = rng.integers(0, 4, size=n).astype(float)      # 4 values: heavy ties
    y = np.zeros(n)
    moved = rng.choice(n, 12, replace=False)          # an instability measure that moved in 12 images
    y[moved] = np.round(0.5 * x[moved] + rng.uniform(0, 1, size=12), 1)
    n_perm = 9999
    out = spearman_permutation(x, y, n_perm=n_perm, seed=1)
    assert not out["exact"] and out["n_perm"] == n_perm and out["p_resolution"] == 1 / (1 + n_perm)
    assert 0.005 < out["p"] < 0.5  # a p in the range where the comparison says something
    ref = _scipy_p(x, y, "abs", n_resamples=n_perm, seed=2)
    se = math.sqrt(2 * ref * (1 - ref) / n_perm)  # two independent Monte Carlo estimates of one p
    assert abs(out["p"] - ref) <= 4 * se


def test_monte_carlo_p_is_deterministic_for_a_seed_and_never_zero():
    rng = np.random.default_rng(3)
    x = rng.normal(size=200)
    y = x + 0.3 * rng.normal(size=200)
    a = spearman_permutation(x, y, n_perm=999, seed=5)
    assert a == spearman_permutation(x, y, n_perm=999, seed=5)
    assert a["p"] == 1 / 1000  # nothing beats a strong correlation: p is its floor, not 0
    z = rng.normal(size=200)
    assert spearman_permutation(x, z, n_perm=999, seed=5) != spearman_permutation(x, z, n_perm=999, seed=6)


def test_drops_nan_pairs_and_degenerate_cases():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=30), rng.normal(size=30)
    x[3], y[7] = np.nan, np.inf
    keep = np.isfinite(x) & np.isfinite(y)
    assert spearman_permutation(x, y, n_perm=499) == spearman_permutation(x[keep], y[keep], n_perm=499)
    assert spearman_permutation(x, y, n_perm=499)["n"] == 28
    for out in (spearman_permutation([1, 1, 1, 1], [1, 2, 3, 4]),    # constant: undefined
                spearman_permutation([1, 2], [2, 1])):                # too few pairs
        assert math.isnan(out["rho"]) and math.isnan(out["p"])
    with pytest.raises(ValueError):
        spearman_permutation([1, 2, 3], [1, 2, 3], alternative="two")


# --- bh_qvalues ------------------------------------------------------------------------------------

def test_bh_qvalues_by_hand():
    # sorted .01 .03 .04 .5 -> 4p/j = .04 .06 .0533 .5 -> running min from the top: .04 .0533 .0533 .5
    q = bh_qvalues([0.01, 0.04, 0.03, 0.5])
    assert q == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.5])
    assert bh_qvalues([0.9, 0.95]) == pytest.approx([0.95, 0.95])
    assert bh_qvalues([]).shape == (0,)
    assert np.isnan(bh_qvalues([np.nan, np.nan])).all()
    with pytest.raises(ValueError):
        bh_qvalues([0.2, 1.5])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bh_qvalues_equal_scipy_with_nans_and_ties(seed):
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.uniform(0, 0.01, 10), rng.uniform(size=74)])    # 84: the study's family
    p[rng.choice(84, 20, replace=False)] = rng.choice(p, 20)                # ties
    p[5:8] = 0.001                                                           # a run of ties
    p[rng.choice(84, 9, replace=False)] = np.nan                             # undefined correlations
    q = bh_qvalues(p)
    finite = ~np.isnan(p)
    assert np.array_equal(np.isnan(q), ~finite)
    assert q[finite] == pytest.approx(false_discovery_control(p[finite], method="bh"), rel=1e-12)
    assert q.reshape(7, 12) == pytest.approx(bh_qvalues(p.reshape(7, 12)), nan_ok=True)  # shape kept


# --- changed_count, bh_cutoff and verdict_rule ------------------------------------------------------

def test_changed_count():
    assert changed_count([0, 0, 0.2, -0.1, np.nan, np.inf, 0.0, 3]) == 3  # 0.2, -0.1, 3
    assert changed_count(np.zeros(400)) == 0
    assert changed_count([]) == 0


def test_bh_cutoff_is_the_largest_rejected_p():
    # sorted .01 .03 .04 .5, q = .04 .0533 .0533 .5: at .05 BH rejects .01 only, at .06 the first three
    assert bh_cutoff([0.01, 0.04, 0.03, 0.5], alpha=0.05) == 0.01
    assert bh_cutoff([0.01, 0.04, 0.03, 0.5], alpha=0.06) == 0.04
    assert bh_cutoff([0.5, 0.9, np.nan]) == -math.inf


@pytest.mark.parametrize("q,stable,expected", [
    (0.01, True, "distinguishable"),
    (0.05, True, "distinguishable"),          # the bound is inclusive
    (0.051, True, "not distinguishable"),
    (0.0001, False, "rests on one image"),
    (math.nan, True, "undefined"),
])
def test_verdict_rule(q, stable, expected):
    assert verdict_rule(q, stable) == expected
    assert verdict_rule(0.08, True, alpha=0.1) == "distinguishable"


# --- the adjustment ----------------------------------------------------------------------------------

def _brute_rho(x, y, strata):
    """Pooled within-stratum Spearman, written out with scipy's ranks."""
    a, b = np.zeros(len(x)), np.zeros(len(x))
    for s in np.unique(strata):
        m = strata == s
        a[m], b[m] = rankdata(x[m]) - (m.sum() + 1) / 2, rankdata(y[m]) - (m.sum() + 1) / 2
    denom = math.sqrt((a @ a) * (b @ b))
    return (a @ b) / denom if denom else math.nan


def test_strata_ids():
    assert strata_ids([[1, 2, 3, 1, 2, 3], ["a", "a", "b", "b", "a", None]]).tolist() == [0, 2, 4, 1, 2, 3]
    assert strata_ids([np.arange(20.0)], bins=4).tolist() == [i // 5 for i in range(20)]  # quantile bins
    assert strata_ids([[1.0, 2.0, np.nan, 2.0]]).tolist() == [1, 2, 0, 2]                  # missing: a level
    assert len(set(strata_ids([np.arange(9.0)], max_levels=8, bins=3).tolist())) == 3
    assert len(set(strata_ids([np.arange(8.0)], max_levels=8, bins=3).tolist())) == 8     # few values: kept


def test_stratified_rho_is_spearman_within_strata():
    rng = np.random.default_rng(0)
    x, y, s = rng.normal(size=60), np.round(rng.normal(size=60), 1), rng.integers(0, 4, size=60)
    y[rng.choice(60, 20, replace=False)] = 0
    assert stratified_rho(x, y, np.zeros(60)) == pytest.approx(spearmanr(x, y).statistic, rel=1e-12)
    assert stratified_rho(x, y, s) == pytest.approx(_brute_rho(x, y, s), rel=1e-12)
    assert math.isnan(stratified_rho(x, y, np.arange(60)))  # every stratum one image: nothing to compare


def test_stratified_exact_p_equals_a_hand_loop_over_within_strata_permutations():
    x = np.array([1.0, 2, 3, 4, 5, 6, 7, 8])
    y = np.array([0.0, 1, 0, 2, 3, 1, 5, 5])
    s = np.array([0, 0, 0, 1, 1, 1, 1, 2])  # stratum 2 has one image: it cannot move
    out = spearman_permutation(x, y, n_perm=10_000, strata=s)
    observed = _brute_rho(x, y, s)
    stats = []
    for p0 in itertools.permutations([0, 1, 2]):
        for p1 in itertools.permutations([3, 4, 5, 6]):
            idx = np.arange(8)
            idx[:3], idx[3:7] = p0, p1
            stats.append(_brute_rho(x, y[idx], s))
    assert out["exact"] and out["n_perm"] == 144 and out["rho"] == pytest.approx(observed)
    assert out["p"] == np.mean(np.abs(stats) >= abs(observed) - 1e-12)


def test_stratified_monte_carlo_p_agrees_with_a_hand_loop():
    rng = np.random.default_rng(7)
    n = 90
    s = rng.integers(0, 3, size=n)
    x = s + rng.normal(size=n)
    y = np.where(rng.uniform(size=n) < 0.6, 0.0, np.round(s + 0.3 * x + rng.normal(size=n), 1))
    out = spearman_permutation(x, y, n_perm=4999, seed=1, strata=s)
    observed, hand, count = _brute_rho(x, y, s), np.random.default_rng(99), 0
    for _ in range(4999):
        shuffled = y.copy()
        for k in range(3):
            shuffled[s == k] = hand.permutation(y[s == k])
        count += abs(_brute_rho(x, shuffled, s)) >= abs(observed) - 1e-12
    ref = (1 + count) / 5000
    assert 0.005 < out["p"] < 0.9
    assert abs(out["p"] - ref) <= 4 * math.sqrt(2 * ref * (1 - ref) / 4999)


@pytest.mark.parametrize("ties,strata", [(False, False), (True, False), (True, True)])
def test_weakest_drop_is_the_changed_image_whose_removal_weakens_rho_most(ties, strata):
    rng = np.random.default_rng(3)
    n = 40
    x = rng.normal(size=n)
    y = 0.5 * x + rng.normal(size=n)
    y[rng.choice(n, 15, replace=False)] = 0
    if ties:
        x, y = np.round(x), np.round(y)
    s = rng.integers(0, 3, size=n) if strata else np.zeros(n, dtype=int)
    rho = _brute_rho(x, y, s)
    drops = {i: np.sign(rho) * _brute_rho(np.delete(x, i), np.delete(y, i), np.delete(s, i))
             for i in np.flatnonzero(y != 0)}
    got = weakest_drop(x, y, s if strata else None)
    assert y[got] != 0
    assert drops[got] == pytest.approx(min(drops.values()), abs=1e-12)


def test_stratified_interval_is_reproducible_and_one_stratum_is_the_plain_bootstrap():
    rng = np.random.default_rng(5)
    x, y, s = rng.normal(size=80), rng.normal(size=80), rng.integers(0, 3, size=80)
    a = spearman_ci(x, y, n_boot=300, seed=2, strata=s)
    assert a == spearman_ci(x, y, n_boot=300, seed=2, strata=s)
    assert a["low"] <= a["rho"] <= a["high"] and a["rho"] == pytest.approx(stratified_rho(x, y, s))
    plain, one = spearman_ci(x, y, n_boot=300, seed=2), spearman_ci(x, y, n_boot=300, seed=2, strata=np.zeros(80))
    assert (one["low"], one["high"]) == pytest.approx((plain["low"], plain["high"]), rel=1e-12)


# --- the point: the null with only a few changed images -------------------------------------------

N_IMAGES = 400
R = 300             # datasets per case: binomial sd of a 5% rate is sqrt(.05 * .95 / 300) = 0.0126
N_PERM = 399        # (1 + 399) * 0.05 = 20: p <= 0.05 has probability exactly 0.05 under the null
ALPHA = 0.05
TOL = 3 * math.sqrt(ALPHA * (1 - ALPHA) / R)  # 3 binomial sd: a correct 5% test fails this 0.3% of the time


@functools.lru_cache(maxsize=None)
def _null_datasets(m: int, ties: bool) -> tuple:
    """R datasets of N_IMAGES images: x continuous, y zero except at m random images; x and y independent."""
    rng = np.random.default_rng(1000 * m + ties)
    out = []
    for _ in range(R):
        x = rng.normal(size=N_IMAGES)
        y = np.zeros(N_IMAGES)
        moved = rng.choice(N_IMAGES, m, replace=False)
        y[moved] = rng.integers(1, 4, size=m) if ties else rng.uniform(0, 1, size=m)
        out.append((x, y))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _permutation_rejects(m: int, ties: bool) -> np.ndarray:
    return np.array([spearman_permutation(x, y, n_perm=N_PERM, seed=i)["p"] <= ALPHA
                     for i, (x, y) in enumerate(_null_datasets(m, ties))])


@pytest.mark.parametrize("m,ties", [(5, False), (15, False), (100, False), (15, True)])
def test_permutation_test_keeps_its_level_under_the_null(m, ties):
    assert all(changed_count(y) == m for _, y in _null_datasets(m, ties))
    rate = _permutation_rejects(m, ties).mean()
    assert abs(rate - ALPHA) <= TOL, f"m={m} ties={ties}: {rate:.3f} of null datasets p <= {ALPHA}"


def test_bootstrap_interval_excludes_zero_too_often_with_five_changed_images():
    # the old rule on the same null datasets: "the 95% percentile bootstrap interval excludes 0"
    boot = np.array([spearman_ci(x, y, n_boot=300, seed=i)["distinct"]
                     for i, (x, y) in enumerate(_null_datasets(5, False))])
    perm = _permutation_rejects(5, False)
    assert boot.mean() > ALPHA + TOL  # above what a 5% rule could show by chance
    # paired on the datasets (McNemar): of the datasets where the two rules disagree, under "equally
    # often wrong" each disagreement is a fair coin; far more of them go the bootstrap's way than a coin gives
    only_boot, only_perm = int((boot & ~perm).sum()), int((perm & ~boot).sum())
    assert binomtest(only_boot, only_boot + only_perm, 0.5, alternative="greater").pvalue < 1e-3


# --- the point of the adjustment: a covariate that drives both measures -----------------------------

@functools.lru_cache(maxsize=None)
def _confounded_rejects() -> tuple[np.ndarray, np.ndarray]:
    """R datasets where the number of foods on the plate (1-6) drives a geometry change and an instability,
    and neither acts on the other: rejections at ALPHA of the plain and of the stratified permutation test."""
    rng = np.random.default_rng(2024)
    plain, adjusted = [], []
    for i in range(R):
        count = rng.integers(1, 7, size=N_IMAGES)
        x = 0.8 * count + rng.normal(size=N_IMAGES)                    # geometry change grows with the count
        y = np.where(rng.uniform(size=N_IMAGES) < 0.5, 0.0,           # half the captions never move
                     np.round(np.maximum(0, 0.8 * count + rng.normal(size=N_IMAGES)), 1))
        plain.append(spearman_permutation(x, y, n_perm=N_PERM, seed=i)["p"] <= ALPHA)
        adjusted.append(spearman_permutation(x, y, n_perm=N_PERM, seed=i, strata=strata_ids([count]))["p"] <= ALPHA)
    return np.array(plain), np.array(adjusted)


def test_under_a_confounded_null_the_plain_test_rejects_and_the_stratified_one_keeps_its_level():
    plain, adjusted = _confounded_rejects()
    assert plain.mean() > 0.9  # the plain test finds the covariate's association nearly every time
    assert abs(adjusted.mean() - ALPHA) <= TOL, f"{adjusted.mean():.3f} of confounded null datasets p <= {ALPHA}"
