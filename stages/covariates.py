"""Stage covariates: what each study image shows, the covariates the report's adjusted tests stratify by.

    python stages/covariates.py --root data/images/toyfood --out data/covariates.csv

One row per image (stem order of the folder): food_count, kinds and plate from the toy world's
attributes.csv, or objects and categories from an imported objects.csv, and every root's reference_words
(conngeo.data.targets.content_covariates).
"""

from pathlib import Path

import typer

from common import run
from conngeo.captions import write_table
from conngeo.data.images import scan
from conngeo.data.targets import content_covariates

app = typer.Typer(add_completion=False)


@app.command()
def main(root: Path = typer.Option(..., help="the image root (params data.root)"),
         out: Path = typer.Option(..., help="the CSV to write")):
    """Write OUT: one row of content covariates per image under ROOT."""
    table = content_covariates(root, scan(root).items)
    write_table(out, {k: ["" if v is None else v for v in values] for k, values in table.items()})
    typer.echo(f"covariates: {len(table['stem'])} images under {root}: {', '.join(list(table)[1:])} -> {out}")


if __name__ == "__main__":
    run(app)
