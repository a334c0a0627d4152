"""Stage references: one embedding per image from an outside view (CLIP, DINO, or the toy world's
ground-truth attributes), into data/refs/<space>/<shard>/."""

from pathlib import Path

import torch
import typer
from tqdm import tqdm

from common import load_params, load_reference_model, reference_spec
from conngeo.data.images import load_image, scan
from conngeo.data.vectors import write_embeddings
from conngeo.models.references import attribute_embedding

app = typer.Typer(add_completion=False)


@app.command()
def main(
    space: str = typer.Option(..., help="a name from params.yaml references.spaces"),
    root: Path = typer.Option(None, help="image root (default: params data.root)"),
    out: Path = typer.Option(None, help="default data/refs/<space>"),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: params device)"),
):
    """Embed every image of every shard (attributes: read attributes.csv instead)."""
    params = load_params()
    data, cfg = params["data"], params["references"]
    spec = reference_spec(space, params)
    root = root or Path(data["root"])
    out = out or Path("data/refs") / space
    folder = scan(root, on_bad_image=data["on_bad_image"])
    if spec["kind"] == "attributes":
        embed = lambda items: attribute_embedding(Path(spec["source"]), [it.stem for it in items])  # noqa: E731
    else:
        reference = load_reference_model(spec, device or params["device"])
        embed = lambda items: reference.embed([load_image(it.path) for it in items])  # noqa: E731
    bs = cfg["batch_size"]
    for shard in folder.shards:
        items = folder.shard(shard)
        batches = [embed(items[i:i + bs]) for i in tqdm(range(0, len(items), bs), desc=f"references {space} {shard}")]
        write_embeddings(out / shard, [it.stem for it in items], torch.cat(batches))
    typer.echo(f"references: {space}: {len(folder)} images from {root} -> {out}")


if __name__ == "__main__":
    app()
