"""Rank correlation with a p-value and a bootstrap interval: the statistic behind the study's question.

Functional style (as torchmetrics.functional): plain arrays in, numbers out, no state.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.stats import rankdata
from scipy.stats import t as student_t


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of a with the same row of b ([B, n] -> [B]); NaN for a constant row."""
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=-1) / denom
    return np.clip(r, -1.0, 1.0)  # rounding can step just past +-1


def _finite_pairs(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D and of one length; got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def spearman(x, y) -> tuple[float, float]:
    """Spearman's rank correlation and its two-sided p-value, (rho, p), over the pairs where both
    x and y are finite (NaN pairs are dropped, not ranked).

        rho = Pearson(rank(x), rank(y))       ranks 1..n, ties get their average rank
        t   = rho * sqrt((n - 2) / (1 - rho^2))
        p   = 2 * P(T_{n-2} > |t|)            Student's t with n - 2 degrees of freedom

    The p-value is the t-approximation, as scipy.stats.spearmanr computes it (no permutation).
    rho and p are NaN when n < 3 or x or y is constant (rho is undefined there).
    """
    x, y = _finite_pairs(x, y)
    n = len(x)
    if n < 3:
        return math.nan, math.nan
    rho = float(_pearson_rows(rankdata(x), rankdata(y)))
    if math.isnan(rho):
        return rho, math.nan
    if abs(rho) == 1.0:
        return rho, 0.0
    t = rho * math.sqrt((n - 2) / (1.0 - rho * rho))
    return rho, float(2.0 * student_t.sf(abs(t), n - 2))


def spearman_ci(x, y, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """spearman(x, y) with a percentile bootstrap interval over the pairs (images).

    Resample the n finite pairs with replacement n_boot times (numpy PCG64 from `seed`: the same seed
    gives the same interval), compute rho* = spearman(x*, y*) on each resample, and take
    [low, high] = the (1-level)/2 and (1+level)/2 quantiles of the rho*. A resample that is constant
    in x or y shows no association and counts as rho* = 0: where a measure moves in only a handful
    of images, many resamples miss them all, and dropping those resamples instead would leave only
    the ones that contain the few images and give a narrow interval that excludes 0 for a rho near 0.
    `distinct` is True when the interval excludes 0.

    Returns {n, rho, p, low, high, distinct, boot_defined} (boot_defined: resamples that were not
    constant, i.e. had a rho* of their own).
    """
    x, y = _finite_pairs(x, y)
    n = len(x)
    rho, p = spearman(x, y)
    out = {"n": n, "rho": rho, "p": p, "low": math.nan, "high": math.nan, "distinct": False, "boot_defined": 0}
    if math.isnan(rho) or n_boot < 1:
        return out
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    # ranks within each resample: a repeated image ties with its copies, as spearman() would rank it
    boot = _pearson_rows(rankdata(x[idx], axis=1), rankdata(y[idx], axis=1))
    defined = np.isfinite(boot)
    low, high = np.quantile(np.where(defined, boot, 0.0), [(1 - level) / 2, (1 + level) / 2])
    out |= {"low": float(low), "high": float(high), "distinct": bool(low > 0 or high < 0),
            "boot_defined": int(defined.sum())}
    return out


# --- verdicts: permutation p-values, BH q-values over the family, and the changed-image count ------
#
# The percentile bootstrap above misjudges a measure that moves in only a few images (under the null
# its interval excludes 0 in 13.5% of datasets with 5 changed images of 400, 8.5% with 7): its
# intervals describe, they do not decide. A verdict comes from spearman_permutation's p, adjusted
# over the whole family by bh_qvalues, and read by verdict_rule together with changed_count.

_TIE_EPS = 1e-12  # see spearman_permutation: distinct rho* values lie >= 3/n^3 apart, float error ~1e-16
_PERM_CHUNK = 2048  # permutations per matrix product: [chunk, n] float64 stays a few MiB at n ~ 400


def _centered_ranks(v: np.ndarray) -> np.ndarray:
    """2 * rank(v) - (n + 1): ranks with ties averaged, centred, doubled so that every entry is an integer.

    Sums of products of these are integers, exact in float64 while n^3 < 2^53, so permuted statistics
    that tie with the observed one come out equal, not a rounding error apart."""
    return 2.0 * rankdata(v) - (len(v) + 1)


def spearman_permutation(x, y, n_perm: int = 9999, seed: int = 0, alternative: str = "two-sided") -> dict:
    """Permutation p-value of Spearman's rho over the pairs where both x and y are finite.

    Ranks (ties averaged) are computed once; a permutation pi pairs rank(x) with rank(y)[pi], and

        rho*(pi) = Pearson(rank(x), rank(y)[pi])          (rho = rho*(identity), the value spearman() gives)

        two-sided:  count = #{pi : |rho*| >= |rho| - eps}
        greater:    count = #{pi :  rho*  >=  rho  - eps}
        less:       count = #{pi :  rho*  <=  rho  + eps}

    Exact (n! <= n_perm): every one of the n! permutations, identity included, p = count / n!.
    Monte Carlo otherwise: n_perm uniform random permutations (numpy PCG64 from `seed`; the same seed
    gives the same p), p = (1 + count) / (1 + n_perm); the 1 is the observed pairing, which keeps p a
    valid p-value (P(p <= a) <= a under the null) and never 0.

    eps = 1e-12 makes a permuted statistic that ties the observed one count as extreme: ranks are
    multiples of 1/2, so distinct values of rho* lie at least 3 / n^3 apart (5e-8 at n = 400), far
    above both eps and float rounding, for n up to ~10^4.

    Two-sided counts |rho*| >= |rho|, the fraction of pairings at least as strong in either direction.
    scipy.stats.permutation_test instead doubles the smaller one-sided p; the two agree when the null
    distribution of rho* is symmetric (always when x or y has no ties) and can differ when both have ties.

    Precision: the smallest p the test can give is p_resolution = 1 / (1 + n_perm) (1 / n! exact), and
    the Monte Carlo standard error of p is sqrt(p (1 - p) / n_perm): n_perm = 9999 gives p = 0.05
    to +-0.002 and p_resolution = 1e-4, small enough that BH over 84 correlations can reach q = 0.0084.

    Returns {n, rho, p, n_perm, exact, p_resolution}; n_perm is the number of permutations the p is
    over (n! when exact). rho and p are NaN when n < 3 or x or y is constant (as spearman()).
    """
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less'; got {alternative!r}")
    if n_perm < 1:
        raise ValueError(f"n_perm must be >= 1; got {n_perm}")
    x, y = _finite_pairs(x, y)
    n = len(x)
    out = {"n": n, "rho": math.nan, "p": math.nan, "n_perm": int(n_perm), "exact": False,
           "p_resolution": 1.0 / (1 + n_perm)}
    if n < 3:
        return out
    a, b = _centered_ranks(x), _centered_ranks(y)
    denom = math.sqrt(float(a @ a) * float(b @ b))
    if denom == 0.0:  # x or y constant: rho undefined, nothing to test
        return out
    rho = float(_pearson_rows(rankdata(x), rankdata(y)))  # bit-for-bit spearman()'s rho, for the report
    observed = float(a @ b) / denom  # same value; the one the permuted statistics are compared with

    def extreme(stat: np.ndarray) -> int:
        if alternative == "greater":
            return int(np.count_nonzero(stat >= observed - _TIE_EPS))
        if alternative == "less":
            return int(np.count_nonzero(stat <= observed + _TIE_EPS))
        return int(np.count_nonzero(np.abs(stat) >= abs(observed) - _TIE_EPS))

    count = 0
    n_fact = math.factorial(n) if n <= 20 else None  # 21! > any n_perm worth asking for
    if n_fact is not None and n_fact <= n_perm:
        perms = itertools.permutations(range(n))
        for start in range(0, n_fact, _PERM_CHUNK):
            idx = np.array(list(itertools.islice(perms, _PERM_CHUNK)), dtype=np.intp)
            count += extreme((b[idx] @ a) / denom)
        return out | {"rho": rho, "p": count / n_fact, "n_perm": n_fact, "exact": True,
                      "p_resolution": 1.0 / n_fact}

    rng = np.random.default_rng(seed)
    for start in range(0, n_perm, _PERM_CHUNK):
        rows = min(_PERM_CHUNK, n_perm - start)
        shuffled = rng.permuted(np.broadcast_to(b, (rows, n)), axis=1)  # each row its own permutation
        count += extreme((shuffled @ a) / denom)
    return out | {"rho": rho, "p": (1 + count) / (1 + n_perm)}


def bh_qvalues(p) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) of a family of p-values, same shape as p.

    With the m finite p-values sorted, p_(1) <= ... <= p_(m),

        q_(i) = min_{j >= i} min(1, m * p_(j) / j)

    Rejecting every hypothesis with q <= alpha controls the false discovery rate at alpha (independent
    or positively dependent tests). NaN entries (correlations that are undefined) stay NaN and are not
    counted in m: a test that was never run cannot be a discovery, false or true.
    """
    p = np.asarray(p, dtype=np.float64)
    flat = p.ravel()
    keep = np.flatnonzero(~np.isnan(flat))
    vals = flat[keep]
    if np.any((vals < 0) | (vals > 1)):
        raise ValueError("p-values must lie in [0, 1] (or be NaN)")
    q = np.full(flat.shape, math.nan)
    m = len(vals)
    if m:
        order = np.argsort(vals, kind="stable")
        scaled = vals[order] * m / np.arange(1, m + 1)
        q[keep[order]] = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    return q.reshape(p.shape)


def changed_count(y) -> int:
    """m = #{i : y_i finite and y_i != 0}: the images where an instability measure moved at all.

    A rank correlation with such a y rests on these m images alone (the rest tie at 0), so m, not the
    number of images, is what says how much evidence a correlation has. Pass the y of the pairs the
    correlation used (NaN where x is NaN) to count only those."""
    y = np.asarray(y, dtype=np.float64)
    return int(np.count_nonzero(np.isfinite(y) & (y != 0)))


def verdict_rule(q: float, m: int, alpha: float = 0.05, min_changed: int = 15) -> str:
    """The verdict on one correlation from its BH q-value and its changed-image count m, in this order:

        m < min_changed   -> "too few changed images"   (whatever the test says)
        q is NaN          -> "undefined"
        q <= alpha        -> "distinguishable"
        otherwise         -> "not distinguishable"
    """
    if m < min_changed:
        return "too few changed images"
    if math.isnan(q):
        return "undefined"
    return "distinguishable" if q <= alpha else "not distinguishable"
