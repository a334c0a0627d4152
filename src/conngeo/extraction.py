"""Extract E_pre and E_post for every image of a folder, shard by shard, resumably.

Within a shard, images are processed in chunks of `save_every`; each finished chunk is saved as a
part file, so an interrupted run redoes at most one chunk. When every chunk of a shard is done the
parts are joined into the shard's files (conngeo.data.vectors) and removed. Chunks are aligned to
`save_every` and batches to `batch_size` inside a chunk, so a resumed run computes exactly the same
batches as an uninterrupted one and ends with byte-identical shards.

Every file carries a fingerprint of what produced it (model, revision, dtype, prompt, the shard's
stems); a part or shard with another fingerprint is never reused.

Several processes split one extraction with `worker=i, workers=N`: the chunks of all shards, in
order, go round-robin to the workers (`assign`), and a worker writes only its own part files, never a
shard file. A plain run afterwards finds every part finished and only joins them: the shards come
out byte-identical to a single-process run, because every chunk holds the same batches either way.
`verify` checks a finished output against the images it should hold.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data import vectors
from .data.images import Item, load_image

FINGERPRINT = "fingerprint.json"


def fingerprint(model_spec: dict, items: list[Item]) -> str:
    blob = json.dumps({"model": model_spec, "stems": [it.stem for it in items]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _Images(torch.utils.data.Dataset):
    """Decodes images in DataLoader workers, so decoding overlaps the model's work."""

    def __init__(self, items: list[Item]):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return load_image(self.items[i].path)


def _as_list(images):
    return images


def _part_path(folder: Path, chunk: int) -> Path:
    return folder / "parts" / f"part{chunk:05d}.safetensors"


def _read_part(path: Path, fp: str):
    """(stems, pre list, post list) of a finished part with fingerprint `fp`, or None."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("fingerprint") != fp:
            return None
        stems = json.loads(meta["stems"])
        pre_counts, post_counts = json.loads(meta["pre_tokens"]), json.loads(meta["post_tokens"])
        pre, post = f.get_tensor("pre"), f.get_tensor("post")
    return stems, list(torch.split(pre, pre_counts)), list(torch.split(post, post_counts))


class OneShape:
    """Every image of a model must give one E_pre and one E_post shape (the reconstructor, the
    connector variants and the token-level measures need it): the first image's shapes are the
    model's, and any other image with other shapes stops the run at once, naming both images and
    `setting` (what fixes the geometry, e.g. the registry's image_size)."""

    def __init__(self, setting: str = "the model's image size"):
        self.setting, self.first = setting, None

    def check(self, stem: str, pre: tuple, post: tuple) -> None:
        if self.first is None:
            self.first = (stem, tuple(pre), tuple(post))
            return
        first, pre0, post0 = self.first
        if (tuple(pre), tuple(post)) != (pre0, post0):
            raise ValueError(f"image {stem} gives E_pre {tuple(pre)} / E_post {tuple(post)} tokens x width, but image "
                             f"{first} gave {pre0} / {post0}: every image of a model needs one token shape. Set "
                             f"{self.setting} so that every image is brought to one size")


def _is_done(folder: Path, fp: str) -> bool:
    stamp = folder / FINGERPRINT
    return vectors.is_complete(folder) and stamp.is_file() and json.loads(stamp.read_text())["fingerprint"] == fp


def extract_shard(adapter, items: list[Item], folder: Path, fp: str, batch_size: int = 32,
                  save_every: int = 256, num_workers: int = 0, desc: str = "extract",
                  mine: set[int] | None = None, shape: OneShape | None = None) -> str:
    """Write one shard of vectors for `items` into `folder`; returns "done", "skipped" or "resumed".

    mine: only these chunk numbers (a worker's share, see `assign`): their part files are written and
    the shard is left unjoined for a later plain run; returns "parts" then.
    shape: checks that every image gives the same token shapes (see OneShape).
    """
    shape = shape or OneShape()
    folder = Path(folder)
    stamp = folder / FINGERPRINT
    if _is_done(folder, fp):
        return "skipped"
    folder.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)  # the old shard (if any) is being replaced; harmless if two workers race
    chunks = [items[i:i + save_every] for i in range(0, len(items), save_every)]
    resumed = False
    todo = range(len(chunks)) if mine is None else sorted(mine)
    bar = tqdm(total=sum(len(chunks[c]) for c in todo), desc=desc, unit="img")
    for c in todo:
        chunk = chunks[c]
        if _read_part(_part_path(folder, c), fp) is not None:
            resumed = True
            bar.update(len(chunk))
            continue
        pre, post = [], []
        loader = DataLoader(_Images(chunk), batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list)
        for images in loader:
            p, q = adapter.encode(images)
            for it, a, b in zip(chunk[len(pre):], p, q):
                shape.check(it.stem, a.shape, b.shape)
            pre += p
            post += q
            bar.update(len(images))
        part = _part_path(folder, c)
        part.parent.mkdir(exist_ok=True)  # several workers may create it at once
        meta = {"fingerprint": fp, "stems": json.dumps([it.stem for it in chunk]),
                "pre_tokens": json.dumps([m.shape[0] for m in pre]),
                "post_tokens": json.dumps([m.shape[0] for m in post])}
        vectors.atomic_save({"pre": torch.cat(pre), "post": torch.cat(post)}, part, metadata=meta)
    bar.close()
    if mine is not None:
        return "parts"

    stems, pre, post = [], [], []
    for c in range(len(chunks)):
        s, p, q = _read_part(_part_path(folder, c), fp)
        stems += s
        pre += p
        post += q
    vectors.write_shard(folder, stems, pre, post)
    stamp.write_text(json.dumps({"fingerprint": fp, "images": len(stems)}) + "\n")
    for c in range(len(chunks)):
        _part_path(folder, c).unlink()
    (folder / "parts").rmdir()
    return "resumed" if resumed else "done"


def assign(items: list[Item], save_every: int, worker: int, workers: int) -> dict[str, set[int]]:
    """Worker `worker`'s share of N=`workers`: shard -> its chunk numbers. Chunks of all shards are
    numbered in (shard, chunk) order and dealt round-robin, so shares are disjoint, cover everything,
    and differ in size by at most one chunk."""
    if not 0 <= worker < workers:
        raise ValueError(f"worker must be in 0..{workers - 1}, not {worker}")
    share, k = {}, 0
    for shard in sorted({it.shard for it in items}):
        n = sum(it.shard == shard for it in items)
        share[shard] = set()
        for c in range((n + save_every - 1) // save_every):
            if k % workers == worker:
                share[shard].add(c)
            k += 1
    return share


def extract(adapter, items: list[Item], out: Path, model_spec: dict, worker: int = 0, workers: int = 1,
            setting: str = "the model's image size", **kwargs) -> dict:
    """Extract every shard of `items` into `out/<shard>/`; returns a small summary for logs/metrics.

    With workers > 1, only worker `worker`'s share of part files (see `assign`); a plain run joins them.
    setting: what fixes the image geometry, named when two images give different token shapes.
    """
    start = time.perf_counter()
    status, shape = {}, OneShape(setting)
    shards = sorted({it.shard for it in items})
    share = assign(items, kwargs.get("save_every", 256), worker, workers) if workers > 1 else None
    for shard in shards:
        shard_items = [it for it in items if it.shard == shard]
        fp = fingerprint(model_spec, shard_items)
        mine = None if share is None else share[shard]
        if mine is not None and not mine:
            continue  # nothing of this shard is ours; do not even create its folder
        status[shard] = extract_shard(adapter, shard_items, Path(out) / shard, fp, desc=f"extract {shard}",
                                      mine=mine, shape=shape, **kwargs)
    return {"images": len(items), "shards": status, "seconds": round(time.perf_counter() - start, 2)}


def verify(items: list[Item], out: Path, model_spec: dict | None = None) -> list[str]:
    """Problems with the finished extraction in `out` for `items` (empty: complete and consistent).

    Checks: every image's stem exactly once, in its own shard's index, in order; no shard folder
    without images; token counts in index.csv sum to the rows of pre/post.safetensors; no part or
    temporary file left; and, given `model_spec`, each shard's fingerprint matches it.
    """
    out, problems = Path(out), []
    if not out.is_dir():
        return [f"{out}: no output folder"]
    expected = {}
    for it in items:
        expected.setdefault(it.shard, []).append(it.stem)
    for extra in sorted(p.name for p in out.iterdir() if p.is_dir() and p.name not in expected):
        problems.append(f"{out / extra}: a shard folder with no images under the root")
    seen: dict[str, str] = {}
    for shard, stems in sorted(expected.items()):
        folder = out / shard
        if not vectors.is_complete(folder):
            problems.append(f"{folder}: incomplete (needs index.csv, pre.safetensors, post.safetensors)")
            continue
        rows = vectors.read_index(folder)
        got = [r[0] for r in rows]
        for stem in got:
            if stem in seen:
                problems.append(f"{folder}: stem {stem} also in {seen[stem]}")
            seen[stem] = shard
        if got != stems:
            missing, extra = sorted(set(stems) - set(got)), sorted(set(got) - set(stems))
            problems.append(f"{folder}: index.csv lists {len(got)} stems, the shard has {len(stems)} images"
                            f" (missing {missing[:3]}, unexpected {extra[:3]}, or out of order)")
        for name, col in (("pre", 1), ("post", 2)):
            with safe_open(str(folder / f"{name}.safetensors"), framework="pt") as f:
                rows_in_file = f.get_slice("vectors").get_shape()[0]
            if rows_in_file != sum(r[col] for r in rows):
                problems.append(f"{folder / name}.safetensors: {rows_in_file} rows but index.csv "
                                f"lists {sum(r[col] for r in rows)} tokens")
        stamp = folder / FINGERPRINT
        if model_spec is not None and (not stamp.is_file() or json.loads(stamp.read_text())["fingerprint"]
                                       != fingerprint(model_spec, [it for it in items if it.shard == shard])):
            problems.append(f"{folder}: made by another model spec or image list (fingerprint differs)")
    leftovers = [p for p in out.rglob("*") if p.name == "parts" or p.name.endswith(".tmp")]
    problems += [f"{p}: partial file left behind (an unfinished run; rerun the plain stage to join parts)"
                 for p in sorted(leftovers)]
    return problems
