"""Stage manifest: one small file that stands for a folder of images in the stages' dependencies.

    python stages/manifest.py --root data/images/toyfood --out data/manifests/study.csv

Lists every file under ROOT (relative path, size, MD5) in path order. The stages that read the images
depend on this file instead of the folder, so DVC hashes the folder once per `dvc repro` (in this
stage) rather than once per dependent stage: with 2,000 images and 24 dependent stages that was most
of a no-op `dvc repro`. Any change to any file under ROOT changes the manifest and so reruns them.
"""

import csv
import hashlib
from pathlib import Path

import typer

from common import run

app = typer.Typer(add_completion=False)


@app.command()
def main(root: Path = typer.Option(..., help="the folder (e.g. params data.root)"),
         out: Path = typer.Option(..., help="the manifest CSV to write")):
    """Write OUT: path, bytes and MD5 of every file under ROOT."""
    if not root.is_dir():
        raise SystemExit(f"{root}: no such folder; generate or import the images first (README, Data)")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "bytes", "md5"])
        for p in files:
            writer.writerow([p.relative_to(root).as_posix(), p.stat().st_size, hashlib.md5(p.read_bytes()).hexdigest()])
    tmp.replace(out)
    typer.echo(f"manifest: {len(files)} files under {root} -> {out}")


if __name__ == "__main__":
    run(app)
