"""Stage captions: per image, the greedy caption from the original E_post and from connector(reconstructed
E_pre), into data/captions/<model>/captions.csv (stem, shard, reference, post, recon).

    post   generated from E_post as extracted (data/vectors/<model>): the model's own caption
    recon  generated from adapter.connect(E_pre reconstructed from E_post) (data/recon_vectors/<model>,
           written by recon_export): what the language model says when the connector sees the reconstruction
"""

import json
import time
from pathlib import Path

import torch
import typer

from common import load_params, model_spec
from conngeo.captions import captions_from_recon, generate_captions, write_table
from conngeo.captions.inputs import match_images, shard_folders
from conngeo.data.images import scan
from conngeo.data.vectors import read_shard
from conngeo.models import load_adapter

app = typer.Typer(add_completion=False)


@app.command()
def main(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    root: Path = typer.Option(None, help="image root (default: params data.root)"),
    vectors: Path = typer.Option(None, help="extracted vector shards (default data/vectors/<model>)"),
    recon_vectors: Path = typer.Option(None, help="reconstructed E_pre shards (default data/recon_vectors/<model>)"),
    recon: bool = typer.Option(True, help="--no-recon: no recon column (no reconstructor available)"),
    out: Path = typer.Option(None, help="output folder (default data/captions/<model>)"),
    metrics: Path = typer.Option(None, help="summary JSON (default metrics/captions/<model>.json)"),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: params captions.device)"),
    batch_size: int = typer.Option(None, help="images per generate call (default: params captions.batch_size)"),
    max_new_tokens: int = typer.Option(None, help="default: params captions.max_new_tokens"),
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's choice)"),
):
    """Greedy captions from E_post and from connector(reconstructed E_pre), for every image."""
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    params = load_params()
    cfg, data = params["captions"], params["data"]
    spec = model_spec(model, params)
    root = root or Path(data["root"])
    vectors = vectors or Path("data/vectors") / model
    recon_vectors = recon_vectors or Path("data/recon_vectors") / model
    out = out or Path("data/captions") / model
    batch_size = batch_size or cfg["batch_size"]
    max_new_tokens = max_new_tokens or cfg["max_new_tokens"]

    folder = scan(root, on_bad_image=data["on_bad_image"])
    adapter = load_adapter(spec["family"], spec["source"], revision=spec["revision"],
                           device=device or cfg.get("device", "cpu"), dtype=spec["dtype"], prompt=spec["prompt"])
    table = {"stem": [], "shard": [], "reference": [], "post": []} | ({"recon": []} if recon else {})
    for shard_folder in shard_folders(vectors, f"dvc repro extract@{model}"):
        shard = read_shard(shard_folder)
        items = match_images(folder, shard.stems, str(shard_folder))
        paths = [it.path for it in items]
        table["stem"] += shard.stems
        table["shard"] += [shard_folder.name] * len(items)
        table["reference"] += [it.caption or "" for it in items]
        table["post"] += generate_captions(adapter, paths, shard.post, batch_size=batch_size,
                                           max_new_tokens=max_new_tokens, desc=f"captions {model} {shard_folder.name} post")
        if recon:
            recon_folder = recon_vectors / shard_folder.name
            if not recon_folder.is_dir():
                raise SystemExit(f"{recon_folder}: no reconstructed E_pre for shard {shard_folder.name}; run "
                                 f"`dvc repro recon_export@{model}` first (or pass --no-recon)")
            recon_shard = read_shard(recon_folder)
            if recon_shard.stems != shard.stems:
                raise SystemExit(f"{recon_folder}: stems differ from {shard_folder}; rerun `dvc repro recon_export@{model}`")
            table["recon"] += captions_from_recon(adapter, paths, recon_shard.pre, batch_size=batch_size,
                                                  max_new_tokens=max_new_tokens,
                                                  desc=f"captions {model} {shard_folder.name} recon")
    write_table(out / "captions.csv", table)

    n = len(table["stem"])
    summary = {"model": spec, "images": n, "max_new_tokens": max_new_tokens,
               "missing_references": sum(not r for r in table["reference"]),
               "empty_post": sum(not c.strip() for c in table["post"])}
    if recon:
        summary["empty_recon"] = sum(not c.strip() for c in table["recon"])
        summary["recon_equals_post"] = sum(a == b for a, b in zip(table["post"], table["recon"])) / max(n, 1)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    metrics = metrics or Path("metrics/captions") / f"{model}.json"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps(summary, indent=2) + "\n")
    typer.echo(f"captions: {model}: {n} images from {vectors}"
               f"{' and ' + str(recon_vectors) if recon else ''} -> {out / 'captions.csv'} in {summary['seconds']} s")


if __name__ == "__main__":
    app()
