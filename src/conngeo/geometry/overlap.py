"""How much two spaces P and Q over the same N images agree.

Neighbourhood metrics take neighbour index matrices [N, K] as knn() returns them (nearest first,
the image itself excluded) and use their first k columns, so one knn() call at the largest k serves
every smaller k. Rows are images in the same order in P and Q. Whole-space metrics (linear CKA,
Procrustes) take the vectors themselves [N, d_P] and [N, d_Q].

All results are float64 tensors; *_per_image functions return one value per image [N], the plain
functions their mean (a 0-dim tensor).
"""

from __future__ import annotations

import torch

from conngeo.geometry.knn import DEFAULT_BLOCK_BYTES, as_vectors


def knor_per_image(nbrs_p, nbrs_q, k: int | None = None) -> torch.Tensor:
    """Per-image kNN overlap ratio |N_P(i,k) ∩ N_Q(i,k)| / k. k=None uses all K columns."""
    p, q, k = _neighbours(nbrs_p, nbrs_q, k)
    return _shared(p, q).sum(dim=1).double() / k


def knor(nbrs_p, nbrs_q, k: int | None = None) -> torch.Tensor:
    """KNOR@k = mean_i |N_P(i,k) ∩ N_Q(i,k)| / k, in [0, 1]; report knor_chance(k, N) beside it.

    This is also the "mutual kNN" alignment of Huh et al. 2024 (the platonic representation
    hypothesis): their score is mean_i |N_P(i,k) ∩ N_Q(i,k)| / k on each space's own kNN, i.e.
    exactly KNOR with metric="cosine" neighbours. The stricter variant is mutual_knn() below.
    """
    return knor_per_image(nbrs_p, nbrs_q, k).mean()


def knor_chance(k: int, n: int) -> float:
    """Expected KNOR@k of two unrelated neighbourhoods over n points: k / (n - 1)."""
    return k / (n - 1)


def jaccard_per_image(nbrs_p, nbrs_q, k: int | None = None) -> torch.Tensor:
    """Per-image kNN Jaccard |N_P ∩ N_Q| / |N_P ∪ N_Q| = s / (2k - s), s the shared count."""
    p, q, k = _neighbours(nbrs_p, nbrs_q, k)
    s = _shared(p, q).sum(dim=1).double()
    return s / (2 * k - s)


def knn_jaccard(nbrs_p, nbrs_q, k: int | None = None) -> torch.Tensor:
    """kNN Jaccard@k = mean_i |N_P(i,k) ∩ N_Q(i,k)| / |N_P(i,k) ∪ N_Q(i,k)|, in [0, 1].
    For unrelated neighbourhoods it is about k / (2(N-1) - k) (KNOR's chance k/(N-1) put into s/(2k-s))."""
    return jaccard_per_image(nbrs_p, nbrs_q, k).mean()


def mutual_knn_per_image(nbrs_p, nbrs_q, k: int | None = None) -> torch.Tensor:
    """Per-image |M_P(i,k) ∩ M_Q(i,k)| / k, where M_X(i,k) = {j in N_X(i,k) : i in N_X(j,k)}."""
    p, q, k = _neighbours(nbrs_p, nbrs_q, k)
    n = p.shape[0]
    mp, mq = _mutual(p), _mutual(q)
    i = torch.arange(n, device=p.device)[:, None]
    # Edge i->j as the integer i*n + j: membership of edges is then one torch.isin, O(Nk log Nk).
    shared = mp & torch.isin(i * n + p, (i * n + q)[mq])
    return shared.sum(dim=1).double() / k


def mutual_knn(nbrs_p, nbrs_q, k: int | None = None) -> torch.Tensor:
    """Mutual-kNN overlap@k = mean_i |M_P(i,k) ∩ M_Q(i,k)| / k, with
    M_X(i,k) = {j in N_X(i,k) : i in N_X(j,k)} the mutual neighbours of i in space X.

    j counts for i only if i and j are each other's k-nearest neighbours in P *and* in Q, so a
    neighbour shared only through a hub (j near everything, i not near j from j's side) does not
    count. Dividing by k (not by |M|) keeps it comparable to KNOR: 0 <= mutual_knn <= knor <= 1,
    and 1 only when every neighbour relation is mutual and shared. (Huh et al. 2024 call their
    metric "mutual kNN", but theirs is KNOR; see knor().)
    """
    return mutual_knn_per_image(nbrs_p, nbrs_q, k).mean()


def linear_cka(x, y, *, names: tuple[str, str] = ("x", "y")) -> torch.Tensor:
    """Linear CKA (Kornblith et al. 2019) of x [N, d_x] and y [N, d_y], rows paired.

    With column-centred X, Y (HSIC form, linear kernels K = X X^T, L = Y Y^T):

        CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)  =  <K, L>_F / (||K||_F ||L||_F)

    in [0, 1]; invariant to orthogonal transforms and isotropic scaling of either space, not to
    general invertible linear maps. Computed in float64, in feature form (d x d products) or Gram
    form (N x N) whichever is smaller.
    """
    x, y = _paired(x, y, names)
    if x.shape[0] < max(x.shape[1], y.shape[1]):
        k, l = x @ x.T, y @ y.T
        return (k * l).sum() / (k.norm() * l.norm())
    return (y.T @ x).square().sum() / ((x.T @ x).norm() * (y.T @ y).norm())


def procrustes_residual(x, y, *, names: tuple[str, str] = ("x", "y")) -> torch.Tensor:
    """Orthogonal Procrustes residual min_R ||X R - Y||_F^2 over orthogonal R, in [0, 2].

    X and Y are x [N, d_x] and y [N, d_y] prepared in this order (float64):
      1. centre each column (removes translation);
      2. divide each by its Frobenius norm (removes isotropic scale).
    Then, for any widths, the residual is (Schoenemann 1966)

        min_R ||X R - Y||_F^2 = 2 - 2 ||X^T Y||_*      (||.||_* the nuclear norm, sum of singular values)

    0 when Y is a rotated/reflected, scaled, shifted copy of X, 2 at most; symmetric in x and y.

    Different widths are compared exactly, without any projection: zero-pad the narrower matrix
    with zero columns to d = max(d_x, d_y) and take R orthogonal d x d. Zero columns change
    neither ||X||_F = ||Y||_F = 1 nor the nonzero singular values of the cross matrix (the padded
    X^T Y is the d_x x d_y one bordered by zeros), so the formula holds as is on the unpadded
    d_x x d_y product. A rotated copy of X embedded in a wider space therefore scores 0, while
    directions of Y that X lacks count against the fit (Y = [X, B] rotated, centred B with
    X^T B = 0: residual 2 - 2 / sqrt(1 + ||B||_F^2 / ||X||_F^2)). Projecting both onto their top
    min(d_x, d_y) principal axes first would instead change the answer.
    """
    x, y = _paired(x, y, names)
    x, y = x / x.norm(), y / y.norm()
    return (2 - 2 * torch.linalg.svdvals(x.T @ y).sum()).clamp_min(0)


def _neighbours(nbrs_p, nbrs_q, k):
    """Check two neighbour index matrices and return their first k columns (and k)."""
    p, q = torch.as_tensor(nbrs_p), torch.as_tensor(nbrs_q)
    for a, name in ((p, "nbrs_p"), (q, "nbrs_q")):
        if a.ndim != 2 or a.dtype.is_floating_point or a.dtype == torch.bool:
            raise ValueError(f"{name}: expected an integer [N, K] neighbour index matrix, got {a.dtype} {tuple(a.shape)}")
    if p.shape[0] != q.shape[0]:
        raise ValueError(f"P has {p.shape[0]} images and Q {q.shape[0]}; both must cover the same images in the same order")
    k = min(p.shape[1], q.shape[1]) if k is None else k
    if not 1 <= k <= min(p.shape[1], q.shape[1]):
        raise ValueError(f"k={k} but the neighbour matrices have {p.shape[1]} and {q.shape[1]} columns")
    n = p.shape[0]
    p, q = p[:, :k].long(), q[:, :k].long()
    for a, name in ((p, "nbrs_p"), (q, "nbrs_q")):
        if a.min() < 0 or a.max() >= n:
            raise ValueError(f"{name}: neighbour indices must lie in [0, {n})")
        s = a.sort(dim=1).values
        if (s[:, 1:] == s[:, :-1]).any():
            raise ValueError(f"{name}: a row lists the same neighbour twice; expected knn() output")
    return p, q, k


def _shared(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """bool [N, k]: is p[i, t] also among q[i, :]."""
    n = p.shape[0]
    i = torch.arange(n, device=p.device)[:, None]
    return torch.isin(i * n + p, i * n + q)


def _mutual(nbrs: torch.Tensor) -> torch.Tensor:
    """bool [N, k]: is i among the neighbours of its neighbour j = nbrs[i, t]."""
    n = nbrs.shape[0]
    i = torch.arange(n, device=nbrs.device)[:, None]
    return torch.isin(nbrs * n + i, i * n + nbrs)  # edge j->i among the edges


def _paired(x, y, names):
    """Two checked float64 copies with centred columns over the same N >= 2 rows."""
    x, y = as_vectors(x, names[0]), as_vectors(y, names[1])
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{names[0]} has {x.shape[0]} rows and {names[1]} {y.shape[0]}; both must cover the same images in the same order")
    out = []
    for a, name in ((x, names[0]), (y, names[1])):
        if (a == a[0]).all():  # also catches N = 1
            raise ValueError(f"{name}: all {a.shape[0]} vectors are identical (zero variance); the comparison is undefined")
        a = a.to(torch.float64, copy=True)
        out.append(a.sub_(a.mean(dim=0)))
    return out



def local_distortion_per_image(x, y, nbrs_x, k: int | None = None,
                               max_block_bytes: int = DEFAULT_BLOCK_BYTES) -> torch.Tensor:
    """Per image, how unevenly the map x -> y stretches the distances to the image's own neighbours:

        distortion_i = std_{j in N_x(i,k)} log(||y_i - y_j|| / ||x_i - x_j||)     (population std)

    over i's k nearest neighbours in x (nbrs_x as knn() returns them). A similarity transform (rotation,
    uniform scale, shift) gives 0 for every image: a uniform stretch adds the same constant to every log
    ratio, so only uneven stretching (some neighbours pulled in, others pushed out) counts. Pairs at
    distance 0 in either space (duplicates) are left out; an image left with fewer than two pairs gets
    NaN. x [N, d_x] and y [N, d_y] are rows of the same images; float64 results [N]. Images are taken in
    chunks whose [rows, k, d] differences fit in `max_block_bytes`, so memory does not grow with N.
    """
    x, y = as_vectors(x, "x").double(), as_vectors(y, "y").double()
    p, _, k = _neighbours(nbrs_x, nbrs_x, k)
    if x.shape[0] != y.shape[0] or x.shape[0] != p.shape[0]:
        raise ValueError(f"x, y and the neighbours cover {x.shape[0]}, {y.shape[0]} and {p.shape[0]} images; "
                         "they must be the same images in the same order")
    out = torch.empty(x.shape[0], dtype=torch.float64)
    chunk = max(1, max_block_bytes // (k * max(x.shape[1], y.shape[1]) * 8))
    for start in range(0, x.shape[0], chunk):
        rows = torch.arange(start, min(start + chunk, x.shape[0]))
        dx = (x[rows, None] - x[p[rows]]).norm(dim=-1)
        dy = (y[rows, None] - y[p[rows]]).norm(dim=-1)
        ok = (dx > 0) & (dy > 0)
        ratio = torch.where(ok, (dy / torch.where(ok, dx, 1)).log(), 0.0)
        n = ok.sum(dim=1)
        mean = ratio.sum(dim=1) / n.clamp_min(1)
        var = (torch.where(ok, ratio - mean[:, None], 0.0) ** 2).sum(dim=1) / n.clamp_min(1)
        out[rows] = torch.where(n >= 2, var.sqrt(), torch.nan)
    return out
