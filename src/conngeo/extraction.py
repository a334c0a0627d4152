"""Extract E_pre and E_post for every image of a folder, shard by shard, resumably.

Within a shard, images are processed in chunks of `save_every`; each finished chunk is saved as a
part file, so an interrupted run redoes at most one chunk. When every chunk of a shard is done the
parts are joined into the shard's files (conngeo.data.vectors) and removed. Chunks are aligned to
`save_every` and batches to `batch_size` inside a chunk, so a resumed run computes exactly the same
batches as an uninterrupted one and ends with byte-identical shards.

Every file carries a fingerprint of what produced it (model, revision, dtype, prompt, image size,
storage dtype, the image processor's class and backend as the stage records them, the shard's stems); a
part or shard with another fingerprint is never reused. Vectors
are stored in the dtype the model computed them in (bf16 for the real checkpoints) unless
`store_dtype` says otherwise. The join streams the parts into the shard files one part at a time.

Images are decoded here, not when the folder is listed: an unreadable image stops the run with the
error that names it and the fix, or, with on_bad_image="skip", is left out and listed (the shard's
fingerprint.json records it, so `verify` and later stages know it was skipped, not lost). The
fingerprint.json also records the adapter's token layout (Adapter.token_layout: which E_post token each
E_pre token goes into, and the raster order of the patches), so that later stages need no family.

Several processes split one extraction with `worker=i, workers=N`: the chunks of all shards, in
order, go round-robin to the workers (`assign`), and a worker writes only its own part files, never a
shard file. A plain run afterwards finds every part finished and only joins them: the shards come
out byte-identical to a single-process run, because every chunk holds the same batches either way.
`verify` checks a finished output against the images it should hold.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import interrupt
from .data import vectors
from .data.images import BadImageError, Item, load_image
from .data.vectors import resolve_dtype
from .resume import STAMP, digest, stamp, stamped


def fingerprint(model_spec: dict, items: list[Item]) -> str:
    return digest({"model": model_spec, "stems": [it.stem for it in items]})


class _Images(torch.utils.data.Dataset):
    """Decodes images in DataLoader workers, so decoding overlaps the model's work: (item, image), or
    (item, the BadImageError). The error is returned, not raised: raised in a worker, the DataLoader
    would raise it again with the worker's traceback in its message."""

    def __init__(self, items: list[Item]):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        try:
            return self.items[i], load_image(self.items[i].path)
        except BadImageError as err:
            return self.items[i], BadImageError(str(err))


def _as_list(pairs):
    return pairs


def _part_path(folder: Path, chunk: int) -> Path:
    return folder / "parts" / f"part{chunk:05d}.safetensors"


def _part_meta(path: Path, fp: str, chunk: list[Item] | None = None) -> dict | None:
    """The metadata of a finished part with fingerprint `fp` (stems, token counts, skipped), or None;
    given `chunk`, None too unless the part holds exactly its images (a part of a run with another
    save_every holds other images under the same number)."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("fingerprint") != fp:
        return None
    meta = {k: json.loads(meta[k]) for k in ("stems", "pre_tokens", "post_tokens", "skipped", "layout")}
    if chunk is not None and sorted(meta["stems"] + [s for s, _ in meta["skipped"]]) != sorted(it.stem for it in chunk):
        return None
    return meta


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
    return vectors.is_complete(folder) and stamped(folder, fp) is not None


def extract_shard(adapter, items: list[Item], folder: Path, fp: str, batch_size: int = 32,
                  save_every: int = 256, num_workers: int = 0, desc: str = "extract",
                  mine: set[int] | None = None, shape: OneShape | None = None, on_bad_image: str = "error",
                  store_dtype: torch.dtype | None = None) -> tuple[str, int]:
    """Write one shard of vectors for `items` into `folder`; returns "done", "skipped" or "resumed", and
    how many images were encoded now (the rest came from the finished parts of an interrupted run).

    mine: only these chunk numbers (a worker's share, see `assign`): their part files are written and
    the shard is left unjoined for a later plain run; returns "parts" then.
    shape: checks that every image gives the same token shapes (see OneShape).
    on_bad_image: "error" stops at an unreadable image, "skip" leaves it out and lists it.
    store_dtype: the dtype of the stored vectors (None: the model's).
    """
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', not {on_bad_image!r}")
    shape = shape or OneShape()
    folder = Path(folder)
    if _is_done(folder, fp):
        return "skipped", 0
    folder.mkdir(parents=True, exist_ok=True)
    # the old shard (if any) is being replaced: until the join it must not look complete to a reader (no
    # index.csv), or an interrupted run would leave another model's vectors in place; harmless if workers race
    (folder / STAMP).unlink(missing_ok=True)
    (folder / vectors.INDEX).unlink(missing_ok=True)
    chunks = [items[i:i + save_every] for i in range(0, len(items), save_every)]
    resumed, computed = False, 0
    todo = range(len(chunks)) if mine is None else sorted(mine)
    bar = tqdm(total=sum(len(chunks[c]) for c in todo), desc=desc, unit="img")
    for c in todo:
        chunk = chunks[c]
        if _part_meta(_part_path(folder, c), fp, chunk) is not None:
            resumed = True
            bar.update(len(chunk))
            continue
        kept, skipped, pre, post = [], [], [], []
        loader = DataLoader(_Images(chunk), batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list)
        for pairs in loader:
            bad = [(it, err) for it, err in pairs if isinstance(err, BadImageError)]
            if bad and on_bad_image == "error":
                raise bad[0][1]
            skipped += [[it.stem, str(err)] for it, err in bad]
            good = [(it, image) for it, image in pairs if not isinstance(image, BadImageError)]
            if good:
                p, q = adapter.encode([image for _, image in good])
                for (it, _), a, b in zip(good, p, q):
                    shape.check(it.stem, a.shape, b.shape)
                kept += [it.stem for it, _ in good]
                computed += len(good)
                pre += [a.to(store_dtype or a.dtype) for a in p]
                post += [b.to(store_dtype or b.dtype) for b in q]
            bar.update(len(pairs))
        part = _part_path(folder, c)
        part.parent.mkdir(exist_ok=True)  # several workers may create it at once
        layout = adapter.token_layout(pre[0].shape[0], post[0].shape[0]) if kept else None
        meta = {"fingerprint": fp, "stems": json.dumps(kept), "skipped": json.dumps(skipped), "layout": json.dumps(layout),
                "pre_tokens": json.dumps([m.shape[0] for m in pre]),
                "post_tokens": json.dumps([m.shape[0] for m in post])}
        tensors = {"pre": torch.cat(pre), "post": torch.cat(post)} if kept else {}
        vectors.atomic_save(tensors, part, metadata=meta)
        interrupt.check(f"{part.name} of {folder}")
    bar.close()
    if mine is not None:
        return "parts", computed
    _join(folder, [_part_path(folder, c) for c in range(len(chunks))], fp, items[0].path.parent)
    return "resumed" if resumed else "done", computed


def _join(folder: Path, parts: list[Path], fp: str, source: Path) -> None:
    """The parts, in order, streamed into the shard's files one part at a time; then the parts folder is
    removed (with any part an earlier run of another model or save_every left). `source`: the shard's
    image folder, named when none of its images could be read."""
    metas = [_part_meta(path, fp) for path in parts]
    stems = [s for m in metas for s in m["stems"]]
    if not stems:
        raise ValueError(f"{source}: every image of this shard folder is unreadable (all "
                         f"{sum(len(m['skipped']) for m in metas)} skipped); replace them, or move the folder out "
                         "of the image root")
    counts = {side: [n for m in metas for n in m[f"{side}_tokens"]] for side in ("pre", "post")}
    (folder / vectors.INDEX).unlink(missing_ok=True)  # incomplete while the files are written
    for side in ("pre", "post"):
        with safe_open(str(next(p for p, m in zip(parts, metas) if m["stems"])), framework="pt") as f:
            first = f.get_slice(side)
            width, dtype = first.get_shape()[1], vectors.dtype_of(first.get_dtype())
        writer = vectors.TensorWriter(folder / f"{side}.safetensors", "vectors", (sum(counts[side]), width), dtype)
        for path, meta in zip(parts, metas):
            if meta["stems"]:
                with safe_open(str(path), framework="pt") as f:
                    writer.write(f.get_tensor(side))
        writer.close()
    vectors.write_index(folder, stems, counts["pre"], counts["post"])
    skipped = [s for m in metas for s in m["skipped"]]
    layout = next(m["layout"] for m in metas if m["stems"])
    stamp(folder, fp, images=len(stems), skipped=skipped, layout=layout)
    shutil.rmtree(folder / "parts")


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
    """Extract every shard of `items` into `out/<shard>/`; returns a small summary for logs/metrics
    (images, the images skipped as unreadable with the reason, per-shard status, images encoded now,
    seconds; the last three differ between an interrupted-and-resumed run and an uninterrupted one).

    With workers > 1, only worker `worker`'s share of part files (see `assign`); a plain run joins them.
    setting: what fixes the image geometry, named when two images give different token shapes.
    kwargs: extract_shard's (batch_size, save_every, num_workers, on_bad_image, store_dtype).
    """
    start = time.perf_counter()
    status, computed, shape = {}, 0, OneShape(setting)
    shards = sorted({it.shard for it in items})
    if workers == 1 and Path(out).is_dir():  # a shard no longer under the image root is not this study's
        for stale in sorted(p for p in Path(out).iterdir() if p.is_dir() and p.name not in shards):
            shutil.rmtree(stale)
    share = assign(items, kwargs.get("save_every", 256), worker, workers) if workers > 1 else None
    for shard in shards:
        shard_items = [it for it in items if it.shard == shard]
        fp = fingerprint(model_spec, shard_items)
        mine = None if share is None else share[shard]
        if mine is not None and not mine:
            continue  # nothing of this shard is ours; do not even create its folder
        status[shard], now = extract_shard(adapter, shard_items, Path(out) / shard, fp, desc=f"extract {shard}",
                                           mine=mine, shape=shape, **kwargs)
        computed += now
    skipped = [s for shard in shards if share is None for s in skipped_images(Path(out) / shard)]
    return {"images": len(items) - len(skipped), "skipped": skipped, "shards": status, "computed": computed,
            "seconds": round(time.perf_counter() - start, 2)}


def skipped_images(folder: Path) -> list[list[str]]:
    """[stem, reason] of the images a finished shard left out as unreadable."""
    record = stamped(folder)
    return record.get("skipped", []) if record else []


def verify(items: list[Item], out: Path, model_spec: dict | None = None) -> list[str]:
    """Problems with the finished extraction in `out` for `items` (empty: complete and consistent).

    Checks: every image's stem exactly once (or listed as skipped), in its own shard's index, in order;
    no shard folder without images; token counts in index.csv sum to the rows of pre/post.safetensors;
    the stored dtype is `model_spec`'s store_dtype (or dtype); no part or temporary file left; and,
    given `model_spec`, each shard's fingerprint matches it.
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
        skipped = {s for s, _ in skipped_images(folder)}
        stems = [s for s in stems if s not in skipped]  # listed as unreadable by the extraction
        for stem in got:
            if stem in seen:
                problems.append(f"{folder}: stem {stem} also in {seen[stem]}")
            seen[stem] = shard
        if got != stems:
            missing, extra = sorted(set(stems) - set(got)), sorted(set(got) - set(stems))
            problems.append(f"{folder}: index.csv lists {len(got)} stems, the shard has {len(stems)} images"
                            f" (missing {missing[:3]}, unexpected {extra[:3]}, or out of order)")
        want = model_spec and (model_spec.get("store_dtype") or model_spec.get("dtype"))
        for name, col in (("pre", 1), ("post", 2)):
            with safe_open(str(folder / f"{name}.safetensors"), framework="pt") as f:
                rows_in_file, dtype = f.get_slice("vectors").get_shape()[0], f.get_slice("vectors").get_dtype()
            if rows_in_file != sum(r[col] for r in rows):
                problems.append(f"{folder / name}.safetensors: {rows_in_file} rows but index.csv "
                                f"lists {sum(r[col] for r in rows)} tokens")
            if want and vectors.dtype_of(dtype) != resolve_dtype(want):
                problems.append(f"{folder / name}.safetensors: stored as {dtype}, expected {want}")
        shard_items = [it for it in items if it.shard == shard]
        if model_spec is not None and stamped(folder, fingerprint(model_spec, shard_items)) is None:
            problems.append(f"{folder}: made by another model spec or image list (fingerprint differs)")
    leftovers = [p for p in out.rglob("*") if p.name == "parts" or p.name.endswith(".tmp")]
    problems += [f"{p}: partial file left behind (an unfinished run; rerun the plain stage to join parts)"
                 for p in sorted(leftovers)]
    return problems


def extraction_report(summary: dict, spec: dict, folder) -> dict:
    """metrics/extract/<model>.json from `extract`'s summary: the same whether or not the run was interrupted
    (how the work went, computed or kept, is not in it)."""
    return {"images": summary["images"], "skipped": summary["skipped"], "model": spec,
            "store_dtype": spec["store_dtype"], "missing_captions": len(folder.missing_captions)}
