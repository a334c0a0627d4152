"""Stage captions: per image, the greedy caption from the original E_post and from connector(reconstructed
E_pre), into data/captions/<model>/captions.csv (stem, shard, post, recon, recon_post_mse_z). The last
is the error that reaches the language model: mean over tokens and features of
((connector(reconstructed E_pre) - E_post) / std)^2, in the z-units of E_post (the reconstructor's
training statistics). The reference captions stay beside the images (<stem>.txt);
metrics/captions/<model>.json records the generation settings. The work, its resumable units and the join
are conngeo.captions.post_recon.

    post   generated from E_post as extracted (data/vectors/<model>): the model's own caption
    recon  generated from adapter.connect(E_pre reconstructed from E_post) (data/recon_vectors/<model>,
           written by recon_export): what the language model says when the connector sees the reconstruction

Split over N processes (e.g. a Slurm array, scripts/slurm/): run `--worker i --workers N` for
i = 0..N-1, then once the plain command (as in dvc.yaml), which joins their parts
(conngeo.captions.parts), and `python stages/verify.py captions --model NAME`.
"""

import time
from pathlib import Path

import typer

from common import LazyAdapter, load_model, load_params, model_spec, run, use_threads, write_json, write_timings
from conngeo import layout
from conngeo.captions.post_recon import post_and_recon_captions
from conngeo.data.images import scan
from conngeo.data.vectors import shard_folders

app = typer.Typer(add_completion=False)


@app.command()
def main(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    vectors: Path = typer.Option(None, help="extracted vector shards (default data/vectors/<model>)"),
    recon: bool = typer.Option(True, help="--no-recon: no recon column (no reconstructor available; "
                               "the column's absence is the record)"),
    out: Path = typer.Option(None, help="output folder (default data/captions/<model>)"),
    metrics: Path = typer.Option(None, help="summary JSON (default metrics/captions/<model>.json)"),
    worker: int = typer.Option(0, help="this process's number, 0..workers-1 (with --workers)"),
    workers: int = typer.Option(1, help="split the batches over this many processes: each writes only "
                                "<out>/parts/<shard>-<start>.csv; a plain run afterwards joins them"),
):
    """Greedy captions from E_post and from connector(reconstructed E_pre), for every image."""
    start = time.perf_counter()
    params = load_params()
    use_threads(params["threads"])
    cfg, spec = params["captions"], model_spec(model, params)
    vectors, out = vectors or layout.data("vectors", model), out or layout.data("captions", model)
    # loaded on first use: a run that only joins the workers' parts never needs the model
    adapter = LazyAdapter(lambda: load_model(spec, params["device"]))
    summary = post_and_recon_captions(
        adapter, scan(Path(params["data"]["root"])), shard_folders(vectors, f"dvc repro extract@{model}"), out, spec,
        recon_vectors=layout.data("recon_vectors", model) if recon else None, recon_dir=layout.data("recon", model),
        batch_size=cfg["batch_size"], max_new_tokens=cfg["max_new_tokens"], worker=worker, workers=workers,
        remedy=f"run `dvc repro recon_export@{model}` first (or pass --no-recon)", desc=f"captions {model}")
    for path in summary.pop("ignored"):
        typer.echo(f"captions: ignoring {path}: made from other inputs or settings")
    computed = summary.pop("computed")
    if workers > 1:  # the table and metrics belong to the joining run
        typer.echo(f"captions: {model}: worker {worker}/{workers}: {computed} images captioned -> {out / 'parts'} "
                   f"in {time.perf_counter() - start:.1f} s")
        return
    write_json(metrics or layout.details("captions", model), {"model": spec, **summary})
    write_timings("captions", model, total=time.perf_counter() - start, load=adapter.load_seconds)
    typer.echo(f"captions: {model}: {summary['images']} images from {vectors} -> {out / 'captions.csv'} ({computed} "
               f"captioned now, {summary['images'] - computed} kept from earlier parts) in "
               f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run(app)
