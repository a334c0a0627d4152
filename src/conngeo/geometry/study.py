"""The geometry of one model's E_pre and E_post, per image and per dataset: what the geometry stage writes.

    neighbourhoods   KNOR, kNN Jaccard and mutual kNN of pre vs post and of each against every reference
                     space; linear CKA and the orthogonal Procrustes residual per pair (compare_spaces)
    distortion       per image, how unevenly E_pre -> E_post stretches the distances to its neighbours
    spectra          effective rank and top-k energy per image (token matrix) and per dataset (pooled)
    probes           linear probes of the ground-truth attributes (conngeo.data.targets) from pooled
                     E_pre and E_post: what the connector keeps and loses in the world's own terms
    neighbours       per image, the stems of its nearest images in E_pre and in E_post

The vectors are pooled a window of images at a time, so memory holds the pooled vectors and one window.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from ..data.targets import probe_targets
from ..data.vectors import VectorReader, images_within, read_embeddings, windows
from .compare import compare_spaces, dataset_spectra, image_spectra
from .knn import knn
from .overlap import local_distortion_per_image
from .pooling import pool
from .probes import probe_table

PROBE_COLUMNS = ["space", "target", "kind", "seed", "metric", "score", "chance", "n"]


def reference_space(folder: Path, stems: list[str], produced_by: str) -> torch.Tensor:
    """The embeddings of a reference space (shard folders under `folder`) in the order of `stems`, float32; an
    error naming `produced_by` (what writes them) where there are none or an image has none."""
    shards = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not shards:
        raise FileNotFoundError(f"{folder}: no embeddings of the reference space {folder.name!r}; run "
                                f"`{produced_by}` first")
    ref_stems, emb = read_embeddings(shards)
    position = {s: i for i, s in enumerate(ref_stems)}
    missing = [s for s in stems if s not in position]
    if missing:
        raise ValueError(f"{folder}: no embedding for {len(missing)} images (e.g. {missing[:3]}); rerun "
                         f"`{produced_by}` on the same images")
    return emb[torch.tensor([position[s] for s in stems])].float()


def model_geometry(reader: VectorReader, references: dict[str, Path], out: Path, *, root: Path, ks: list[int],
                   metric: str, pooling: str, top_k_energy: int, neighbours: int, max_block_mb: int,
                   probe_seeds: list[int], max_window_mb: float, produced_by: str = "{}") -> dict:
    """Every measure of the module doc for the images of `reader` (E_pre and E_post), against the reference
    spaces `references` (name -> folder of embedding shards; `produced_by`.format(name): what writes one);
    `root`: the image root, for the ground truth of the probes. Writes <out>/per_image.csv (stem, knor_<pair>@k,
    distortion@k, erank_pre, ...), <out>/neighbours.csv (stem, pre_1.., post_1..: the `neighbours` nearest) and
    <out>/probes.csv; returns the dataset summary (KNOR etc. per pair and k with chance, spectra, probe means,
    the connector's kind as the extraction recorded it)."""
    pooled, spectra_rows = {"pre": [], "post": []}, []
    where = reader.folders[0].parent
    for part in windows(range(len(reader)), images_within(max_window_mb, reader.image_bytes())):
        mats = {side: reader.read_list(side, part) for side in ("pre", "post")}
        for side in pooled:
            pooled[side].append(pool(mats[side], pooling, name=f"{where} {side}"))
        spectra_rows.append(image_spectra(mats, top_k_energy))
    spaces = {side: torch.cat(v) for side, v in pooled.items()}
    pairs = [("pre", "post")]
    for ref, folder in references.items():
        spaces[ref] = reference_space(folder, reader.stems, produced_by.format(ref))
        pairs += [("pre", ref), ("post", ref)]

    block = max_block_mb << 20
    per_image, summary = compare_spaces(spaces, pairs, ks, metric=metric, max_block_bytes=block)
    nearest = knn(spaces["pre"], summary["ks"][-1], metric=metric, max_block_bytes=block)
    for k in summary["ks"]:
        per_image[f"distortion@{k}"] = local_distortion_per_image(spaces["pre"], spaces["post"], nearest, k,
                                                                  max_block_bytes=block)
    spectra = {key: torch.cat([rows[key] for rows in spectra_rows]) for key in spectra_rows[0]}
    summary["spectra"] = {**{f"{key}_mean": float(values.mean()) for key, values in spectra.items()},
                          **dataset_spectra({"pre": spaces["pre"], "post": spaces["post"]}, top_k_energy)}
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"stem": reader.stems, **{k: v.numpy() for k, v in {**per_image, **spectra}.items()}})
    table.to_csv(out / "per_image.csv", index=False, float_format="%.6g")
    shown = min(neighbours, len(reader) - 1)
    stems = pd.Series(reader.stems)
    nearest = {side: knn(spaces[side], shown, metric=metric, max_block_bytes=block) for side in ("pre", "post")}
    pd.DataFrame({"stem": reader.stems, **{f"{side}_{j + 1}": stems.iloc[idx[:, j].numpy()].to_numpy()
                                           for side, idx in nearest.items() for j in range(shown)}}
                 ).to_csv(out / "neighbours.csv", index=False)

    targets = probe_targets(root, reader.stems)
    probes = pd.DataFrame(probe_table({"pre": spaces["pre"], "post": spaces["post"]}, targets, seeds=probe_seeds)
                          if targets else [], columns=PROBE_COLUMNS)
    probes[PROBE_COLUMNS].to_csv(out / "probes.csv", index=False, float_format="%.6g")
    means = probes.groupby(["space", "target"], sort=False)["score"].mean()  # over the fold seeds
    summary["probes"] = {f"{space}:{target}": float(v) for (space, target), v in means.items()}
    summary["connector"] = reader.layout.get("connector")  # the kind the extraction recorded (for the report)
    return summary
