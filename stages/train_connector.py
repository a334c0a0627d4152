"""Stage train_connector: replace a base model's connector by another kind (linear, mlp,
resampler<n>, merger), train only the new connector with the caption loss, save the variant under
data/models/<variant> and check its captions on held-out images.

The variant (params connectors.variants.<variant>) is then an ordinary model of the `models`
registry (family: variant), so extract, knn, recon, captions, perturb and score treat it like any
other. The held-out images are the zoo's (the last zoo.heldout of the training split), so the
variant's accuracy compares with its base's on the same images; the base is scored here too.
"""

import time
from pathlib import Path

import torch
import typer
from dvclive import Live

from common import dvclive_logger, load_model, load_params, model_spec, run, write_json, write_timings
from conngeo import layout
from conngeo.data.images import load_image, scan
from conngeo.models.variant import ConnectorVariant
from conngeo.models.zoo import caption_accuracy, train_captioner

app = typer.Typer(add_completion=False)


@app.command()
def main(
    variant: str = typer.Option(..., help="a name from params.yaml connectors.variants"),
    train_root: Path = typer.Option(None, help="training images with captions (default: params connectors.train_root)"),
    out: Path = typer.Option(None, help="variant folder (default data/models/<variant>)"),
    metrics: Path = typer.Option(None, help="summary JSON (default metrics/connectors/<variant>.json)"),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: params device)"),
):
    """Train a replacement connector between a base's frozen vision encoder and language model."""
    params = load_params()
    cfg = params["connectors"]
    if variant not in cfg["variants"]:
        raise SystemExit(f"unknown variant {variant!r}; params.yaml connectors.variants has {sorted(cfg['variants'])}")
    recipe = cfg["variants"][variant]
    torch.set_num_threads(cfg["threads"])
    device = device or params["device"]
    train_root = train_root or Path(cfg["train_root"])
    out = out or layout.data("models", variant)
    metrics = metrics or layout.details("connectors", variant)

    items = scan(train_root).items
    heldout = params["zoo"]["heldout"]
    n_train = len(items) - heldout
    if cfg["images"]:  # the image budget (real checkpoints): the first `images` training images
        n_train = min(n_train, cfg["images"])
    train, test = items[:n_train], items[len(items) - heldout:]
    images, captions = [load_image(it.path) for it in train], [it.caption for it in train]
    test_images, test_captions = [load_image(it.path) for it in test], [it.caption for it in test]

    spec = model_spec(recipe["base"], params)
    base = load_model(spec, device)
    base_accuracy, _ = caption_accuracy(base, test_images, test_captions)
    size = {k: recipe[k] for k in ("hidden", "layers", "heads") if k in recipe}
    adapter = ConnectorVariant.from_base(base, recipe["kind"], base_source=spec["source"],
                                         base_revision=spec["revision"], seed=cfg["seed"], **size)
    n_params = sum(p.numel() for p in adapter.connector().parameters())
    typer.echo(f"train_connector: {variant}: {recipe['kind']} connector ({n_params / 1e6:.3f}M parameters, "
               f"{adapter.image_tokens} image tokens) on {recipe['base']} ({spec['source']}), "
               f"{n_train} training images, {heldout} held out")

    start = time.perf_counter()
    with Live(dir=str(layout.live("connectors", variant)), dvcyaml=False, save_dvc_exp=False) as live:
        # the state file makes an interrupted training resume (it goes once the training ends)
        out.mkdir(parents=True, exist_ok=True)
        losses = train_captioner(adapter, images, captions, steps=recipe["steps"], batch_size=recipe["batch_size"],
                                 lr=recipe["lr"], seed=cfg["seed"], augment=recipe["augment"],
                                 log=dvclive_logger(live, prefix="train/"), state=out / "train_state.safetensors",
                                 save_every=cfg["save_every"])
    seconds = time.perf_counter() - start
    write_timings("train_connector", variant, train=seconds)

    adapter.save(out)
    reloaded = ConnectorVariant.load(out, device=device, dtype=spec["dtype"],  # as the study loads it
                                     image_size=spec["image_size"])
    accuracy, generated = caption_accuracy(reloaded, test_images, test_captions)
    tail = losses[-50:]
    report = {"variant": variant, "base": recipe["base"], "base_source": spec["source"], "kind": recipe["kind"],
              "size": adapter.config["size"], "connector_parameters": n_params,
              "image_tokens": adapter.image_tokens, "native_image_tokens": adapter.config["native_image_tokens"],
              "steps": recipe["steps"], "batch_size": recipe["batch_size"], "lr": recipe["lr"],
              "augment": recipe["augment"], "threads": cfg["threads"], "device": device,
              "train_images": n_train, "heldout_images": heldout,
              "final_loss": sum(tail) / max(len(tail), 1), "accuracy": accuracy, "base_accuracy": base_accuracy,
              "examples": [{"reference": r, "generated": g} for r, g in zip(test_captions[:5], generated)]}
    write_json(metrics, report)
    typer.echo(f"train_connector: {variant} trained in {seconds:.0f} s -> {out}; held-out accuracy {accuracy} "
               f"(base {base_accuracy})")


if __name__ == "__main__":
    run(app)
