"""Stage knn: neighbourhood overlap of E_pre vs E_post, each against the reference spaces, and spectra."""

import json
from pathlib import Path

import pandas as pd
import torch
import typer

from common import load_params
from conngeo.data.vectors import is_complete, read_embeddings, read_vectors
from conngeo.geometry import pool
from conngeo.geometry.compare import compare_spaces, spectra_summary

app = typer.Typer(add_completion=False)


def shard_folders(root: Path) -> list[Path]:
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders or not all(is_complete(f) for f in folders):
        raise SystemExit(f"{root}: missing or incomplete vector shards; run `dvc repro extract` first")
    return folders


@app.command()
def main(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    vectors: Path = typer.Option(None, help="default data/vectors/<model>"),
    refs: Path = typer.Option(Path("data/refs"), help="reference embeddings, one folder per reference"),
    out: Path = typer.Option(None, help="per-image CSV folder (default data/knn/<model>)"),
    metrics: Path = typer.Option(None, help="default metrics/knn/<model>.json"),
):
    """pre vs post, pre/post vs each reference, at every k of params knn.ks (clipped to N-1)."""
    params = load_params()
    cfg = params["knn"]
    shard = read_vectors(shard_folders(vectors or Path("data/vectors") / model))
    name = str(vectors or Path("data/vectors") / model)
    spaces = {"pre": pool(shard.pre, cfg["pooling"], name=f"{name} pre"),
              "post": pool(shard.post, cfg["pooling"], name=f"{name} post")}
    pairs = [("pre", "post")]
    for ref in params["references"]["spaces"]:
        folder = refs / ref
        stems, emb = read_embeddings(sorted(p for p in folder.iterdir() if p.is_dir()))
        position = {s: i for i, s in enumerate(stems)}
        missing = [s for s in shard.stems if s not in position]
        if missing:
            raise SystemExit(f"{folder}: no embedding for {len(missing)} images (e.g. {missing[:3]}); "
                             "rerun `dvc repro references` on the same images")
        spaces[ref] = emb[torch.tensor([position[s] for s in shard.stems])].float()
        pairs += [("pre", ref), ("post", ref)]

    per_image, summary = compare_spaces(spaces, pairs, cfg["ks"], metric=cfg["metric"],
                                        max_block_bytes=cfg["max_block_mb"] << 20)
    spectra_rows, spectra = spectra_summary({"pre": shard.pre, "post": shard.post},
                                            {"pre": spaces["pre"], "post": spaces["post"]}, cfg["top_k_energy"])
    summary["spectra"] = spectra
    out = out or Path("data/knn") / model
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"stem": shard.stems, **{k: v.numpy() for k, v in {**per_image, **spectra_rows}.items()}})
    table.to_csv(out / "per_image.csv", index=False, float_format="%.6g")
    metrics = metrics or Path("metrics/knn") / f"{model}.json"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps(summary, indent=2) + "\n")
    pp = summary["pairs"]["pre_post"]
    typer.echo(f"knn: {model}: N={summary['images']}, " + ", ".join(
        f"KNOR@{k} pre/post {pp[f'knor@{k}']:.3f} (chance {pp[f'chance@{k}']:.3f})" for k in summary["ks"]))


if __name__ == "__main__":
    app()
