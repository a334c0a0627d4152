"""Rank correlation with a p-value and a bootstrap interval: the statistic behind the study's question.

Functional style (as torchmetrics.functional): plain arrays in, numbers out, no state.
"""

from __future__ import annotations

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
