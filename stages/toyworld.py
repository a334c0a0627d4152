"""Stage toyworld: generate the toy-food world (study images and the disjoint training split)."""

from pathlib import Path

import typer
from tqdm import tqdm

from common import run
from conngeo.data import toyworld

app = typer.Typer(add_completion=False)


@app.command()
def main(
    out: Path = typer.Option(Path("data/images/toyfood"), help="root of the study images"),
    train_out: Path = typer.Option(Path("data/images/toyfood_train"), help="root of the training split"),
    seed: int = typer.Option(0, help="world seed; study and training images derive disjoint seeds from it"),
    shards: int = typer.Option(2, help="study shards"),
    images_per_shard: int = typer.Option(1000, help="study images per shard"),
    train_shards: int = typer.Option(4, help="training shards"),
    train_images_per_shard: int = typer.Option(1000, help="training images per shard"),
    image_size: int = typer.Option(48, help="image side in pixels"),
):
    """Write <root>/<shard>/<stem>.png + .txt, attributes.csv and vocab.txt for both splits."""
    for split, root, n_shards, per_shard in (("study", out, shards, images_per_shard),
                                             ("train", train_out, train_shards, train_images_per_shard)):
        n = toyworld.generate(root, split=split, seed=seed, shards=n_shards, images_per_shard=per_shard,
                              size=image_size, progress=lambda jobs: tqdm(jobs, desc=f"toyworld {split}"))
        typer.echo(f"toyworld: wrote {n} {split} images of {image_size}px to {root}")


if __name__ == "__main__":
    run(app)
