"""Copy what the report stage reads from a project that has run the pipeline into a small folder in the
same layout (conngeo.layout; the committed sample/ is made this way), so that the report can be
regenerated in seconds, with no model and no `dvc repro`:

    python scripts/make_sample.py /path/to/project --out sample --images 120
    python stages/report.py --inputs sample --out /tmp/report

--images keeps that many images per model (test images first, then the others, in stem order) in the
per-image tables; dataset-level numbers (the metrics JSONs, probes, score means) stay those of the full
run, and params.yaml is copied whole.
"""

import shutil
from pathlib import Path

import pandas as pd
import typer
import yaml

from conngeo import layout

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
    for space in params["references"]["spaces"]:
        copy(layout.data("refs", space, project) / "probes.csv", layout.data("refs", space, out) / "probes.csv")
    kept = set()
    for model in params["models"]:
        split = pd.read_csv(layout.data("recon_eval", model, project) / "per_image.csv", keep_default_na=False,
                            dtype=str)
        order = pd.concat([split[split["split"] == "test"], split[split["split"] != "test"]])["stem"]
        stems = set(order[:images] if images else order)
        kept |= stems
        per_image = [layout.data("knn", model, project) / "per_image.csv",
                     layout.data("recon_eval", model, project) / "per_image.csv",
                     layout.data("captions", model, project) / "captions.csv",
                     *[p for p in sorted(layout.data("scores", model, project).glob("*.csv")) if p.name != "summary.csv"]]
        for path in per_image:
            table = pd.read_csv(path, keep_default_na=False, dtype=str)
            dest = out / path.relative_to(project)
            dest.parent.mkdir(parents=True, exist_ok=True)
            table[table["stem"].isin(stems)].to_csv(dest, index=False)
        for path in (layout.data("knn", model, project) / "probes.csv",
                     layout.data("recon_eval", model, project) / "patch_loss.csv",
                     layout.data("scores", model, project) / "summary.csv",
                     layout.details("knn", model, project), layout.details("recon_eval", model, project)):
            if path.is_file():
                copy(path, out / path.relative_to(project))
    covariates = pd.read_csv(layout.covariates(project), keep_default_na=False, dtype=str)
    layout.covariates(out).parent.mkdir(parents=True, exist_ok=True)
    covariates[covariates["stem"].isin(kept)].to_csv(layout.covariates(out), index=False)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    typer.echo(f"make_sample: {len(params['models'])} models from {project} -> {out} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    app()
