"""Vector shards: per-image token matrices stored as safetensors, never pickles.

A shard folder holds

    pre.safetensors    one tensor "vectors" of shape [sum of pre token counts, d_pre]
    post.safetensors   one tensor "vectors" of shape [sum of post token counts, d_post]
    index.csv          stem,pre_tokens,post_tokens  (row order = token order in the tensors)

Images are concatenated along the token axis so that a shard loads in one read and pooling is a
segment reduction. Every file is written to a temporary name and renamed, so an interrupted run
never leaves a file that looks complete; index.csv is renamed last and marks the shard as done.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

INDEX = "index.csv"


@dataclass
class Shard:
    """Per-image token matrices of one shard, in index order."""

    stems: list[str]
    pre: list[torch.Tensor]
    post: list[torch.Tensor]


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """save_file to `path` through a temporary name in the same folder."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def write_shard(folder: Path, stems: list[str], pre: list[torch.Tensor], post: list[torch.Tensor]) -> None:
    """Write one shard. `pre[i]` and `post[i]` are the [tokens, dim] matrices of image `stems[i]`."""
    if not (len(stems) == len(pre) == len(post)):
        raise ValueError(f"write_shard: {len(stems)} stems but {len(pre)} pre and {len(post)} post matrices")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX).unlink(missing_ok=True)  # a shard without index is incomplete while we write
    for name, mats in (("pre", pre), ("post", post)):
        atomic_save({"vectors": torch.cat([m.detach().cpu() for m in mats])}, folder / f"{name}.safetensors")
    tmp = folder / (INDEX + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["stem", "pre_tokens", "post_tokens"])
        for stem, a, b in zip(stems, pre, post):
            writer.writerow([stem, a.shape[0], b.shape[0]])
    os.replace(tmp, folder / INDEX)


def is_complete(folder: Path) -> bool:
    folder = Path(folder)
    return all((folder / n).is_file() for n in (INDEX, "pre.safetensors", "post.safetensors"))


def read_index(folder: Path) -> list[tuple[str, int, int]]:
    with open(Path(folder) / INDEX, newline="") as f:
        return [(r["stem"], int(r["pre_tokens"]), int(r["post_tokens"])) for r in csv.DictReader(f)]


def read_shard(folder: Path) -> Shard:
    """Load a shard written by write_shard; errors name the folder and what to do."""
    folder = Path(folder)
    if not is_complete(folder):
        raise FileNotFoundError(
            f"{folder}: incomplete vector shard (needs {INDEX}, pre.safetensors, post.safetensors); "
            "rerun the stage that writes it (e.g. `dvc repro`)"
        )
    rows = read_index(folder)
    stems = [r[0] for r in rows]
    out = {}
    for name, col in (("pre", 1), ("post", 2)):
        flat = load_file(str(folder / f"{name}.safetensors"))["vectors"]
        counts = [r[col] for r in rows]
        if sum(counts) != flat.shape[0]:
            raise ValueError(
                f"{folder / (name + '.safetensors')}: {flat.shape[0]} rows but {INDEX} lists {sum(counts)} tokens; "
                "the shard is inconsistent, delete the folder and rerun the stage"
            )
        out[name] = list(torch.split(flat, counts))
    return Shard(stems, out["pre"], out["post"])


def read_vectors(folders: list[Path]) -> Shard:
    """Concatenate several shards (in the given order) into one."""
    stems, pre, post = [], [], []
    for folder in folders:
        shard = read_shard(folder)
        stems += shard.stems
        pre += shard.pre
        post += shard.post
    return Shard(stems, pre, post)


# -- pooled embeddings: one vector per image (reference spaces such as clip, dino, attributes) ------
EMBEDDINGS = "embeddings.safetensors"


def write_embeddings(folder: Path, stems: list[str], embeddings: torch.Tensor) -> None:
    """Write `embeddings` [n_images, dim] with their stems; index.csv (renamed last) marks completion."""
    if len(stems) != embeddings.shape[0]:
        raise ValueError(f"write_embeddings: {len(stems)} stems but {embeddings.shape[0]} rows")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX).unlink(missing_ok=True)
    atomic_save({"embeddings": embeddings.detach().cpu()}, folder / EMBEDDINGS)
    tmp = folder / (INDEX + ".tmp")
    tmp.write_text("stem\n" + "".join(f"{s}\n" for s in stems))
    os.replace(tmp, folder / INDEX)


def read_embeddings(folders: list[Path]) -> tuple[list[str], torch.Tensor]:
    """Stems and embeddings of several folders written by write_embeddings, concatenated in order."""
    stems, parts = [], []
    for folder in map(Path, folders):
        if not (folder / INDEX).is_file() or not (folder / EMBEDDINGS).is_file():
            raise FileNotFoundError(f"{folder}: incomplete embeddings (needs {INDEX} and {EMBEDDINGS}); "
                                    "rerun the stage that writes it (e.g. `dvc repro references`)")
        rows = (folder / INDEX).read_text().splitlines()[1:]
        emb = load_file(str(folder / EMBEDDINGS))["embeddings"]
        if len(rows) != emb.shape[0]:
            raise ValueError(f"{folder / EMBEDDINGS}: {emb.shape[0]} rows but {INDEX} lists {len(rows)} stems; "
                             "delete the folder and rerun the stage")
        stems += rows
        parts.append(emb)
    return stems, torch.cat(parts)
