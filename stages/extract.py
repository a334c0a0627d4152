"""Stage extract: E_pre and E_post of every image for one model, into data/vectors/<model>/<shard>/.

Split over N processes (e.g. a Slurm array, scripts/slurm/): run `--worker i --workers N` for
i = 0..N-1, each writing only its own part files, then once the plain command (as in dvc.yaml), which
joins the parts without loading the model, and `python stages/verify.py vectors --model NAME`.
"""

import shutil
from pathlib import Path

import typer

from common import LazyAdapter, extraction_spec, load_model, load_params, run, use_threads, write_json, write_timings
from conngeo import layout
from conngeo.data.images import scan
from conngeo.data.vectors import resolve_dtype
from conngeo.extraction import extract, extraction_report

app = typer.Typer(add_completion=False)


@app.command()
def main(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    root: Path = typer.Option(None, help="image root (default: params data.root)"),
    out: Path = typer.Option(None, help="output folder (default: data/vectors/<model>)"),
    shards: list[str] = typer.Option(None, help="only these shards (repeatable); default all"),
    skip_existing: bool = typer.Option(True, help="keep finished shards/parts of the same model and images"),
    metrics: Path = typer.Option(None, help="summary JSON (default: metrics/extract/<model>.json)"),
    worker: int = typer.Option(0, help="this process's number, 0..workers-1 (with --workers)"),
    workers: int = typer.Option(1, help="split the work over this many processes: each writes only its own "
                                "part files; a plain run afterwards joins them"),
):
    """Extract E_pre (connector input) and E_post (connector output) per image, resumably. How (device, dtype,
    batch size, threads) is params.yaml's: every knob that can change a number is a param."""
    if not 0 <= worker < workers:
        raise typer.BadParameter(f"--worker must be in 0..{workers - 1} for --workers {workers}, not {worker}")
    if workers > 1 and not skip_existing:
        raise typer.BadParameter("--no-skip-existing would make every worker delete the others' parts; "
                                 "delete the output folder once before starting the workers instead")
    params = load_params()
    use_threads(params["threads"])
    cfg, data, spec = params["extract"], params["data"], extraction_spec(model, params)  # the processor's backend too
    root, out = root or Path(data["root"]), out or layout.data("vectors", model)
    if not skip_existing and out.exists():
        shutil.rmtree(out)
    folder = scan(root, shards=shards or None)
    for line in folder.notes():
        typer.echo(f"extract: {line}")
    # loaded on first use: a run that only joins the workers' parts never needs the model
    adapter = LazyAdapter(lambda: load_model(spec, params["device"]))
    summary = extract(adapter, folder.items, out, spec, setting=f"params.yaml models.{model}.image_size (now "
                      f"{spec['image_size']})", on_bad_image=data["on_bad_image"],
                      store_dtype=resolve_dtype(spec["store_dtype"]), batch_size=cfg["batch_size"],
                      save_every=cfg["save_every"], worker=worker, workers=workers, num_workers=cfg["num_workers"])
    if workers > 1:  # the metrics belong to the joining run, which sees every shard
        typer.echo(f"extract: {model}: worker {worker}/{workers} wrote its parts under {out} ({summary['shards']}) "
                   f"in {summary['seconds']} s")
        return
    for stem, why in summary["skipped"]:
        typer.echo(f"extract: skipped unreadable image {stem}: {why}")
    write_json(metrics or layout.details("extract", model), extraction_report(summary, spec, folder))
    write_timings("extract", model, total=summary["seconds"], load=adapter.load_seconds)
    typer.echo(f"extract: {model}: {summary['images']} images from {root} -> {out}: {summary['computed']} encoded "
               f"now, the rest kept from finished shards or parts ({summary['shards']}) in {summary['seconds']} s")

if __name__ == "__main__":
    run(app)
