"""Stage pretrain: the tiny pretrained models the zoo and the references stand on. Each entry of
params.yaml `pretrain` names its recipe:

clip    CLIPModel, contrastive on (image, caption)
siglip  SiglipModel, sigmoid loss on (image, caption)
dino    Dinov2Model, self-supervised on images alone

The default study trains a CLIP for the tiny LLaVA's frozen encoder (`clip`), a second CLIP from
another seed for the `clip` reference space and CLIPScore (`clipref`: no VLM's encoder, so that
comparing with it is an outside view), a SigLIP for the tiny Idefics2 and a DINOv2 reference.
"""

import time
from pathlib import Path

import torch
import typer
from dvclive import Live

from common import dvclive_logger, load_params, run, write_json, write_timings
from conngeo import layout
from conngeo.data.images import load_image, scan
from conngeo.data.toyworld import parse_caption
from conngeo.models.tokenizer import build_tokenizer, read_vocab

app = typer.Typer(add_completion=False)


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


@app.command()
def main(
    name: str = typer.Option(..., help="an entry of params.yaml `pretrain`"),
    train_root: Path = typer.Option(Path("data/images/toyfood_train"), help="training split"),
    out: Path = typer.Option(None, help="checkpoint folder (default data/models/<name>)"),
):
    """Train one tiny pretrained model on the training split (held-out images excluded) and save it."""
    params = load_params()
    zoo = params["zoo"]
    torch.set_num_threads(zoo["threads"])  # the thread count changes the trained weights' last bits
    if name not in params["pretrain"]:
        raise SystemExit(f"unknown pretrain entry {name!r}; params.yaml pretrain has {sorted(params['pretrain'])}")
    recipe = params["pretrain"][name]
    kind = recipe["recipe"]
    out = out or layout.data("models", name)
    all_items = scan(train_root).items
    items, heldout = all_items[:-zoo["heldout"]], all_items[-zoo["heldout"]:]
    images, captions = [load_image(it.path) for it in items], [it.caption for it in items]
    tokenizer = build_tokenizer(read_vocab(train_root / "vocab.txt"))
    start = time.perf_counter()
    with Live(dir=str(layout.live("pretrain", name)), dvcyaml=False, save_dvc_exp=False) as live:
        log = dvclive_logger(live, prefix="train/")
        model, processor = trainer(kind)(images, captions, tokenizer, image_size=params["toyworld"]["toyfood"]["image_size"],
                                         steps=recipe["steps"], batch_size=recipe["batch_size"], lr=recipe["lr"],
                                         patch_size=recipe["patch_size"], seed=recipe["seed"], log=log)
    seconds = time.perf_counter() - start
    write_timings("pretrain", name, train=seconds)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    report = {"recipe": kind, "seed": recipe["seed"], "parameters": sum(p.numel() for p in model.parameters()), "patch_size": recipe["patch_size"],
              "train_images": len(items), **quality(kind, model, processor, heldout)}
    write_json(layout.details("zoo", name), report)
    typer.echo(f"pretrain: {name} ({kind}): {report['parameters'] / 1e6:.2f}M parameters, {seconds:.0f} s -> {out}")


if __name__ == "__main__":
    run(app)
