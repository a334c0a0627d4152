"""Toy-world truth of generated captions: which attributes of the reference caption they get right,
model-free (conngeo.data.toyworld.caption_truth). Real captions are not toy-world captions: a
reference that does not parse gives NaN in every truth column, and such rows are left out of means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..data.toyworld import caption_truth, parse_caption

TRUTH_KEYS = ("parses", "kinds", "counts", "colours", "exact")


def reference_parses(reference: str) -> bool:
    try:
        parse_caption(reference)
    except ValueError:
        return False
    return True


def truth_table(captions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """Per caption, 1.0 / 0.0 for each of TRUTH_KEYS against its reference (NaN where the reference
    is not a toy-world caption)."""
    if len(captions) != len(references):
        raise ValueError(f"{len(captions)} captions but {len(references)} references")
    table = {key: [] for key in TRUTH_KEYS}
    for caption, reference in zip(captions, references):
        truth = caption_truth(caption, reference) if reference_parses(reference) else None
        for key in TRUTH_KEYS:
            table[key].append(math.nan if truth is None else float(truth[key]))
    return table
