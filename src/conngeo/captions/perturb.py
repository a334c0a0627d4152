"""Perturbations of one image's E_post, a [tokens, d] matrix: pure functions, deterministic per image.

Two modes, one `level` in [0, 1] each, where a larger level is always a stronger perturbation, so
curves over the same levels are comparable across modes:

    mask     level = fraction of tokens MASKED.  masked = round(level * tokens), at least 1 for any
             level > 0 (a nonzero level always perturbs, even 0.01 of 9 tokens) and at most all of them.
             Masked rows become zeros (fill="zeros") or the image's mean token (fill="mean": the mean
             over all tokens of the unperturbed matrix). Which tokens: token i's rank is a hash of
             (seed, stem, i), so the choice depends on the image and the seed only (not on torch's or
             numpy's RNG, nor on the order images come in), and the tokens masked at a lower level are
             a subset of those masked at a higher one.
    lowrank  level = fraction of singular values REMOVED.  Of K = min(tokens, d) singular directions,
             removed = round(level * K), at least 1 for any level > 0 and at most K - 1 (rank >= 1
             always stays); the result is the best rank-(K - removed) approximation (Eckart-Young:
             truncated SVD of the matrix as it is, not centred), computed in float64.

Level 0 returns the input unchanged (same values, same dtype; a copy). `round` is round half up on the
level as written in decimal (0.5 * 9 tokens -> 5), not Python's banker's rounding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal

import torch

MODES = ("mask", "lowrank")
FILLS = ("zeros", "mean")


def _check_level(level: float) -> None:
    if not 0 <= level <= 1:
        raise ValueError(f"perturbation level must be in [0, 1], not {level!r}")


def _round_half_up(level: float, n: int) -> int:
    return int((Decimal(repr(float(level))) * n).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def masked_count(level: float, tokens: int) -> int:
    """Number of tokens `mask_tokens` masks: round(level * tokens), >= 1 when level > 0, <= tokens."""
    _check_level(level)
    if level == 0 or tokens == 0:
        return 0
    return min(tokens, max(1, _round_half_up(level, tokens)))


def removed_rank(level: float, tokens: int, dim: int) -> int:
    """Number of singular directions `low_rank` removes from a [tokens, dim] matrix:
    round(level * K) with K = min(tokens, dim), >= 1 when level > 0, <= K - 1."""
    _check_level(level)
    full = min(tokens, dim)
    if level == 0 or full <= 1:
        return 0
    return min(full - 1, max(1, _round_half_up(level, full)))


def mask_order(stem: str, tokens: int, seed: int = 0) -> torch.Tensor:
    """The order in which tokens of image `stem` get masked: token indices sorted by a hash of
    (seed, stem, index). `mask_tokens` at any level masks a prefix of this order."""
    def rank(i: int) -> bytes:
        return hashlib.blake2b(f"{seed}\x00{stem}\x00{i}".encode(), digest_size=8).digest()
    return torch.tensor(sorted(range(tokens), key=rank), dtype=torch.long)


def mask_tokens(post: torch.Tensor, level: float, stem: str, seed: int = 0, fill: str = "zeros") -> torch.Tensor:
    """`post` [tokens, d] with `masked_count(level, tokens)` rows replaced by zeros or the mean token."""
    if fill not in FILLS:
        raise ValueError(f"mask fill must be one of {FILLS}, not {fill!r}")
    n = masked_count(level, post.shape[0])
    out = post.clone()
    if n == 0:
        return out
    rows = mask_order(stem, post.shape[0], seed)[:n]
    out[rows] = 0 if fill == "zeros" else post.mean(dim=0, dtype=torch.float64).to(post.dtype)
    return out


def low_rank(post: torch.Tensor, level: float) -> torch.Tensor:
    """The best approximation of `post` [tokens, d] of rank K - removed_rank(level, tokens, d)."""
    removed = removed_rank(level, *post.shape)
    if removed == 0:
        return post.clone()
    keep = min(post.shape) - removed
    u, s, vh = torch.linalg.svd(post.double(), full_matrices=False)
    return ((u[:, :keep] * s[:keep]) @ vh[:keep]).to(post.dtype)


def perturb(post: torch.Tensor, mode: str, level: float, stem: str, seed: int = 0,
            fill: str = "zeros") -> torch.Tensor:
    """One image's E_post perturbed by `mode` ("mask" or "lowrank") at `level` (see the module doc)."""
    if mode == "mask":
        return mask_tokens(post, level, stem, seed=seed, fill=fill)
    if mode == "lowrank":
        return low_rank(post, level)
    raise ValueError(f"unknown perturbation mode {mode!r}; choose one of {MODES}")


def perturbation_size(post: torch.Tensor, mode: str, level: float) -> int:
    """How many tokens (mask) or singular directions (lowrank) `perturb` changes in this matrix."""
    if mode == "mask":
        return masked_count(level, post.shape[0])
    if mode == "lowrank":
        return removed_rank(level, *post.shape)
    raise ValueError(f"unknown perturbation mode {mode!r}; choose one of {MODES}")


def relative_change(post: torch.Tensor, perturbed: torch.Tensor) -> float:
    """||post - perturbed||_F^2 / ||post||_F^2: the share of the matrix's energy a perturbation moved
    (for lowrank, the removed singular values' share of sum s^2). 0 for an all-zero `post`."""
    total = post.double().pow(2).sum()
    return float((post.double() - perturbed.double()).pow(2).sum() / total) if total > 0 else 0.0


class PerturbedPosts(Sequence):
    """A lazy list of perturbed E_post: indexing or slicing perturbs those images on demand, so
    generation over a large shard never holds a second copy of it. `relative_changes[i]` is filled
    (with `relative_change`) when image i is first produced."""

    def __init__(self, posts: Sequence[torch.Tensor], stems: Sequence[str], mode: str, level: float,
                 seed: int = 0, fill: str = "zeros"):
        if len(posts) != len(stems):
            raise ValueError(f"{len(posts)} E_post matrices but {len(stems)} stems")
        if mode not in MODES:
            raise ValueError(f"unknown perturbation mode {mode!r}; choose one of {MODES}")
        self.posts, self.stems = posts, stems
        self.mode, self.level, self.seed, self.fill = mode, level, seed, fill
        self.relative_changes: list[float | None] = [None] * len(posts)

    def __len__(self) -> int:
        return len(self.posts)

    def _one(self, i: int) -> torch.Tensor:
        out = perturb(self.posts[i], self.mode, self.level, self.stems[i], seed=self.seed, fill=self.fill)
        self.relative_changes[i] = relative_change(self.posts[i], out)
        return out

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._one(i) for i in range(*index.indices(len(self)))]
        return self._one(range(len(self))[index])
