"""Geometry of representation spaces: exact kNN, neighbourhood overlap, CKA, Procrustes, spectra.

Pure functions on tensors (torch or numpy in, torch out), each docstring states its formula.
Definitions follow the design reference, "Metric definitions".
"""

from conngeo.geometry.knn import as_vectors, block_rows, clip_k, knn
from conngeo.geometry.overlap import (
    jaccard_per_image,
    knn_jaccard,
    knor,
    knor_chance,
    knor_per_image,
    linear_cka,
    local_distortion_per_image,
    mutual_knn,
    mutual_knn_per_image,
    procrustes_residual,
)
from conngeo.geometry.pooling import pool
from conngeo.geometry.probes import DEFAULT_ALPHAS, probe_accuracy, probe_r2, probe_table
from conngeo.geometry.spectra import effective_rank, singular_values, spectra_per_image, top_k_energy

__all__ = [
    "DEFAULT_ALPHAS",
    "as_vectors",
    "block_rows",
    "clip_k",
    "effective_rank",
    "jaccard_per_image",
    "knn",
    "knn_jaccard",
    "knor",
    "knor_chance",
    "knor_per_image",
    "linear_cka",
    "local_distortion_per_image",
    "mutual_knn",
    "mutual_knn_per_image",
    "pool",
    "probe_accuracy",
    "probe_r2",
    "probe_table",
    "procrustes_residual",
    "singular_values",
    "spectra_per_image",
    "top_k_energy",
]
