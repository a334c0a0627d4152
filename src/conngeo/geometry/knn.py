"""Exact k-nearest neighbours, computed in row blocks with one BLAS matmul per block.

For a block of query rows A and all N points B, squared L2 distances are

    |a - b|^2 = |a|^2 + |b|^2 - 2 a.b

so the O(N^2 D) work is the matrix product A @ B.T, which BLAS runs near peak. Only a
[block, N] distance matrix ever exists; the block height comes from `max_block_bytes`.
Cosine distance is 1 - a.b on unit-normalised rows, the same matmul.

Conventions (every function here follows them):
- the point itself is never its own neighbour, but an exact duplicate of it is (distance 0);
- neighbours come sorted nearest first, so N(i, k') for k' < k is the first k' columns;
- ties: on equal computed distance the smaller index comes first, also at the k-th place, so
  the neighbour set is deterministic. "Equal" means equal in the computed floating-point
  distance. Integer- or coarse-grid-valued data (one-hot attributes, counts) are computed
  exactly under L2 (while sums of squares stay below 2^24 in float32), so their true ties are
  ties. For continuous float32 data, two neighbours whose exact squared distances differ by less
  than about 1e-6 of the points' squared norms (after knn's shift towards the origin) may come
  in either order (pass float64 for ~1e-15);
- float64 input is computed in float64, anything else in float32; results are torch tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

DEFAULT_BLOCK_BYTES = 256 * 2**20


def as_vectors(x, name: str = "input") -> torch.Tensor:
    """`x` (torch tensor or numpy array, [N, D]) as a float32/float64 torch tensor, checked.

    Raises ValueError naming `name` (e.g. the file the vectors came from) on a wrong shape, an
    empty input, or NaN/inf values.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch tensor or numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a [N, D] matrix of vectors, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: empty input (shape {tuple(x.shape)}); there are no vectors to compare")
    x = x.detach()  # metrics are measurements: never build an autograd graph through them
    if x.dtype != torch.float64:
        x = x.to(torch.float32)
    bad = ~torch.isfinite(x).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten()
        raise ValueError(
            f"{name}: {len(rows)} of {x.shape[0]} vectors contain NaN or inf (rows {rows[:10].tolist()}"
            f"{' ...' if len(rows) > 10 else ''}). Re-extract these vectors, or drop these images "
            "upstream and list them as skipped: no distance or spectrum is defined with them."
        )
    return x


def clip_k(ks: Iterable[int], n: int) -> list[int]:
    """The neighbourhood sizes `ks` clipped to n - 1 (the most neighbours n points allow),
    deduplicated, in ascending order. E.g. clip_k([10, 100, 1000], 200) == [10, 100, 199]."""
    if n < 2:
        raise ValueError(f"need at least 2 points for a neighbourhood, got {n}")
    ks = list(ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"neighbourhood sizes must be >= 1, got {ks}")
    return sorted({min(int(k), n - 1) for k in ks})


def block_rows(n: int, itemsize: int, max_block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Rows per block so that a [rows, n] distance matrix fits in `max_block_bytes` (at least 1)."""
    return max(1, min(n, max_block_bytes // (n * itemsize)))


def knn(
    x,
    k: int,
    *,
    metric: str = "l2",
    name: str = "input",
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
    return_distances: bool = False,
):
    """Indices of the k nearest neighbours of every row of `x`, the row itself excluded.

    x: [N, D] torch tensor or numpy array. metric: "l2" (Euclidean) or "cosine" (1 - cos).
    Returns a LongTensor [N, k], nearest first, ties to the smaller index (see module docstring);
    with return_distances=True, (distances [N, k], indices [N, k]) like torch.topk, where distances
    are Euclidean for "l2" and 1 - cos for "cosine".

    Memory: a copy of x plus one [rows, N] distance block, rows = max_block_bytes // (N * itemsize).
    Raises ValueError for k outside 1..N-1 (use clip_k first), NaN/inf, empty input, or (cosine) a
    zero vector; messages name `name`.
    """
    x = as_vectors(x, name)
    n = x.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"{name}: k={k} but {n} points have at most {n - 1} neighbours each; clip k with clip_k(ks, n)")

    if metric == "l2":
        # Translation does not change L2 distances, and moving the data near the origin makes |a|^2
        # and |b|^2 small, which cuts the cancellation error of |a|^2 + |b|^2 - 2a.b when the data sit
        # far from it. Shift by the coordinate-wise median of a row sample rather than the mean: the
        # median is an actual data value in every coordinate, so integer- or grid-valued data (one-hot
        # attributes) stay exact, and exact ties stay exact ties.
        x = x - x[:: max(1, n // 1024)].median(dim=0).values
        sq = (x * x).sum(dim=1)
    elif metric == "cosine":
        norms = x.norm(dim=1, keepdim=True)
        if (norms == 0).any():
            rows = (norms.flatten() == 0).nonzero().flatten()
            raise ValueError(f"{name}: cosine distance is undefined for zero vectors (rows {rows[:10].tolist()}); drop them or use metric='l2'")
        x = x / norms
    else:
        raise ValueError(f"unknown metric {metric!r}; use 'l2' or 'cosine'")

    rows = block_rows(n, x.element_size(), max_block_bytes)
    block = torch.empty(rows, n, dtype=x.dtype, device=x.device)  # reused: a fresh one would page-fault in again
    dist = torch.empty(n, k, dtype=x.dtype, device=x.device)
    idx = torch.empty(n, k, dtype=torch.long, device=x.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        d = block[: stop - start]
        # The only O(N^2 D) step, one BLAS call per block. For L2: |b|^2 - 2a.b, since the query's
        # own |a|^2 does not change its ranking. For cosine: -cos, smallest first (1 is added back).
        if metric == "l2":
            torch.addmm(sq, x[start:stop], x.T, alpha=-2, out=d)
        else:
            torch.mm(-x[start:stop], x.T, out=d)
        diag = torch.arange(start, stop, device=x.device)
        d[diag - start, diag] = float("inf")  # not its own neighbour
        dist[start:stop], idx[start:stop] = _smallest(d, k)

    if not return_distances:
        return idx
    if metric == "l2":
        dist = (dist + sq[:, None]).clamp_min_(0).sqrt_()
    else:
        dist = dist + 1
    return dist, idx


def _smallest(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of d, the k smallest values and their column indices, sorted by (value, index)."""
    # torch.topk returns values in order but promises no order among equal values, and when several
    # columns tie at the k-th place it may keep any of them. Take one extra value to see such ties.
    vals, idx = d.topk(k + 1, dim=1, largest=False)  # k + 1 <= N since k <= N - 1
    tied = (vals[:, 1:] == vals[:, :-1]).any(dim=1).nonzero().flatten()  # rare outside discrete data
    at_k = vals[:, k - 1] == vals[:, k]
    vals, idx = vals[:, :k], idx[:, :k]
    if len(tied) == 0:
        return vals, idx
    for r in tied[at_k[tied]].tolist():  # one row at a time keeps the extra memory at one row
        # Everything strictly below the k-th value, then the smallest indices equal to it.
        row, t = d[r], vals[r, k - 1]
        below = (row < t).nonzero().flatten()
        equal = (row == t).nonzero().flatten()[: k - len(below)]
        idx[r] = torch.cat([below, equal])
        vals[r] = row[idx[r]]
    # Sort the tied rows by index, then stably by value: equal values keep ascending index order.
    v, i = vals[tied], idx[tied]
    order = i.argsort(dim=1)
    v, i = v.gather(1, order), i.gather(1, order)
    order = v.argsort(dim=1, stable=True)
    vals[tied], idx[tied] = v.gather(1, order), i.gather(1, order)
    return vals, idx
