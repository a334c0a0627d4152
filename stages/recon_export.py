"""Stage recon_export: the reconstructed E_pre of every image, in the extraction's shard format.

    data/recon_vectors/<model>/<shard>/pre.safetensors    the reconstruction of E_pre (from E_post)
    data/recon_vectors/<model>/<shard>/post.safetensors   the original E_post it was reconstructed from
    data/recon_vectors/<model>/<shard>/index.csv          as in data/vectors/<model>/<shard>/

Same shards, stems, token order and dtype as data/vectors/<model>, so everything that reads vectors
reads these (e.g. `connect` of the reconstruction, or the knn stage on --vectors).
"""

import time
from pathlib import Path

import torch
import typer

from common import load_params
from conngeo.data.vectors import read_shard, write_shard
from conngeo.recon import Normalizer, load_reconstructor, reconstruct, stack_tokens

app = typer.Typer(add_completion=False)


@app.command()
def main(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    vectors: Path = typer.Option(None, help="vector shards (default data/vectors/<model>)"),
    recon: Path = typer.Option(None, help="trained reconstructor (default data/recon/<model>)"),
    out: Path = typer.Option(None, help="output shards (default data/recon_vectors/<model>)"),
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's choice)"),
):
    """Reconstruct E_pre from E_post for every image of every shard."""
    if threads:
        torch.set_num_threads(threads)
    device = load_params()["device"]
    vectors = vectors or Path("data/vectors") / model
    recon = recon or Path("data/recon") / model
    out = out or Path("data/recon_vectors") / model
    start = time.perf_counter()
    norm = Normalizer.load(recon / "norm.safetensors")
    net, config = load_reconstructor(recon, device)
    folders = sorted(p for p in vectors.iterdir() if p.is_dir()) if vectors.is_dir() else []
    if not folders:
        raise SystemExit(f"{vectors}: no vector shards; run `dvc repro extract` first")
    images = 0
    for folder in folders:
        shard = read_shard(folder)
        post = stack_tokens(shard.post, shard.stems, str(folder / "post.safetensors"))
        if tuple(post.shape[1:]) != (config.n_post, config.d_post):
            raise SystemExit(f"{folder / 'post.safetensors'}: E_post is {tuple(post.shape[1:])} per image but "
                             f"{recon} was trained on {(config.n_post, config.d_post)}; retrain `dvc repro recon`")
        pre = reconstruct(net, post, norm, device=device).to(shard.pre[0].dtype)
        write_shard(out / folder.name, shard.stems, list(pre), shard.post)
        images += len(shard.stems)
    typer.echo(f"recon_export: {model}: {images} images, {len(folders)} shards -> {out} "
               f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    app()
