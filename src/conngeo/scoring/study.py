"""One model's caption sets scored end to end (`score_model`): its scorers loaded from params score, every set
scored in resumable chunks (conngeo.scoring.sets), and the summary the score stage writes as
metrics/score/<model>.json."""

from __future__ import annotations

from pathlib import Path

from ..captions.inputs import match_images
from ..data.images import scan
from ..families.base import checked_folder
from ..references import load_reference
from ..resume import fingerprint
from .bertscore import BERTScore
from .clipscore import CLIPSCORE_WEIGHT
from .sets import caption_sets, score_sets


def score_model(captions: Path, perturb_root: Path, root: Path, out: Path, cfg, clip_spec: dict, modes: list,
                levels: list, *, device: str, desc: str = "score") -> tuple[dict, str]:
    """Score every caption set of a model (post and recon from `captions`, each perturbation of
    `perturb_root` for modes x levels) against the images under `root`, into <out>/<set>.csv and
    <out>/summary.csv. cfg: params score (plain data); clip_spec: its checked `clip` checkpoint (source, hub, revision,
    dtype). Chunks scored by an interrupted run of the same settings on the same captions are kept.
    Returns (the summary: means per set and what produced the numbers, the same however the run went;
    a line saying how the run went)."""
    stems, sets = caption_sets(captions, perturb_root, modes, levels)
    items = match_images(scan(root), stems, str(captions))
    clip = load_reference("clip", clip_spec["source"], revision=clip_spec["revision"], device=device,
                          dtype=clip_spec["dtype"], pooling="cls", hub=clip_spec["hub"])
    bert = BERTScore(cfg["bertscore_model"], num_layers=cfg["bertscore_num_layers"], idf=cfg["bertscore_idf"],
                     rescale_with_baseline=cfg["bertscore_rescale"], batch_size=cfg["bertscore_batch_size"],
                     device=device, max_unknown=cfg["max_unknown_share"],
                     source=cfg["bertscore_source"] and checked_folder(cfg["bertscore_source"], cfg["bertscore_revision"]))
    fp = fingerprint({"score": cfg, "clip": clip_spec, "sets": list(sets)},
                     [captions] + [s.source for s in sets.values() if s.source])
    done = score_sets(out, sets, items, clip, bert, chunk_size=cfg["chunk_size"], batch_size=cfg["batch_size"],
                      prefix=cfg["clip_prefix"], truth=cfg["truth"], fingerprint=fp,
                      max_unknown=cfg["max_unknown_share"], desc=desc)
    summary = {**done.summary,
               "clipscore": {"prefix": cfg["clip_prefix"], "w": CLIPSCORE_WEIGHT,
                             "clip": clip_spec["hub"] or clip_spec["source"], "revision": clip_spec["revision"],
                             "distinct_texts": done.texts},  # distinct within each chunk, summed
               "bertscore": bert.info()}
    line = (f"{len(sets)} caption sets x {len(stems)} images in {done.chunks} chunks ({done.scored_now} scored now): "
            f"{bert.pairs_computed} distinct BERTScore pairs computed now; -> {out}; post CLIPScore "
            f"{summary['post']['clipscore']}, BERTScore F1 {summary['post']['bertscore_f1']}")
    return summary, line
