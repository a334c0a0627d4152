"""Stage knn: the geometry of one model's E_pre and E_post, per image and per dataset.

    neighbourhoods   KNOR, kNN Jaccard and mutual kNN of pre vs post and of each against every reference
                     space; linear CKA and the orthogonal Procrustes residual per pair
    distortion       per image, how unevenly E_pre -> E_post stretches the distances to its neighbours
    spectra          effective rank and top-k energy per image (token matrix) and per dataset (pooled)
    probes           linear probes of the ground-truth attributes (conngeo.data.targets) from pooled
                     E_pre and E_post: what the connector keeps and loses in the world's own terms

    neighbours       per image, the stems of its knn.neighbours nearest images in E_pre and in E_post (the
                     report's examples page shows them side by side)

Writes data/knn/<model>/per_image.csv, neighbours.csv, probes.csv and metrics/knn/<model>.json. The
vectors are pooled a window of images at a time (params max_window_mb).
"""

from pathlib import Path

import pandas as pd
import torch
import typer

from common import load_params, run, write_json
from conngeo import layout
from conngeo.data.targets import probe_targets
from conngeo.data.vectors import VectorReader, images_within, read_embeddings, shard_folders, windows
from conngeo.geometry import knn, local_distortion_per_image, pool, probe_table
from conngeo.geometry.compare import compare_spaces, dataset_spectra, image_spectra

app = typer.Typer(add_completion=False)


@app.command()
def main(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    vectors: Path = typer.Option(None, help="default data/vectors/<model>"),
    refs: Path = typer.Option(Path("data/refs"), help="reference embeddings, one folder per reference"),
    out: Path = typer.Option(None, help="per-image CSV folder (default data/knn/<model>)"),
    metrics: Path = typer.Option(None, help="default metrics/knn/<model>.json"),
):
    """pre vs post, pre/post vs each reference, at every k of params knn.ks (clipped to N-1); spectra; probes."""
    params = load_params()
    cfg = params["knn"]
    vectors = vectors or layout.data("vectors", model)
    reader = VectorReader(shard_folders(vectors, f"dvc repro extract@{model}"))
    pooled, spectra_rows = {"pre": [], "post": []}, []
    for part in windows(range(len(reader)), images_within(params["max_window_mb"], reader.image_bytes())):
        mats = {side: reader.read_list(side, part) for side in ("pre", "post")}
        for side in pooled:
            pooled[side].append(pool(mats[side], cfg["pooling"], name=f"{vectors} {side}"))
        spectra_rows.append(image_spectra(mats, cfg["top_k_energy"]))
    spaces = {side: torch.cat(v) for side, v in pooled.items()}
    pairs = [("pre", "post")]
    for ref in params["references"]["spaces"]:
        folder = refs / ref
        shards = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        if not shards:
            raise FileNotFoundError(f"{folder}: no embeddings of the reference space {ref!r}; run "
                                    f"`dvc repro references@{ref}` first")
        stems, emb = read_embeddings(shards)
        position = {s: i for i, s in enumerate(stems)}
        missing = [s for s in reader.stems if s not in position]
        if missing:
            raise SystemExit(f"{folder}: no embedding for {len(missing)} images (e.g. {missing[:3]}); "
                             "rerun `dvc repro references` on the same images")
        spaces[ref] = emb[torch.tensor([position[s] for s in reader.stems])].float()
        pairs += [("pre", ref), ("post", ref)]

    per_image, summary = compare_spaces(spaces, pairs, cfg["ks"], metric=cfg["metric"],
                                        max_block_bytes=cfg["max_block_mb"] << 20)
    neighbours = knn(spaces["pre"], summary["ks"][-1], metric=cfg["metric"], max_block_bytes=cfg["max_block_mb"] << 20)
    for k in summary["ks"]:
        per_image[f"distortion@{k}"] = local_distortion_per_image(spaces["pre"], spaces["post"], neighbours, k,
                                                                  max_block_bytes=cfg["max_block_mb"] << 20)
    spectra = {key: torch.cat([rows[key] for rows in spectra_rows]) for key in spectra_rows[0]}
    summary["spectra"] = {**{f"{key}_mean": float(values.mean()) for key, values in spectra.items()},
                          **dataset_spectra({"pre": spaces["pre"], "post": spaces["post"]}, cfg["top_k_energy"])}
    out = out or layout.data("knn", model)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"stem": reader.stems, **{k: v.numpy() for k, v in {**per_image, **spectra}.items()}})
    table.to_csv(out / "per_image.csv", index=False, float_format="%.6g")
    shown = min(cfg["neighbours"], len(reader) - 1)
    stems = pd.Series(reader.stems)
    nearest = {side: knn(spaces[side], shown, metric=cfg["metric"], max_block_bytes=cfg["max_block_mb"] << 20)
               for side in ("pre", "post")}
    pd.DataFrame({"stem": reader.stems, **{f"{side}_{j + 1}": stems.iloc[idx[:, j].numpy()].to_numpy()
                                           for side, idx in nearest.items() for j in range(shown)}}
                 ).to_csv(out / "neighbours.csv", index=False)

    targets = probe_targets(params["data"]["root"], reader.stems)
    columns = ["space", "target", "kind", "seed", "metric", "score", "chance", "n"]
    probes = pd.DataFrame(probe_table({"pre": spaces["pre"], "post": spaces["post"]}, targets, seeds=cfg["probe_seeds"])
                          if targets else [], columns=columns)
    probes[columns].to_csv(out / "probes.csv", index=False, float_format="%.6g")
    means = probes.groupby(["space", "target"], sort=False)["score"].mean()  # over the fold seeds
    summary["probes"] = {f"{space}:{target}": float(v) for (space, target), v in means.items()}
    summary["connector"] = reader.layout.get("connector")  # the kind the extraction recorded (for the report)
    metrics = metrics or layout.details("knn", model)
    write_json(metrics, summary)
    pp = summary["pairs"]["pre_post"]
    typer.echo(f"knn: {model}: N={summary['images']}, " + ", ".join(
        f"KNOR@{k} pre/post {pp[f'knor@{k}']:.3f} (chance {pp[f'chance@{k}']:.3f})" for k in summary["ks"])
        + f"; {len(targets)} probe targets")


if __name__ == "__main__":
    run(app)
