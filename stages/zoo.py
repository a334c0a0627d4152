"""Stage zoo: train one tiny checkpoint of a real VLM class on the toy-food world, save it in
Hugging Face format under data/models/<name>, and check its captions on held-out images.

Families that freeze a pretrained encoder (LLaVA, Idefics2) name the pretrain product they take it
from (`Adapter.frozen_encoder`: clip, siglip) and load it themselves (`load_frozen_encoder`).

Threads (params zoo.threads): measured train steps (batch 32, ms, 1 vs 2 threads, idle 2-core
machine): llava 29 vs 20, idefics2 59 vs 40, qwen3.5 93 vs 66. A second busy process turns that
around (llava 62 vs 83 ms in an earlier measurement, and a 2-thread run once stalled to ~750 ms per
step beside other jobs): set 1 on a shared machine.
"""

import time
from pathlib import Path

import typer
import torch
from dvclive import Live

from common import dvclive_logger, load_params, run, write_json, write_timings
from conngeo import layout
from conngeo.data.images import load_image, scan
from conngeo.models import adapter_class
from conngeo.models.tokenizer import build_tokenizer, read_vocab
from conngeo.models.zoo import caption_accuracy, train_captioner

app = typer.Typer(add_completion=False)


@app.command()
def main(
    model: str = typer.Option(..., help="a name from params.yaml zoo.models"),
    train_root: Path = typer.Option(Path("data/images/toyfood_train"), help="training split"),
    pretrained: Path = typer.Option(Path("data/models"), help="folder of the pretrain stage's models (clip, siglip): "
                                    "frozen-encoder families take their vision tower from <pretrained>/<frozen_encoder>"),
    out: Path = typer.Option(None, help="checkpoint folder (default data/models/<model>)"),
):
    """Train, save with save_pretrained, reload from disk and report caption accuracy per attribute."""
    params = load_params()
    zoo, size = params["zoo"], params["toyworld"]["toyfood"]["image_size"]
    torch.set_num_threads(zoo["threads"])
    recipe = zoo["models"][model]
    out = out or layout.data("models", model)
    cls = adapter_class(recipe["family"])

    items = scan(train_root).items
    images = [load_image(it.path) for it in items]
    captions = [it.caption for it in items]
    n_train = len(items) - zoo["heldout"]
    tokenizer = build_tokenizer(read_vocab(train_root / "vocab.txt"), cls.special_tokens)
    vision = cls.load_frozen_encoder(pretrained / cls.frozen_encoder) if cls.frozen_encoder else None
    adapter = cls.tiny(tokenizer, size, vision_encoder=vision, seed=zoo["seed"])
    n_params = sum(p.numel() for p in adapter.model.parameters())
    typer.echo(f"zoo: {model} ({recipe['family']}), {n_params / 1e6:.2f}M parameters, "
               f"{n_train} training images, {zoo['heldout']} held out"
               + (f", frozen {cls.frozen_encoder} encoder" if cls.frozen_encoder else ""))

    start = time.perf_counter()
    with Live(dir=str(layout.live("zoo", model)), dvcyaml=False, save_dvc_exp=False) as live:
        log = dvclive_logger(live, prefix="train/")
        train_captioner(adapter, images[:n_train], captions[:n_train], steps=recipe["steps"],
                        batch_size=recipe["batch_size"], lr=recipe["lr"], seed=zoo["seed"],
                        augment=recipe["augment"], log=log, heldout=(images[n_train:], captions[n_train:]),
                        eval_every=zoo["eval_every"])
    seconds = time.perf_counter() - start
    write_timings("zoo", model, train=seconds)

    adapter.save(out)
    reloaded = cls.load(str(out))  # the study loads it exactly as it would a hub checkpoint
    accuracy, generated = caption_accuracy(reloaded, images[n_train:], captions[n_train:])
    report = {"family": recipe["family"], "parameters": n_params, "frozen_encoder": cls.frozen_encoder,
              "steps": recipe["steps"], "batch_size": recipe["batch_size"], "lr": recipe["lr"],
              "augment": recipe["augment"],
              "threads": zoo["threads"], "train_images": n_train,
              "heldout_images": zoo["heldout"], "accuracy": accuracy,
              "examples": [{"reference": r, "generated": g} for r, g in zip(captions[n_train:n_train + 5], generated)]}
    write_json(layout.details("zoo", model), report)
    typer.echo(f"zoo: {model} trained in {seconds:.0f} s; held-out accuracy {accuracy}")


if __name__ == "__main__":
    run(app)
