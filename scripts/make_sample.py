"""Copy what the report stage reads from a project that has run the pipeline into a small folder in the
same layout (the committed sample/ is made this way), so that the report can be regenerated in seconds:

    python scripts/make_sample.py /path/to/project --out sample [--images 300]
    python stages/report.py --inputs sample --out /tmp/report

--images keeps that many images per model (validation images first, then training images, in stem
order) in the per-image tables; the metrics JSONs and score means stay those of the full run.
Caption texts are dropped from the per-caption score tables (the report does not read them).
"""

import shutil
from pathlib import Path

import pandas as pd
import typer
import yaml

app = typer.Typer(add_completion=False)


@app.command()
def main(project: Path, out: Path = typer.Option(Path("sample")),
         images: int = typer.Option(None, help="images kept per model (default: all)")):
    """Copy the report's inputs from PROJECT into OUT."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    kept_params = {"models": {m: {"family": v["family"], "use": v.get("use", "tiny")} for m, v in params["models"].items()},
                   "perturb": {k: params["perturb"][k] for k in ("modes", "levels")},
                   "knn": {"ks": params["knn"]["ks"]}, "report": params["report"],
                   "connectors": {"variants": (params.get("connectors") or {}).get("variants") or {}}}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "params.yaml").write_text("# the params of the run this sample was copied from (scripts/make_sample.py)\n"
                                     + yaml.safe_dump(kept_params, sort_keys=False))
    for model in params["models"]:
        recon = pd.read_csv(project / "data/recon_eval" / model / "per_image.csv")
        order = pd.concat([recon[recon["split"] == "val"], recon[recon["split"] != "val"]])
        stems = set(order["stem"][:images] if images else order["stem"])
        tables = {f"data/knn/{model}/per_image.csv": None, f"data/recon_eval/{model}/per_image.csv": None,
                  **{f"data/scores/{model}/{s}.csv": "caption" for s in ("post", "recon")}}
        for rel, drop in tables.items():
            df = pd.read_csv(project / rel, keep_default_na=False, dtype=str)
            df = df[df["stem"].isin(stems)].drop(columns=[drop] if drop else [])
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            df.to_csv(out / rel, index=False)
        for rel in (f"data/recon_eval/{model}/patch_loss.csv", f"data/scores/{model}/summary.csv",
                    f"metrics/knn/{model}.json", f"metrics/recon_eval/{model}.json",
                    f"metrics/connectors/{model}.json"):  # the last only for connector variants
            if (project / rel).is_file():
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(project / rel, out / rel)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    typer.echo(f"make_sample: {len(params['models'])} models from {project} -> {out} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    app()
