"""Stage train_connector: replace a base model's connector by another kind (linear, mlp,
resampler<n>, merger), train only the new connector with the caption loss, save the variant under
data/models/<variant> and check its captions on held-out images (conngeo.zoo.variants).

The variant (params connectors.variants.<variant>) is then an ordinary model of the `models`
registry (family: variant), so extract, geometry, recon, captions, perturb and score treat it like any
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
from conngeo.data.images import scan
from conngeo.families.variant import ConnectorVariant
from conngeo.zoo.variants import train_variant

app = typer.Typer(add_completion=False)


@app.command()
def main(variant: str = typer.Option(..., help="a name from params.yaml connectors.variants")):
    """Train a replacement connector between a base's frozen vision encoder and language model."""
    params = load_params()
    cfg = params["connectors"]
    if variant not in cfg["variants"]:
        raise SystemExit(f"unknown variant {variant!r}; params.yaml connectors.variants has {sorted(cfg['variants'])}")
    recipe, device, out = cfg["variants"][variant], params["device"], layout.data("models", variant)
    torch.set_num_threads(cfg["threads"])  # the thread count changes the trained weights' last bits
    items, heldout = scan(Path(cfg["train_root"])).items, params["zoo"]["heldout"]
    n_train = len(items) - heldout
    if cfg["images"]:  # the image budget (real checkpoints): the first `images` training images
        n_train = min(n_train, cfg["images"])
    spec = model_spec(recipe["base"], params)
    start = time.perf_counter()
    with Live(dir=str(layout.live("connectors", variant)), dvcyaml=False, save_dvc_exp=False) as live:
        report = train_variant(
            load_model(spec, device), recipe, items[:n_train], items[len(items) - heldout:], out,
            base_source=spec["source"], base_revision=spec["revision"], seed=cfg["seed"], save_every=cfg["save_every"],
            reload=lambda folder: ConnectorVariant.load(folder, device=device, dtype=spec["dtype"],  # as the study loads it
                                                        image_size=spec["image_size"]),
            log=dvclive_logger(live, prefix="train/"), say=lambda line: typer.echo(f"train_connector: {variant}: {line}"))
    seconds = time.perf_counter() - start
    write_timings("train_connector", variant, train=seconds)
    write_json(layout.details("connectors", variant), {"variant": variant, "base": recipe["base"],
                                                       "base_source": spec["source"], **report,
                                                       "threads": cfg["threads"], "device": device})
    typer.echo(f"train_connector: {variant} trained in {seconds:.0f} s -> {out}; held-out accuracy "
               f"{report['accuracy']} (base {report['base_accuracy']})")


if __name__ == "__main__":
    run(app)
