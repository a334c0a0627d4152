"""The tiny pretrained models the zoo and the references stand on (the zoo stage trains every entry of params
`pretrain`). Each entry names its recipe:

clip    CLIPModel, contrastive on (image, caption)
siglip  SiglipModel, sigmoid loss on (image, caption)
dino    Dinov2Model, self-supervised on images alone

The default study trains a CLIP for the tiny LLaVA's frozen encoder (`clip`), a second CLIP from
another seed for the `clip` reference space and CLIPScore (`clipref`: no VLM's encoder, so that
comparing with it is an outside view), a SigLIP for the tiny Idefics2 and a DINOv2 reference.
"""

from __future__ import annotations

from pathlib import Path

from ..data.images import load_image, scan
from ..data.toyworld import parse_caption
from .tokenizer import build_tokenizer, read_vocab


def trainer(kind: str):
    if kind == "clip":
        from .pretrain import train_tiny_clip
        return train_tiny_clip
    if kind == "siglip":
        from .pretrain_siglip import train_tiny_siglip
        return train_tiny_siglip
    if kind == "dino":
        from .pretrain import train_tiny_dino
        return lambda images, captions, tokenizer, **kw: train_tiny_dino(images, **kw)
    raise ValueError(f"unknown pretrain recipe {kind!r}; choose clip, siglip or dino")


def quality(kind: str, model, processor, heldout) -> dict:
    """A held-out check that the model learned something: CLIP/SigLIP image->caption retrieval; for DINO a
    kNN probe of the first food kind (training images: the first half of held-out, tested on the rest)."""
    images, captions = [load_image(it.path) for it in heldout], [it.caption for it in heldout]
    if kind == "clip":
        from .pretrain import retrieval_accuracy
        return {"heldout_retrieval": retrieval_accuracy(model, processor, images, captions)}
    if kind == "siglip":
        from .pretrain_siglip import siglip_retrieval_accuracy
        return {"heldout_retrieval": siglip_retrieval_accuracy(model, processor, images, captions)}
    if kind == "dino":
        from ..references import DinoReference
        from .pretrain import probe_reference
        kinds = [parse_caption(c)["foods"][0][0] for c in captions]
        half = len(images) // 2
        probe = probe_reference(DinoReference(model, processor), images[:half], kinds[:half], images[half:], kinds[half:])
        return {"heldout_kind_probe": probe}
    return {}


def train_pretrained(recipe: dict, heldout: int, train_root: Path, image_size: int, out: Path, log=None) -> dict:
    """Train a pretrain entry (`recipe`: params pretrain.<name>) on `image_size`-px images of the training split
    (its last `heldout` images excluded), save it in `out`; its held-out check (for metrics/zoo/<name>.json).
    log: a `log(step, {name: value})` callback of the training curve."""
    kind = recipe["recipe"]
    all_items = scan(train_root).items
    items, kept_out = all_items[:-heldout], all_items[-heldout:]
    images, captions = [load_image(it.path) for it in items], [it.caption for it in items]
    tokenizer = build_tokenizer(read_vocab(train_root / "vocab.txt"))
    model, processor = trainer(kind)(images, captions, tokenizer, image_size=image_size,
                                     steps=recipe["steps"], batch_size=recipe["batch_size"], lr=recipe["lr"],
                                     patch_size=recipe["patch_size"], seed=recipe["seed"], log=log)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return {"recipe": kind, "seed": recipe["seed"], "parameters": sum(p.numel() for p in model.parameters()),
            "patch_size": recipe["patch_size"], "train_images": len(items),
            **quality(kind, model, processor, kept_out)}
