"""Stage recon_export: the reconstructed E_pre of every image, in the extraction's shard format.

    data/recon_vectors/<model>/<shard>/pre.safetensors    the reconstruction of E_pre (from E_post)
    data/recon_vectors/<model>/<shard>/index.csv          stem, pre_tokens (row order = token order)
    data/recon_vectors/<model>/<shard>/fingerprint.json   the reconstructor and vectors it came from

Same shards, stems, token order and dtype as data/vectors/<model>'s E_pre, so everything that reads
vectors reads these (e.g. `connect` of the reconstruction). The E_post they came from stays in
data/vectors (not copied). Written a batch of images at a time (params recon.batch_size, within
max_window_mb), so memory does not grow with the number of images. A shard finished by an interrupted
run of the same reconstructor on the same vectors is kept (conngeo.recon.study.export_reconstructions).
"""

import time
from pathlib import Path

import typer

from common import load_params, run, use_threads
from conngeo import layout
from conngeo.data.vectors import shard_folders
from conngeo.recon.study import export_reconstructions

app = typer.Typer(add_completion=False)


@app.command()
def main(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    vectors: Path = typer.Option(None, help="vector shards (default data/vectors/<model>)"),
    out: Path = typer.Option(None, help="output shards (default data/recon_vectors/<model>)"),
):
    """Reconstruct E_pre from E_post for every image of every shard."""
    params = load_params()
    use_threads(params["threads"])
    out, start = out or layout.data("recon_vectors", model), time.perf_counter()
    done = export_reconstructions(shard_folders(vectors or layout.data("vectors", model), f"dvc repro extract@{model}"),
                                  layout.data("recon", model), out, batch_size=params["recon"]["batch_size"],
                                  max_window_mb=params["max_window_mb"], device=params["device"],
                                  remedy=f"retrain `dvc repro recon@{model}`")
    typer.echo(f"recon_export: {model}: {done['images']} images in {done['shards'] - done['kept']} shards -> {out} "
               f"({done['kept']} shards kept from an interrupted run) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run(app)
