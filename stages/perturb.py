"""Stage perturb: captions from perturbed E_post for one model, every mode and level of params perturb,
one model load, into data/perturb/<model>/<mode>/<level>/captions.csv (stem, shard, caption, changed,
fraction, relative_change, reused_from). The work, its resumable units and the join are
conngeo.captions.sweep: an interrupted run redoes at most the window of images it was in.

Split over N processes (e.g. a Slurm array, scripts/slurm/): run `--worker i --workers N` for
i = 0..N-1, then once the plain command (as in dvc.yaml), which joins their parts, and
`python stages/verify.py perturb --model NAME`.
"""

import time
from pathlib import Path

import typer

from common import LazyAdapter, load_model, load_params, model_spec, run, use_threads
from conngeo import layout
from conngeo.captions.sweep import perturbed_captions
from conngeo.data.images import scan
from conngeo.data.vectors import shard_folders

app = typer.Typer(add_completion=False)


@app.command()
def main(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    root: Path = typer.Option(None, help="image root (default: params data.root)"),
    vectors: Path = typer.Option(None, help="extracted vector shards (default data/vectors/<model>)"),
    out: Path = typer.Option(None, help="output folder (default data/perturb/<model>)"),
    worker: int = typer.Option(0, help="this process's number, 0..workers-1 (with --workers)"),
    workers: int = typer.Option(1, help="split the windows of images over this many processes: each writes only "
                                "<out>/parts/<shard>-<start>.csv; a plain run afterwards joins them"),
):
    """Perturb every image's E_post at every mode and level of params perturb, and caption it."""
    if not 0 <= worker < workers:
        raise typer.BadParameter(f"--worker must be in 0..{workers - 1} for --workers {workers}, not {worker}")
    start = time.perf_counter()
    params = load_params()
    use_threads(params["threads"])
    cfg, pcfg = params["captions"], params["perturb"]
    spec = model_spec(model, params)
    out = out or layout.data("perturb", model)
    adapter = LazyAdapter(lambda: load_model(spec, params["device"]))  # not loaded if every unit is done
    summary = perturbed_captions(
        adapter, scan(root or Path(params["data"]["root"])),
        shard_folders(vectors or layout.data("vectors", model), f"dvc repro extract@{model}"), out, spec,
        modes=pcfg["modes"], levels=pcfg["levels"], seed=pcfg["seed"], fill=pcfg["mask_fill"],
        batch_size=cfg["batch_size"], max_new_tokens=cfg["max_new_tokens"], max_window_mb=params["max_window_mb"],
        worker=worker, workers=workers, desc=f"perturb {model}")
    for path in summary["ignored"]:
        typer.echo(f"perturb: recomputed {path}: made from other inputs or settings")
    for name, n in summary.get("sets", {}).items():
        typer.echo(f"perturb: {model} {name}: {n['captioned']} images captioned, {n['reused']} reused (the same "
                   "perturbed E_post as an earlier level)")
    who = f"worker {worker}/{workers}" if workers > 1 else f"{len(summary.get('sets', {}))} caption sets"
    typer.echo(f"perturb: {model}: {who}: {summary['computed']} of {summary['units']} windows of images computed "
               f"now, the rest kept from parts -> {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run(app)
