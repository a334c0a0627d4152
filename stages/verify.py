"""Check that a finished (e.g. sharded, cluster-run) output is complete before recording it with DVC.

    python stages/verify.py images                    every image of the root decodes (listing a folder opens none)
    python stages/verify.py vectors --model llava     data/vectors/llava against the image root
    python stages/verify.py captions --model llava    data/captions/llava/captions.csv against the vectors
    python stages/verify.py perturb --model llava     every data/perturb/llava/<mode>/<level>/captions.csv

Exits 1 listing every problem (a missing or doubled stem, an index that disagrees with its tensors,
a fingerprint of another model spec, a part or temporary file left behind); exits 0 when complete.
"""

from pathlib import Path

import typer

from common import extraction_spec, load_params, run
from conngeo import layout
from conngeo.captions.inputs import shard_folders
from conngeo.captions.parts import verify_table
from conngeo.captions.sweep import set_names, verify_sets
from conngeo.data.images import check_images, scan
from conngeo.data.vectors import read_index
from conngeo.extraction import verify as verify_extraction

app = typer.Typer(add_completion=False)


def report(what: str, problems: list[str], ok: str) -> None:
    for problem in problems:
        typer.echo(f"verify {what}: {problem}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"verify {what}: ok, {ok}")


@app.command()
def images(root: Path = typer.Option(None, help="image root (default: params data.root)")):
    """Every image of the root decodes; lists each one that does not, with the reason."""
    root = root or Path(load_params()["data"]["root"])
    folder = scan(root)
    for empty in folder.empty_shards:  # listed, not a problem: there is nothing in it to lose
        typer.echo(f"verify images: {empty}: a shard folder with no .png/.jpg/.jpeg image, left out")
    bad = check_images(folder)
    report("images", [f"{path}: cannot read image ({why}); replace or delete it, or set data.on_bad_image: skip"
                      for path, why in bad], f"{len(folder)} images in {len(folder.shards)} shards under {root}")


@app.command()
def vectors(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    root: Path = typer.Option(None, help="image root (default: params data.root)"),
    out: Path = typer.Option(None, help="the extraction's output (default: data/vectors/<model>)"),
):
    """Every image of the root exactly once in data/vectors/<model>, consistent, no partial files."""
    params = load_params()
    spec = extraction_spec(model, params)
    out = out or layout.data("vectors", model)
    folder = scan(root or Path(params["data"]["root"]))
    report(f"vectors {model}", verify_extraction(folder.items, out, spec),
           f"{len(folder.items)} images in {len(folder.shards)} shards under {out}")


@app.command()
def captions(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    vectors: Path = typer.Option(None, help="extracted vector shards (default data/vectors/<model>)"),
    out: Path = typer.Option(None, help="the captions' output folder (default data/captions/<model>)"),
):
    """Every stem of the vectors exactly once, in order, in captions.csv; no partial files."""
    vectors = vectors or layout.data("vectors", model)
    out = out or layout.data("captions", model)
    stems = [r[0] for f in shard_folders(vectors, f"dvc repro extract@{model}") for r in read_index(f)]
    report(f"captions {model}", verify_table(out / "captions.csv", stems), f"{len(stems)} images in {out}")


@app.command()
def perturb(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    vectors: Path = typer.Option(None, help="extracted vector shards (default data/vectors/<model>)"),
    out: Path = typer.Option(None, help="the perturb stage's output folder (default data/perturb/<model>)"),
):
    """Every stem of the vectors exactly once, in order, in the table of every mode and level of params
    perturb; no partial files."""
    pcfg = load_params()["perturb"]
    vectors = vectors or layout.data("vectors", model)
    out = out or layout.data("perturb", model)
    names = set_names(pcfg["modes"], pcfg["levels"])
    stems = [r[0] for f in shard_folders(vectors, f"dvc repro extract@{model}") for r in read_index(f)]
    report(f"perturb {model}", verify_sets(out, names, stems),
           f"{len(stems)} images x {len(names)} caption sets in {out}")


if __name__ == "__main__":
    run(app)
