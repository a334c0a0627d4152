"""Spectral summaries of a matrix: effective rank and top-k energy.

Per image, the matrix is its token matrix [tokens, d]; per dataset, the pooled vectors [N, d].
With singular values s_1 >= s_2 >= ... of the matrix:

    effective rank (Roy & Vetterli 2007):  p_i = s_i / sum_j s_j,  erank = exp(-sum_i p_i log p_i)
                                           with 0 log 0 = 0; 1 <= erank <= rank
    top-k energy:                          sum_{i<=k} s_i^2 / sum_i s_i^2   (1 when k >= rank)

The matrix is NOT centred by default (center=False): the spectrum then includes the mean
direction, which for transformer tokens usually dominates s_1. center=True subtracts the column
mean first, so the spectrum describes the spread around the mean (the PCA spectrum). A matrix
with no spectrum (all zeros, or, centred, all rows equal, e.g. a single token) is an error.
Singular values are computed in float64.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from conngeo.geometry.knn import as_vectors


def singular_values(x, *, center: bool = False, name: str = "input") -> torch.Tensor:
    """Singular values of x [n, d] (float64, descending), column-centred first if `center`."""
    x = as_vectors(x, name).double()
    scale = x.abs().max()
    if center:
        x = x - x.mean(dim=0)
    s = torch.linalg.svdvals(x)
    # s_1 >= every |entry|. Centring identical rows leaves rounding residue of ~1e-16 * scale,
    # not an exact 0, so a largest singular value at that level counts as no spectrum.
    if s[0] <= 1e-12 * scale:
        what = "all its rows are equal, so centred it is zero" if center else "it is all zeros"
        raise ValueError(f"{name}: no spectrum: {what} ({tuple(x.shape)} matrix)")
    return s


def effective_rank(x, *, center: bool = False, name: str = "input") -> torch.Tensor:
    """Effective rank exp(H(p)), p = s / sum(s), of x [n, d] (0-dim float64 tensor)."""
    return _erank(singular_values(x, center=center, name=name))


def top_k_energy(x, k: int, *, center: bool = False, name: str = "input") -> torch.Tensor:
    """Fraction sum_{i<=k} s_i^2 / sum_i s_i^2 of the squared Frobenius norm in the top k
    singular directions of x [n, d] (0-dim float64 tensor)."""
    _check_k(k)
    return _energy(singular_values(x, center=center, name=name), k)


def spectra_per_image(
    mats: Sequence, ks: Iterable[int] = (1,), *, center: bool = False, name: str = "input"
) -> dict[str, torch.Tensor]:
    """One SVD per token matrix [tokens_i, d]; returns float64 tensors [n_images] under the keys
    "erank" and f"energy@{k}" for each k in ks. Errors name `name` and the image's position."""
    ks = list(ks)
    for k in ks:
        _check_k(k)
    out = {"erank": torch.empty(len(mats), dtype=torch.float64)}
    out.update({f"energy@{k}": torch.empty(len(mats), dtype=torch.float64) for k in ks})
    for i, m in enumerate(mats):
        s = singular_values(m, center=center, name=f"{name}: image {i}")
        out["erank"][i] = _erank(s)
        for k in ks:
            out[f"energy@{k}"][i] = _energy(s, k)
    return out


def _erank(s: torch.Tensor) -> torch.Tensor:
    p = s / s.sum()
    p = p[p > 0]  # 0 log 0 = 0
    return torch.exp(-(p * p.log()).sum())


def _energy(s: torch.Tensor, k: int) -> torch.Tensor:
    e = s.square()
    return e[:k].sum() / e.sum()


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"top-k energy needs k >= 1, got {k}")
