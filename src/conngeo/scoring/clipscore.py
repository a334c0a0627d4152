"""CLIPScore and RefCLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for
Image Captioning"), following the paper and the authors' clipscore.py:

    CLIP-S(c, v)       = w * max(cos(E_c, E_v), 0),  w = 2.5
    RefCLIP-S(c, R, v) = H-Mean(CLIP-S(c, v), max(max_{r in R} cos(E_c, E_r), 0))

E_v is the projected image embedding (CLIPModel.get_image_features), E_c and E_r the projected text
embeddings (get_text_features) of the caption and of each reference caption, every text prefixed
with "A photo depicts" as the authors' code does for candidates and references alike. H-Mean(a, b) =
2ab / (a + b), defined as 0 when a + b = 0. The text-text term is not weighted by w; it is clipped at
0 as in the paper (the authors' script leaves it unclipped, which only differs for a negative cosine).

Rescaling against torchmetrics: torchmetrics' CLIPScore reports 100 * cos per pair and clips at 0
after averaging over the batch (max(mean(100 cos), 0)); for a single pair that is 100 * max(cos, 0),
so CLIP-S = torchmetrics * w / 100 = 0.025 * torchmetrics.

The score functions are pure functions of embeddings; `clip_scores` embeds through `TextEmbeddings`,
which embeds every distinct text once. Several references per image (COCO has five): RefCLIP-S takes
the max over them, as the paper defines it. Empty (or whitespace) captions score 0 and are counted; an
image without any reference has no RefCLIP-S (NaN, left out of means) and is counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

CLIPSCORE_WEIGHT = 2.5
DEFAULT_PREFIX = "A photo depicts"


def clip_score(image_emb: torch.Tensor, caption_emb: torch.Tensor, w: float = CLIPSCORE_WEIGHT) -> torch.Tensor:
    """Per-pair CLIP-S = w * max(cos(image, caption), 0) of rows of [n, d] embeddings; [n]."""
    if image_emb.shape != caption_emb.shape:
        raise ValueError(f"image and caption embeddings differ in shape: {tuple(image_emb.shape)} "
                         f"vs {tuple(caption_emb.shape)}")
    return w * F.cosine_similarity(image_emb.double(), caption_emb.double(), dim=-1).clamp(min=0)


def reference_similarity(caption_emb: torch.Tensor, reference_emb: torch.Tensor,
                         owner: torch.Tensor | None = None) -> torch.Tensor:
    """max(max_r cos(caption, r), 0) per caption; [n].

    reference_emb is [n, d] (one reference each), [n, r, d] (r each), or, with `owner`, [m, d]: any number
    of references per caption, reference j belonging to caption owner[j]; a caption that owns none
    gets NaN (no reference: excluded from reference-based scores, never 0)."""
    caption_emb = caption_emb.double()
    if owner is None:
        refs = reference_emb.double()
        if refs.dim() == 2:
            refs = refs[:, None]
        if refs.shape[0] != caption_emb.shape[0] or refs.shape[-1] != caption_emb.shape[-1]:
            raise ValueError(f"reference embeddings {tuple(reference_emb.shape)} do not pair with captions "
                             f"{tuple(caption_emb.shape)}")
        return F.cosine_similarity(caption_emb[:, None], refs, dim=-1).amax(dim=1).clamp(min=0)
    owner = torch.as_tensor(owner, dtype=torch.long)
    if owner.shape[0] != reference_emb.shape[0]:
        raise ValueError(f"{reference_emb.shape[0]} reference embeddings but {owner.shape[0]} owners")
    cos = F.cosine_similarity(caption_emb[owner], reference_emb.double(), dim=-1)
    best = torch.full((caption_emb.shape[0],), -math.inf, dtype=torch.float64)
    best = best.scatter_reduce(0, owner, cos, reduce="amax")
    return torch.where(torch.isinf(best), torch.nan, best.clamp(min=0))


def harmonic_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2ab / (a + b) elementwise, 0 where a + b = 0 (both scores are >= 0); NaN stays NaN."""
    total = a + b
    return torch.where(total > 0, 2 * a * b / torch.where(total > 0, total, 1), torch.where(total.isnan(), total, 0))


def ref_clip_score(image_emb: torch.Tensor, caption_emb: torch.Tensor, reference_emb: torch.Tensor,
                   owner: torch.Tensor | None = None, w: float = CLIPSCORE_WEIGHT) -> torch.Tensor:
    """Per-pair RefCLIP-S: harmonic mean of CLIP-S and the clipped best caption-reference cosine (the max
    over each caption's references, Hessel et al.); [n], NaN for a caption without references."""
    return harmonic_mean(clip_score(image_emb, caption_emb, w), reference_similarity(caption_emb, reference_emb, owner))


def retrieval_hits(image_emb: torch.Tensor, caption_emb: torch.Tensor, captions: Sequence[str]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Image -> caption retrieval among the n pairs given, the sanity check of a CLIP that scores captions:

        hit_i    = [captions[argmax_j cos(image_i, caption_j)] == captions[i]]
        chance_i = #{j : captions[j] == captions[i]} / n       (the hit rate of a random pick)

    A retrieved caption counts as right when its text equals the image's own (two images may share one).
    Returns ([n] float64 hits, [n] float64 chances)."""
    if image_emb.shape[0] != caption_emb.shape[0] or len(captions) != image_emb.shape[0]:
        raise ValueError(f"{image_emb.shape[0]} images, {caption_emb.shape[0]} caption embeddings and "
                         f"{len(captions)} captions: they must pair up one to one")
    cos = F.normalize(image_emb.double(), dim=-1) @ F.normalize(caption_emb.double(), dim=-1).T
    best = cos.argmax(dim=1).tolist()
    hits = torch.tensor([float(captions[j] == captions[i]) for i, j in enumerate(best)], dtype=torch.float64)
    chance = torch.tensor([sum(t == c for t in captions) / len(captions) for c in captions], dtype=torch.float64)
    return hits, chance


def with_prefix(texts: Sequence[str], prefix: str = DEFAULT_PREFIX) -> list[str]:
    """`prefix + " " + text`, as the authors' code builds CLIP's input ("" prefix: the text alone)."""
    if not prefix:
        return [t.strip() for t in texts]
    return [f"{prefix.rstrip()} {t.strip()}" for t in texts]


def is_empty(text: str) -> bool:
    return not text or not text.strip()


class TextEmbeddings:
    """CLIP text embeddings, each distinct text embedded once.

    `add(texts)` embeds the texts not seen before (sorted, in batches of `batch_size`); `embed(texts)`
    looks them up. Embedding every distinct string once, before any score is computed, makes equal
    captions score exactly equal wherever they occur (in another caption set, another batch): batch
    composition changes low-order bits of a forward pass, which fp16 on a GPU would show.
    `reference` is a CLIPReference with a text tower; the prefix is added here. A text (with its prefix)
    whose tokens are more than `max_unknown` unknown to the CLIP's tokenizer stops with an error naming it
    (conngeo.tokenizer_checks.check_readable)."""

    def __init__(self, reference, prefix: str = DEFAULT_PREFIX, batch_size: int = 256, max_unknown: float = 0.2):
        self.reference, self.prefix, self.batch_size, self.max_unknown = reference, prefix, batch_size, max_unknown
        self.vectors: dict[str, torch.Tensor] = {}

    def add(self, texts: Sequence[str]) -> None:
        from ..tokenizer_checks import check_readable

        new = sorted(set(texts) - set(self.vectors))
        if new:
            prefixed = with_prefix(new, self.prefix)
            check_readable(self.reference.tokenizer, [t for t, raw in zip(prefixed, new) if not is_empty(raw)],
                           self.max_unknown, "the scoring CLIP")
            emb = self.reference.embed_text(prefixed, batch_size=self.batch_size)
            self.vectors.update(zip(new, emb))

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        self.add(texts)
        return torch.stack([self.vectors[t] for t in texts])

    def __len__(self) -> int:
        return len(self.vectors)


def clip_scores(texts: TextEmbeddings, image_emb: torch.Tensor, captions: Sequence[str],
                references: Sequence[Sequence[str]] | None = None, w: float = CLIPSCORE_WEIGHT) -> dict:
    """CLIP-S (and RefCLIP-S with `references`) of each caption against its image.

    texts: the TextEmbeddings of a CLIP with a text tower (conngeo.references.load_reference("clip", ...)).
    image_emb: [n, d] projected image embeddings, `reference.embed(images)` with pooling "cls".
    references: per caption, a list of reference captions (COCO has five; empty strings are ignored).
    Returns {"clipscore": [n], "empty": [n] bool} and, with references, "refclipscore" (the max over each
    caption's references) and "no_reference" [n] bool. An empty caption scores 0 and is counted; a caption
    without a reference has refclipscore NaN (left out of means) and is counted.
    """
    if len(captions) != image_emb.shape[0]:
        raise ValueError(f"{len(captions)} captions but {image_emb.shape[0]} image embeddings")
    empty = torch.tensor([is_empty(c) for c in captions], dtype=torch.bool)
    caption_emb = texts.embed(list(captions))
    out = {"clipscore": clip_score(image_emb, caption_emb, w).masked_fill(empty, 0), "empty": empty}
    if references is not None:
        if len(references) != len(captions):
            raise ValueError(f"{len(captions)} captions but {len(references)} reference lists")
        flat = [(i, r) for i, refs in enumerate(references) for r in refs if not is_empty(r)]
        owner = torch.tensor([i for i, _ in flat], dtype=torch.long)
        ref_emb = texts.embed([r for _, r in flat]) if flat else torch.zeros(0, caption_emb.shape[1])
        ref = ref_clip_score(image_emb, caption_emb, ref_emb, owner, w)
        out["refclipscore"] = torch.where(empty & ~ref.isnan(), 0.0, ref)
        out["no_reference"] = ref.isnan()
    return out
