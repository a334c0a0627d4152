"""Vector shards: per-image token matrices stored as safetensors, never pickles.

A shard folder holds

    pre.safetensors    one tensor "vectors" of shape [sum of pre token counts, d_pre]
    post.safetensors   one tensor "vectors" of shape [sum of post token counts, d_post]
    index.csv          stem,pre_tokens,post_tokens  (row order = token order in the tensors)

Images are concatenated along the token axis so that a shard loads in one read and pooling is a
segment reduction. Every file is written to a temporary name and renamed, so an interrupted run
never leaves a file that looks complete; index.csv is renamed last and marks the shard as done.

Vectors are stored in the dtype the model computed them in (bf16 for the real checkpoints), and read
back as float32 a batch at a time: `VectorReader` slices an image's rows out of the memory-mapped file,
and `TensorWriter` writes a tensor a chunk of rows at a time, so that no stage needs to hold a whole
shard. (safetensors stores a tensor as one header and then raw little-endian rows, which is what makes
both cheap.)
"""

from __future__ import annotations

import csv
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

INDEX = "index.csv"
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name ("F32", "BF16", ...)."""
    return {v: k for k, v in SAFETENSORS_DTYPES.items()}[name]


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


class TensorWriter:
    """One tensor of known shape and dtype written into a safetensors file a chunk of rows at a time,
    through a temporary name renamed by `close` once every row is there. The bytes equal
    safetensors.torch.save_file({name: tensor}, path, metadata) of the whole tensor."""

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                 metadata: dict[str, str] | None = None):
        self.path, self.tmp = Path(path), Path(path).with_name(Path(path).name + ".tmp")
        self.row_shape, self.dtype, self.rows, self.written = tuple(shape[1:]), dtype, shape[0], 0
        nbytes = shape[0] * int(torch.Size(shape[1:]).numel()) * torch.empty(0, dtype=dtype).element_size()
        header = {"__metadata__": metadata} if metadata else {}
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [0, nbytes]}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the header is padded to 8 bytes, as safetensors writes it
        self.file = open(self.tmp, "wb")
        self.file.write(struct.pack("<Q", len(text)) + text)

    def write(self, rows: torch.Tensor) -> None:
        if tuple(rows.shape[1:]) != self.row_shape or self.written + rows.shape[0] > self.rows:
            raise ValueError(f"{self.path}: rows {tuple(rows.shape)} do not fit the declared "
                             f"[{self.rows}, {', '.join(map(str, self.row_shape))}] ({self.written} written)")
        self.file.write(rows.detach().to("cpu", self.dtype).contiguous().view(torch.uint8).numpy().tobytes())
        self.written += rows.shape[0]

    def close(self) -> None:
        self.file.close()
        if self.written != self.rows:
            raise ValueError(f"{self.path}: {self.written} of {self.rows} rows written")
        os.replace(self.tmp, self.path)


def write_index(folder: Path, stems: list[str], pre_tokens: list[int], post_tokens: list[int] | None = None) -> None:
    """index.csv (stem, pre_tokens[, post_tokens]) through a temporary name: the shard's completion mark."""
    tmp = Path(folder) / (INDEX + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:  # csv quoting: a stem may hold a comma or a quote
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["stem", "pre_tokens"] + (["post_tokens"] if post_tokens is not None else []))
        for row in zip(stems, pre_tokens, *([post_tokens] if post_tokens is not None else [])):
            writer.writerow(row)
    os.replace(tmp, Path(folder) / INDEX)


def write_shard(folder: Path, stems: list[str], pre: list[torch.Tensor], post: list[torch.Tensor]) -> None:
    """Write one shard. `pre[i]` and `post[i]` are the [tokens, dim] matrices of image `stems[i]`."""
    if not (len(stems) == len(pre) == len(post)):
        raise ValueError(f"write_shard: {len(stems)} stems but {len(pre)} pre and {len(post)} post matrices")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX).unlink(missing_ok=True)  # a shard without index is incomplete while we write
    for name, mats in (("pre", pre), ("post", post)):
        atomic_save({"vectors": torch.cat([m.detach().cpu() for m in mats])}, folder / f"{name}.safetensors")
    write_index(folder, stems, [a.shape[0] for a in pre], [b.shape[0] for b in post])


def is_complete(folder: Path, sides=("pre", "post")) -> bool:
    folder = Path(folder)
    return all((folder / n).is_file() for n in (INDEX, *(f"{side}.safetensors" for side in sides)))


def shard_folders(root: Path, produced_by: str) -> list[Path]:
    """The complete vector shard folders under `root`, sorted; a clear error naming the stage to run
    when there are none or one is incomplete."""
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not folders:
        raise FileNotFoundError(f"{root}: no vector shards; run `{produced_by}` first")
    incomplete = [str(f) for f in folders if not is_complete(f, ("pre",))]
    if incomplete:
        raise FileNotFoundError(f"incomplete vector shard(s) {incomplete}; rerun `{produced_by}`")
    return folders


def read_index(folder: Path) -> list[tuple[str, int, int]]:
    """(stem, pre_tokens, post_tokens) per image; post_tokens 0 where the shard holds E_pre only."""
    with open(Path(folder) / INDEX, newline="", encoding="utf-8") as f:
        return [(r["stem"], int(r["pre_tokens"]), int(r.get("post_tokens") or 0)) for r in csv.DictReader(f)]


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


class VectorReader:
    """The images of several vector shards (in the given order), read a few at a time as float32.

    `stems` lists every image; `read(side, indices)` returns the token matrices of those images,
    [len(indices), tokens, width] float32, reading only their rows of the memory-mapped
    <side>.safetensors (consecutive indices of a shard in one slice); `read_list` returns a list
    where images have different token counts. Shapes, sizes and stored dtypes come from index.csv
    and the file headers without reading any vector. Every read is checked for NaN and inf. A file is
    opened for each read and closed after it, so the pages read do not stay mapped (and counted in the
    process's RSS) for the rest of the run.
    """

    def __init__(self, folders: list[Path], sides: tuple[str, ...] = ("pre", "post")):
        self.folders, self.sides = [Path(f) for f in folders], sides
        self.stems: list[str] = []
        self._where: list[tuple[int, int]] = []  # image -> (shard number, position in the shard)
        self._start = {side: [] for side in sides}  # per shard: the first row of each image, and the end
        self._files, self.dtype, self.width = {}, {}, {}
        for k, folder in enumerate(self.folders):
            if not is_complete(folder, sides):
                raise FileNotFoundError(f"{folder}: incomplete vector shard (needs {INDEX}, "
                                        f"{', '.join(f'{s}.safetensors' for s in sides)}); rerun the stage that "
                                        "writes it (e.g. `dvc repro`)")
            rows = read_index(folder)
            self.stems += [r[0] for r in rows]
            self._where += [(k, i) for i in range(len(rows))]
            for side, col in zip(("pre", "post"), (1, 2)):
                if side not in sides:
                    continue
                starts = [0]
                for r in rows:
                    starts.append(starts[-1] + r[col])
                path = str(folder / f"{side}.safetensors")
                with safe_open(path, framework="pt") as handle:
                    shape = handle.get_slice("vectors").get_shape()
                    dtype = handle.get_slice("vectors").get_dtype()
                if shape[0] != starts[-1]:
                    raise ValueError(f"{folder / side}.safetensors: {shape[0]} rows but {INDEX} lists {starts[-1]} "
                                     "tokens; the shard is inconsistent, delete the folder and rerun the stage")
                if self.width.setdefault(side, shape[1]) != shape[1] or self.dtype.setdefault(side, dtype) != dtype:
                    raise ValueError(f"{folder / side}.safetensors: width {shape[1]} / {dtype}, but earlier shards have "
                                     f"{self.width[side]} / {self.dtype[side]}: every shard must come from the same "
                                     "model; re-extract")
                self._start[side].append(starts)
                self._files[k, side] = path

    def __len__(self) -> int:
        return len(self.stems)

    @property
    def layout(self) -> dict:
        """The token layout the extraction recorded (conngeo.families.base.Adapter.token_layout) in the first
        shard's fingerprint.json: {"pre_to_post": ..., "pre_raster": ...}; empty where none is recorded."""
        stamp = self.folders[0] / "fingerprint.json"
        return (json.loads(stamp.read_text()).get("layout") or {}) if stamp.is_file() else {}

    def tokens(self, side: str) -> int:
        """The token count every image has on `side`; an error naming two images where they differ."""
        counts = {}
        for i, (k, pos) in enumerate(self._where):
            starts = self._start[side][k]
            counts.setdefault(starts[pos + 1] - starts[pos], i)
        if len(counts) > 1:
            (a, i), (b, j) = list(counts.items())[:2]
            raise ValueError(f"{side}: images have different token matrix shapes ({self.stems[i]}: {a} tokens, "
                             f"{self.stems[j]}: {b}); this needs one shape for every image of a model: give all images "
                             "one size (the model's image_size) and re-extract")
        return next(iter(counts))

    def image_bytes(self) -> int:
        """Bytes of one image's token matrices on every side, as float32 (what a read holds in memory)."""
        return 4 * sum(self.tokens(side) * self.width[side] for side in self.sides)

    def read_list(self, side: str, indices) -> list[torch.Tensor]:
        """The token matrices of images `indices` (any order), float32."""
        out = []
        indices = list(indices)
        i = 0
        while i < len(indices):  # one slice per run of consecutive images of one shard
            k, first = self._where[indices[i]]
            j = i + 1
            while j < len(indices) and self._where[indices[j]] == (k, first + j - i):
                j += 1
            starts = self._start[side][k]
            with safe_open(self._files[k, side], framework="pt") as handle:
                rows = handle.get_slice("vectors")[starts[first]:starts[first + j - i]].float()
            mats = torch.split(rows, [starts[first + n + 1] - starts[first + n] for n in range(j - i)])
            for n, mat in enumerate(mats):
                if not torch.isfinite(mat).all():
                    raise ValueError(f"{self.folders[k] / side}.safetensors: image {self.stems[indices[i + n]]} contains "
                                     "NaN or inf; delete the shard folder and rerun the stage that wrote it (`dvc repro "
                                     "extract`; if it comes back, run the model in float32: its dtype in params.yaml "
                                     "models), or drop the image from the study")
            out += mats
            i = j
        return out

    def read(self, side: str, indices) -> torch.Tensor:
        """[len(indices), tokens, width] float32: images of one token count (see `tokens`)."""
        self.tokens(side)
        mats = self.read_list(side, indices)
        return torch.stack(mats) if mats else torch.zeros(0, self.tokens(side), self.width[side])



def windows(indices, size: int) -> list[list[int]]:
    """`indices` in runs of at most `size` (at least 1): the unit of bounded-memory work."""
    indices, size = list(indices), max(1, size)
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def images_within(max_mb: float, image_bytes: int, at_least: int = 1) -> int:
    """How many images of `image_bytes` fit in `max_mb` megabytes (at least `at_least`)."""
    return max(at_least, int(max_mb * 2**20 // max(image_bytes, 1)))


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
    with open(tmp, "w", newline="", encoding="utf-8") as f:  # csv quoting: a stem may hold a comma or a quote
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["stem"])
        writer.writerows([s] for s in stems)
    os.replace(tmp, folder / INDEX)


def read_embeddings(folders: list[Path]) -> tuple[list[str], torch.Tensor]:
    """Stems and embeddings of several folders written by write_embeddings, concatenated in order."""
    stems, parts = [], []
    for folder in map(Path, folders):
        if not (folder / INDEX).is_file() or not (folder / EMBEDDINGS).is_file():
            raise FileNotFoundError(f"{folder}: incomplete embeddings (needs {INDEX} and {EMBEDDINGS}); "
                                    "rerun the stage that writes it (e.g. `dvc repro references`)")
        with open(folder / INDEX, newline="", encoding="utf-8") as f:
            rows = [r["stem"] for r in csv.DictReader(f)]
        emb = load_file(str(folder / EMBEDDINGS))["embeddings"]
        if len(rows) != emb.shape[0]:
            raise ValueError(f"{folder / EMBEDDINGS}: {emb.shape[0]} rows but {INDEX} lists {len(rows)} stems; "
                             "delete the folder and rerun the stage")
        stems += rows
        parts.append(emb)
    return stems, torch.cat(parts)
