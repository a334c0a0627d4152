"""The tiny pretrained models the zoo and the references stand on, trained by the zoo stage (stages/zoo.py).
Each entry of params.yaml `pretrain` names its recipe:

clip    CLIPModel, contrastive on (image, caption)
siglip  SiglipModel, sigmoid loss on (image, caption)
dino    Dinov2Model, self-supervised on images alone

The default study trains a CLIP for the tiny LLaVA's frozen encoder (`clip`), a second CLIP from
another seed for the `clip` reference space and CLIPScore (`clipref`: no VLM's encoder, so that
comparing with it is an outside view), a SigLIP for the tiny Idefics2 and a DINOv2 reference.
"""

import time
from pathlib import Path

import typer
from dvclive import Live

from common import dvclive_logger, write_json, write_timings
from conngeo import layout
from conngeo.data.images import load_image, scan
from conngeo.data.toyworld import parse_caption
from conngeo.models.tokenizer import build_tokenizer, read_vocab


def trainer(kind: str):
    if kind == "clip":
        from conngeo.models.pretrain import train_tiny_clip
        return train_tiny_clip
    if kind == "siglip":
        from conngeo.models.pretrain_siglip import train_tiny_siglip
        return train_tiny_siglip
    if kind == "dino":
        from conngeo.models.pretrain import train_tiny_dino
        return lambda images, captions, tokenizer, **kw: train_tiny_dino(images, **kw)
    raise SystemExit(f"unknown kind {kind!r}; choose clip, siglip or dino")


def quality(kind: str, model, processor, heldout) -> dict:
    """A held-out check that the model learned something: CLIP/SigLIP image->caption retrieval; for DINO a
    kNN probe of the first food kind (training images: the first half of held-out, tested on the rest)."""
    images, captions = [load_image(it.path) for it in heldout], [it.caption for it in heldout]
    if kind == "clip":
        from conngeo.models.pretrain import retrieval_accuracy
        return {"heldout_retrieval": retrieval_accuracy(model, processor, images, captions)}
    if kind == "siglip":
        from conngeo.models.pretrain_siglip import siglip_retrieval_accuracy
        return {"heldout_retrieval": siglip_retrieval_accuracy(model, processor, images, captions)}
    if kind == "dino":
        from conngeo.models.pretrain import probe_reference
        from conngeo.models.references import DinoReference
        kinds = [parse_caption(c)["foods"][0][0] for c in captions]
        half = len(images) // 2
        probe = probe_reference(DinoReference(model, processor), images[:half], kinds[:half], images[half:], kinds[half:])
        return {"heldout_kind_probe": probe}
    return {}


def train_pretrained(name: str, params, train_root: Path, image_size: int, out: Path) -> None:
    """Train pretrain entry `name` on `image_size`-px images of the training split (held-out images excluded), save it in `out` and write
    its held-out check to metrics/zoo/<name>.json."""
    zoo, recipe = params["zoo"], params["pretrain"][name]
    kind = recipe["recipe"]
    all_items = scan(train_root).items
    items, heldout = all_items[:-zoo["heldout"]], all_items[-zoo["heldout"]:]
    images, captions = [load_image(it.path) for it in items], [it.caption for it in items]
    tokenizer = build_tokenizer(read_vocab(train_root / "vocab.txt"))
    start = time.perf_counter()
    with Live(dir=str(layout.live("pretrain", name)), dvcyaml=False, save_dvc_exp=False) as live:
        log = dvclive_logger(live, prefix="train/")
        model, processor = trainer(kind)(images, captions, tokenizer, image_size=image_size,
                                         steps=recipe["steps"], batch_size=recipe["batch_size"], lr=recipe["lr"],
                                         patch_size=recipe["patch_size"], seed=recipe["seed"], log=log)
    seconds = time.perf_counter() - start
    write_timings("pretrain", name, train=seconds)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    report = {"recipe": kind, "seed": recipe["seed"], "parameters": sum(p.numel() for p in model.parameters()), "patch_size": recipe["patch_size"],
              "train_images": len(items), **quality(kind, model, processor, heldout)}
    write_json(layout.details("zoo", name), report)
    typer.echo(f"pretrain: {name} ({kind}): {report['parameters'] / 1e6:.2f}M parameters, {seconds:.0f} s")
