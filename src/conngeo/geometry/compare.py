"""Compare several spaces over the same images: what the knn stage reports for one model.

Each space has one vector per image (rows aligned). Neighbours are computed once per space at the
largest k; a smaller k takes the first columns, since knn returns them nearest first.
"""

from __future__ import annotations

import torch

from .knn import clip_k, knn
from .overlap import jaccard_per_image, knor_chance, knor_per_image, linear_cka, mutual_knn, procrustes_residual
from .spectra import effective_rank, spectra_per_image, top_k_energy


def compare_spaces(spaces: dict[str, torch.Tensor], pairs: list[tuple[str, str]], ks: list[int],
                   metric: str = "l2", max_block_bytes: int = 256 << 20) -> tuple[dict, dict]:
    """Neighbourhood agreement of each pair of spaces at each k.

    Returns (per_image, summary): per_image maps column names such as "knor_pre_post@10" to [N]
    tensors; summary holds dataset-level KNOR, kNN Jaccard and mutual-kNN per pair and k, with the
    chance level k/(N-1) beside them, plus linear CKA and the Procrustes residual per pair.
    """
    n = next(iter(spaces.values())).shape[0]
    if any(v.shape[0] != n for v in spaces.values()):
        raise ValueError(f"spaces cover different numbers of images: { {k: v.shape[0] for k, v in spaces.items()} }")
    ks = clip_k(ks, n)
    used = sorted({name for pair in pairs for name in pair})
    nbrs = {name: knn(spaces[name], ks[-1], metric=metric, name=name, max_block_bytes=max_block_bytes) for name in used}
    per_image, summary = {}, {"images": n, "metric": metric, "ks": ks, "pairs": {}}
    for a, b in pairs:
        pair = f"{a}_{b}"
        entry = {"cka": float(linear_cka(spaces[a], spaces[b], names=(a, b))),
                 "procrustes": float(procrustes_residual(spaces[a], spaces[b], names=(a, b)))}
        for k in ks:
            per_knor = knor_per_image(nbrs[a], nbrs[b], k)
            per_image[f"knor_{pair}@{k}"] = per_knor
            entry[f"knor@{k}"] = float(per_knor.mean())
            entry[f"jaccard@{k}"] = float(jaccard_per_image(nbrs[a], nbrs[b], k).mean())
            entry[f"mutual_knn@{k}"] = float(mutual_knn(nbrs[a], nbrs[b], k))
            entry[f"chance@{k}"] = knor_chance(k, n)
        summary["pairs"][pair] = entry
    return per_image, summary


def image_spectra(tokens: dict[str, list[torch.Tensor]], top_k: int) -> dict[str, torch.Tensor]:
    """Effective rank and top-k energy of each image's token matrix: columns "erank_<space>",
    "energy@<top_k>_<space>" [n_images] for every space of `tokens` (name -> per-image matrices)."""
    return {f"{key}_{name}": values for name, mats in tokens.items()
            for key, values in spectra_per_image(mats, ks=[top_k], name=name).items()}


def dataset_spectra(pooled: dict[str, torch.Tensor], top_k: int) -> dict[str, float]:
    """Effective rank and top-k energy of each space's pooled vectors [N, d] (one number per space)."""
    out = {}
    for name, x in pooled.items():
        out[f"erank_{name}_dataset"] = float(effective_rank(x, name=name))
        out[f"energy@{top_k}_{name}_dataset"] = float(top_k_energy(x, top_k, name=name))
    return out
