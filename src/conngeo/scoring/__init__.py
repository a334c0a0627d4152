"""Caption scores: CLIPScore / RefCLIPScore (embeddings in, per-pair scores out), BERTScore through
the bert-score package, and the toy world's model-free caption truth. Metrics never load a VLM;
`score_sets` scores a model's caption sets in chunks of images (conngeo.scoring.sets)."""

from conngeo.scoring.bertscore import DEFAULT_MODEL, BERTScore, model_path
from conngeo.scoring.clipscore import (CLIPSCORE_WEIGHT, DEFAULT_PREFIX, TextEmbeddings, clip_score, clip_scores,
                                       harmonic_mean, ref_clip_score, reference_similarity, with_prefix)
from conngeo.scoring.sets import CaptionSet, Scored, caption_sets, score_chunk, score_sets
from conngeo.scoring.truth import TRUTH_KEYS, truth_table

__all__ = ["BERTScore", "CLIPSCORE_WEIGHT", "CaptionSet", "DEFAULT_MODEL", "DEFAULT_PREFIX", "Scored", "TRUTH_KEYS",
           "TextEmbeddings", "caption_sets", "clip_score", "clip_scores", "harmonic_mean", "model_path",
           "ref_clip_score", "reference_similarity", "score_chunk", "score_sets", "truth_table", "with_prefix"]
