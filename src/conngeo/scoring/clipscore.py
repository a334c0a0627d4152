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

The score functions are pure functions of embeddings; `clip_scores` embeds with a CLIPReference.
Empty (or whitespace) captions score 0 and are counted; so does RefCLIPScore for an empty reference.
"""

from __future__ import annotations

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


def reference_similarity(caption_emb: torch.Tensor, reference_emb: torch.Tensor) -> torch.Tensor:
    """max(max_r cos(caption, r), 0) per caption; `reference_emb` is [n, d] (one reference each) or
    [n, r, d] (r references each); [n]."""
    refs = reference_emb.double()
    if refs.dim() == 2:
        refs = refs[:, None]
    if refs.shape[0] != caption_emb.shape[0] or refs.shape[-1] != caption_emb.shape[-1]:
        raise ValueError(f"reference embeddings {tuple(reference_emb.shape)} do not pair with captions "
                         f"{tuple(caption_emb.shape)}")
    cos = F.cosine_similarity(caption_emb.double()[:, None], refs, dim=-1)
    return cos.amax(dim=1).clamp(min=0)


def harmonic_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2ab / (a + b) elementwise, 0 where a + b = 0 (both scores are >= 0)."""
    total = a + b
    return torch.where(total > 0, 2 * a * b / torch.where(total > 0, total, 1), torch.zeros_like(total))


def ref_clip_score(image_emb: torch.Tensor, caption_emb: torch.Tensor, reference_emb: torch.Tensor,
                   w: float = CLIPSCORE_WEIGHT) -> torch.Tensor:
    """Per-pair RefCLIP-S: harmonic mean of CLIP-S and the clipped best caption-reference cosine; [n]."""
    return harmonic_mean(clip_score(image_emb, caption_emb, w), reference_similarity(caption_emb, reference_emb))


def with_prefix(texts: Sequence[str], prefix: str = DEFAULT_PREFIX) -> list[str]:
    """`prefix + " " + text`, as the authors' code builds CLIP's input ("" prefix: the text alone)."""
    if not prefix:
        return [t.strip() for t in texts]
    return [f"{prefix.rstrip()} {t.strip()}" for t in texts]


def is_empty(text: str) -> bool:
    return not text or not text.strip()


def embed_texts_unique(reference, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """`reference.embed_text` of each text, embedding every distinct text once."""
    distinct = sorted(set(texts))
    position = {t: i for i, t in enumerate(distinct)}
    emb = reference.embed_text(distinct, batch_size=batch_size)
    return emb[torch.tensor([position[t] for t in texts], dtype=torch.long)]


def clip_scores(reference, image_emb: torch.Tensor, captions: Sequence[str],
                references: Sequence[str] | None = None, prefix: str = DEFAULT_PREFIX,
                batch_size: int = 256, w: float = CLIPSCORE_WEIGHT) -> dict[str, torch.Tensor]:
    """CLIP-S (and RefCLIP-S with `references`) of each caption against its image.

    reference: a CLIPReference with a text tower (conngeo.models.references.load_reference("clip", ...)).
    image_emb: [n, d] projected image embeddings, `reference.embed(images)` with pooling "cls".
    Returns {"clipscore": [n], "empty": [n] bool} and, with references, "refclipscore" and
    "empty_reference"; empty captions (and, for RefCLIP-S, empty references) score 0.
    """
    if len(captions) != image_emb.shape[0]:
        raise ValueError(f"{len(captions)} captions but {image_emb.shape[0]} image embeddings")
    empty = torch.tensor([is_empty(c) for c in captions], dtype=torch.bool)
    texts = with_prefix(captions, prefix)
    references_texts = None
    if references is not None:
        if len(references) != len(captions):
            raise ValueError(f"{len(captions)} captions but {len(references)} references")
        references_texts = with_prefix(references, prefix)
    emb = embed_texts_unique(reference, texts + (references_texts or []), batch_size)
    caption_emb = emb[:len(texts)]
    out = {"clipscore": clip_score(image_emb, caption_emb, w).masked_fill(empty, 0), "empty": empty}
    if references_texts is not None:
        empty_ref = torch.tensor([is_empty(r) for r in references], dtype=torch.bool)
        ref = ref_clip_score(image_emb, caption_emb, emb[len(texts):], w)
        out["refclipscore"] = ref.masked_fill(empty | empty_ref, 0)
        out["empty_reference"] = empty_ref
    return out
