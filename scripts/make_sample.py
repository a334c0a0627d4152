"""Copy what the report stage reads from a project that has run the pipeline into a small folder in the
same layout (conngeo.layout; the committed sample/ is made this way), so that the report can be
regenerated in seconds, with no model and no `dvc repro`:

    python scripts/make_sample.py /path/to/project --out sample --images 120
    python stages/report.py --inputs sample --out /tmp/report

--images keeps that many images per model (test images first, then the others, in stem order) in the
per-image tables; dataset-level numbers (the metrics JSONs, probes, score means) stay those of the full
run, and params.yaml is copied whole. The examples page needs images: the sample carries a thumbnail
(conngeo.report.examples.thumbnail, params report.examples.thumbnail) and the references of every kept image
and of the neighbours that the page shows, in the image root's layout under the same relative data.root
(an absolute data.root becomes data/images/<its name> in the sample's params.yaml).
"""

import json
import shutil
from pathlib import Path

import pandas as pd
import typer
import yaml

from conngeo import layout
from conngeo.report import examples

app = typer.Typer(add_completion=False)


def copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dest)


@app.command()
def main(project: Path, out: Path = typer.Option(Path("sample"), help="the sample folder (replaced)"),
         images: int = typer.Option(None, help="images kept per model (default: all)")):
    """Copy the report's inputs from PROJECT into OUT."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    copy(project / "params.yaml", out / "params.yaml")
    root = Path(params["data"]["root"])
    sample_root = root if not root.is_absolute() else Path("data/images") / root.name
    if sample_root != root:
        params["data"]["root"] = sample_root.as_posix()
        (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shown = params["report"]["examples"]
    wanted = set()  # the images whose thumbnails the sample carries
    for space in params["references"]["spaces"]:
        copy(layout.data("refs", space, project) / "probes.csv", layout.data("refs", space, out) / "probes.csv")
    for model in params["models"]:
        split = pd.read_csv(layout.data("recon_eval", model, project) / "per_image.csv", keep_default_na=False,
                            dtype=str)
        order = pd.concat([split[split["split"] == "test"], split[split["split"] != "test"]])["stem"]
        stems = set(order[:images] if images else order)
        wanted |= stems
        per_image = [layout.data("geometry", model, project) / "per_image.csv",
                     layout.data("recon_eval", model, project) / "per_image.csv",
                     layout.data("captions", model, project) / "captions.csv",
                     *[p for p in sorted(layout.data("scores", model, project).glob("*.csv")) if p.name != "summary.csv"]]
        for path in per_image:
            table = pd.read_csv(path, keep_default_na=False, dtype=str)
            dest = out / path.relative_to(project)
            dest.parent.mkdir(parents=True, exist_ok=True)
            table[table["stem"].isin(stems)].to_csv(dest, index=False)
        neighbours = examples.read_neighbours(project, model)
        if neighbours is not None:  # and the neighbours the page shows: the images of the largest and smallest change
            neighbours = neighbours[neighbours.index.isin(stems)]
            neighbours.to_csv(layout.data("geometry", model, out) / "neighbours.csv")
            geometry = pd.read_csv(layout.data("geometry", model, out) / "per_image.csv", dtype={"stem": str}).set_index("stem")
            k = params["report"]["k"] or max(json.loads(layout.details("geometry", model, project).read_text())["ks"])
            change = 1.0 - geometry.loc[geometry.index.isin(neighbours.index), f"knor_pre_post@{k}"]  # as stages/report.py
            for stem in sum(examples.extremes(change, shown["neighbourhoods"]), []):
                wanted |= set(sum(examples.neighbour_lists(neighbours, stem, shown["neighbours"]), []))
        else:
            typer.echo(f"make_sample: {model}: no neighbours table (rerun `dvc repro geometry@{model}`); the sample's page "
                       "will say so")
        for path in (layout.data("geometry", model, project) / "probes.csv",
                     layout.data("recon_eval", model, project) / "patch_loss.csv",
                     layout.data("scores", model, project) / "summary.csv",
                     layout.details("geometry", model, project), layout.details("recon_eval", model, project)):
            if path.is_file():
                copy(path, out / path.relative_to(project))
    found = examples.find_images(project / root)
    for stem in sorted(wanted & set(found)):
        item = found[stem]
        examples.save_jpeg(examples.thumbnail(item.path, shown["thumbnail"]),
                           out / sample_root / item.shard / f"{stem}.jpg")
        if item.path.with_suffix(".txt").is_file():
            copy(item.path.with_suffix(".txt"), out / sample_root / item.shard / f"{stem}.txt")
    if wanted - set(found):
        typer.echo(f"make_sample: {len(wanted - set(found))} images not found under {project / root}: no thumbnails")
    covariates = pd.read_csv(layout.covariates(project), keep_default_na=False, dtype=str)
    layout.covariates(out).parent.mkdir(parents=True, exist_ok=True)
    covariates[covariates["stem"].isin(wanted)].to_csv(layout.covariates(out), index=False)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    typer.echo(f"make_sample: {len(params['models'])} models from {project} -> {out} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    app()
