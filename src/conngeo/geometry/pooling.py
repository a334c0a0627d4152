"""Pool per-image token matrices [tokens_i, d] to one vector per image [n_images, d']."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from conngeo.geometry.knn import as_vectors

METHODS = ("mean", "max", "first", "flatten")


def pool(mats: Sequence, method: str = "mean", *, name: str = "input") -> torch.Tensor:
    """One vector per image from its token matrix.

    method:
      "mean"     mean over tokens (default)                                  -> [n, d]
      "max"      per-feature max over tokens                                 -> [n, d]
      "first"    the first token (CLS-like, for encoders that put one first) -> [n, d]
      "flatten"  tokens concatenated in order, only if every image has the
                 same token count (otherwise the vectors are not comparable) -> [n, tokens * d]

    mats: torch tensors or numpy arrays, all of width d. float64 stays float64, anything else
    becomes float32. Errors (empty list, zero-token image, width or token-count mismatch, NaN/inf)
    name `name` and the image's position.
    """
    if method not in METHODS:
        raise ValueError(f"unknown pooling {method!r}; use one of {METHODS}")
    if len(mats) == 0:
        raise ValueError(f"{name}: no images to pool")
    mats = [as_vectors(m, f"{name}: image {i}") for i, m in enumerate(mats)]
    widths = {m.shape[1] for m in mats}
    if len(widths) > 1:
        raise ValueError(f"{name}: token widths differ between images ({sorted(widths)}); all images must come from one space")
    # One output dtype: float64 only if every image is float64.
    dtype = torch.float64 if all(m.dtype == torch.float64 for m in mats) else torch.float32
    mats = [m.to(dtype) for m in mats]
    if method == "flatten":
        counts = sorted({m.shape[0] for m in mats})
        if len(counts) > 1:
            raise ValueError(
                f"{name}: 'flatten' needs the same token count for every image, got counts {counts[:10]}; "
                "use 'mean', 'max' or 'first' for variable-length token sequences"
            )
        return torch.stack([m.flatten() for m in mats])
    if method == "mean":
        return torch.stack([m.mean(dim=0) for m in mats])
    if method == "max":
        return torch.stack([m.amax(dim=0) for m in mats])
    return torch.stack([m[0] for m in mats])
