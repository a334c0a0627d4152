"""Extract E_pre and E_post for every image of a folder, shard by shard, resumably.

Within a shard, images are processed in chunks of `save_every`; each finished chunk is saved as a
part file, so an interrupted run redoes at most one chunk. When every chunk of a shard is done the
parts are joined into the shard's files (conngeo.data.vectors) and removed. Chunks are aligned to
`save_every` and batches to `batch_size` inside a chunk, so a resumed run computes exactly the same
batches as an uninterrupted one and ends with byte-identical shards.

Every file carries a fingerprint of what produced it (model, revision, dtype, prompt, the shard's
stems); a part or shard with another fingerprint is never reused.
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


def extract_shard(adapter, items: list[Item], folder: Path, fp: str, batch_size: int = 32,
                  save_every: int = 256, num_workers: int = 0, desc: str = "extract") -> str:
    """Write one shard of vectors for `items` into `folder`; returns "done", "skipped" or "resumed"."""
    folder = Path(folder)
    stamp = folder / FINGERPRINT
    if vectors.is_complete(folder) and stamp.is_file() and json.loads(stamp.read_text())["fingerprint"] == fp:
        return "skipped"
    folder.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    chunks = [items[i:i + save_every] for i in range(0, len(items), save_every)]
    resumed = False
    bar = tqdm(total=len(items), desc=desc, unit="img")
    for c, chunk in enumerate(chunks):
        if _read_part(_part_path(folder, c), fp) is not None:
            resumed = True
            bar.update(len(chunk))
            continue
        pre, post = [], []
        loader = DataLoader(_Images(chunk), batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list)
        for images in loader:
            p, q = adapter.encode(images)
            pre += p
            post += q
            bar.update(len(images))
        part = _part_path(folder, c)
        part.parent.mkdir(exist_ok=True)
        meta = {"fingerprint": fp, "stems": json.dumps([it.stem for it in chunk]),
                "pre_tokens": json.dumps([m.shape[0] for m in pre]),
                "post_tokens": json.dumps([m.shape[0] for m in post])}
        vectors.atomic_save({"pre": torch.cat(pre), "post": torch.cat(post)}, part, metadata=meta)
    bar.close()

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


def extract(adapter, items: list[Item], out: Path, model_spec: dict, **kwargs) -> dict:
    """Extract every shard of `items` into `out/<shard>/`; returns a small summary for logs/metrics."""
    start = time.perf_counter()
    status = {}
    shards = sorted({it.shard for it in items})
    for shard in shards:
        shard_items = [it for it in items if it.shard == shard]
        fp = fingerprint(model_spec, shard_items)
        status[shard] = extract_shard(adapter, shard_items, Path(out) / shard, fp, desc=f"extract {shard}", **kwargs)
    return {"images": len(items), "shards": status, "seconds": round(time.perf_counter() - start, 2)}
