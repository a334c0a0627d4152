"""Stage references: one embedding per image from an outside view (CLIP, DINO, or the toy world's
ground-truth attributes), into data/refs/<space>/<shard>/, and data/refs/<space>/probes.csv: how well
linear probes read the ground-truth attributes from it (conngeo.data.targets), beside chance: a
reference space that carries little of them says little when E_pre or E_post is compared with it."""

from pathlib import Path

import pandas as pd
import torch
import typer
from tqdm import tqdm

from common import load_params, load_reference_model, reference_spec, run
from conngeo import layout
from conngeo.data.images import decode, scan
from conngeo.data.targets import probe_targets
from conngeo.data.vectors import read_embeddings, write_embeddings
from conngeo.geometry import probe_table
from conngeo.references import attribute_embedding

app = typer.Typer(add_completion=False)


@app.command()
def main(
    space: str = typer.Option(..., help="a name from params.yaml references.spaces"),
    root: Path = typer.Option(None, help="image root (default: params data.root)"),
    out: Path = typer.Option(None, help="default data/refs/<space>"),
):
    """Embed every image of every shard (attributes: read attributes.csv instead)."""
    params = load_params()
    data, cfg = params["data"], params["references"]
    spec = reference_spec(space, params)
    root = root or Path(data["root"])
    out = out or layout.data("refs", space)
    folder = scan(root)
    reference = None if spec["kind"] == "attributes" else load_reference_model(spec, params["device"])
    bs, written, skipped = cfg["batch_size"], 0, []
    for shard in folder.shards:
        stems, batches = [], []
        items = folder.shard(shard)
        for i in tqdm(range(0, len(items), bs), desc=f"references {space} {shard}"):
            # the images the extraction skips as unreadable are skipped here too (the same decode)
            kept, images, bad = decode(items[i:i + bs], data["on_bad_image"])
            skipped += bad
            stems += [it.stem for it in kept]
            if kept:
                batches.append(attribute_embedding(Path(spec["source"]), [it.stem for it in kept]) if reference is None
                               else reference.embed(images))
        if not stems:
            raise ValueError(f"{root / shard}: every image of this shard folder is unreadable (all {len(items)} "
                             "skipped); replace them, or move the folder out of the image root")
        write_embeddings(out / shard, stems, torch.cat(batches))
        written += len(stems)
    for path, why in skipped:
        typer.echo(f"references: skipped unreadable image {path}: {why}")
    # how much of the ground truth this outside view carries (conngeo.data.targets), beside chance
    stems, emb = read_embeddings([out / shard for shard in folder.shards])
    targets = probe_targets(root, stems)
    columns = ["space", "target", "kind", "seed", "metric", "score", "chance", "n"]
    probes = pd.DataFrame(probe_table({space: emb}, targets, seeds=params["geometry"]["probe_seeds"]) if targets else [],
                          columns=columns)
    probes[columns].to_csv(out / "probes.csv", index=False, float_format="%.6g")
    typer.echo(f"references: {space}: {written} images from {root} -> {out}; {len(targets)} probe targets")


if __name__ == "__main__":
    run(app)
