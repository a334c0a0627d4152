"""Captions from original, reconstructed and perturbed E_post, and the perturbations themselves.

    generate_captions(adapter, images, post)      batched greedy captions from a supplied E_post
    captions_from_recon(adapter, images, pre)     ... from connector(reconstructed E_pre)
    perturb(post, mode, level, stem, seed, fill)  one image's E_post masked or truncated in rank

Level semantics (larger = stronger in both modes) are in `conngeo.captions.perturb`; the perturbation
sweep of a study (every mode and level of every image, in resumable units split over workers, and the
join) is `conngeo.captions.sweep.perturbed_captions`.
"""

from conngeo.captions.generate import captions_from_recon, generate_captions
from conngeo.captions.perturb import (FILLS, MODES, PerturbedPosts, low_rank, mask_order, mask_tokens,
                                      masked_count, perturb, perturbation_size, relative_change, removed_rank)
from conngeo.captions.table import read_table, write_table

__all__ = ["FILLS", "MODES", "PerturbedPosts", "captions_from_recon", "generate_captions", "low_rank",
           "mask_order", "mask_tokens", "masked_count", "perturb", "perturbation_size", "read_table",
           "relative_change", "removed_rank", "write_table"]
