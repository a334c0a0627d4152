"""Stage geometry: the geometry of one model's E_pre and E_post, per image and per dataset
(conngeo.geometry.study).

    neighbourhoods   KNOR, kNN Jaccard and mutual kNN of pre vs post and of each against every reference
                     space; linear CKA and the orthogonal Procrustes residual per pair
    distortion       per image, how unevenly E_pre -> E_post stretches the distances to its neighbours
    spectra          effective rank and top-k energy per image (token matrix) and per dataset (pooled)
    probes           linear probes of the ground-truth attributes (conngeo.data.targets) from pooled
                     E_pre and E_post: what the connector keeps and loses in the world's own terms

    neighbours       per image, the stems of its geometry.neighbours nearest images in E_pre and in E_post
                     (the report's examples page shows them side by side)

Writes data/geometry/<model>/per_image.csv, neighbours.csv, probes.csv and metrics/geometry/<model>.json. The
vectors are pooled a window of images at a time (params max_window_mb).
"""

from pathlib import Path

import typer

from common import load_params, run, use_threads, write_json
from conngeo import layout
from conngeo.data.vectors import VectorReader, shard_folders
from conngeo.geometry.study import model_geometry

app = typer.Typer(add_completion=False)


@app.command()
def main(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    refs: Path = typer.Option(Path("data/refs"), help="reference embeddings, one folder per reference"),
):
    """pre vs post, pre/post vs each reference, at every k of params geometry.ks (clipped to N-1); spectra; probes."""
    params = load_params()
    use_threads(params["threads"])
    cfg = params["geometry"]
    reader = VectorReader(shard_folders(layout.data("vectors", model), f"dvc repro extract@{model}"))
    summary = model_geometry(
        reader, {ref: refs / ref for ref in params["references"]["spaces"]}, layout.data("geometry", model),
        root=Path(params["data"]["root"]), ks=cfg["ks"], metric=cfg["metric"], pooling=cfg["pooling"],
        top_k_energy=cfg["top_k_energy"], neighbours=cfg["neighbours"], max_block_mb=cfg["max_block_mb"],
        probe_seeds=cfg["probe_seeds"], max_window_mb=params["max_window_mb"], produced_by="dvc repro references@{}")
    write_json(layout.details("geometry", model), summary)
    pp = summary["pairs"]["pre_post"]
    typer.echo(f"geometry: {model}: N={summary['images']}, " + ", ".join(
        f"KNOR@{k} pre/post {pp[f'knor@{k}']:.3f} (chance {pp[f'chance@{k}']:.3f})" for k in summary["ks"])
        + f"; {len({key.split(':', 1)[1] for key in summary['probes']})} probe targets")


if __name__ == "__main__":
    run(app)
