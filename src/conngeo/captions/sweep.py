"""Captions from perturbed E_post at every mode and level: the perturbation sweep of one model, in
resumable units that N processes share without overlap, and the join.

For each caption set `<mode>/<level>` (modes x levels, in that order) every image's E_post is perturbed
(conngeo.captions.perturb) and captioned. An image whose perturbed E_post equals, bit for bit, its
perturbed E_post of an earlier set is not captioned again: it takes that caption and names the set in
`reused_from` (with few tokens, several nominal levels mask the same tokens).

The unit of work is a window of consecutive images of one vector shard (as many as `max_window_mb`
holds, at least one generate batch) with every set of them. A reuse decision depends on one image
alone and a unit holds every set of its images, so the decisions, and with them the generate batches
(the images of a window still to caption in a set, `batch_size` at a time), do not depend on how the
units are split. Units of all shards, in order, are dealt round-robin to the workers
(conngeo.captions.parts.my_units); each finished unit is written at once to its own part file,
<out>/parts/<shard>-<start>.csv, stamped with a fingerprint of the model, the settings and the vector
files, so no file is written by two processes and an interrupted run loses at most the unit in
progress. The joining run (workers=1) keeps every part of its fingerprint, computes the rest, writes
one table per set, <out>/<mode>/<level>/captions.csv, and removes the parts: the same bytes as one
uninterrupted process.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from .. import interrupt
from ..data.images import ImageFolder
from ..data.vectors import VectorReader, images_within
from ..resume import fingerprint
from . import parts
from .generate import generate_captions
from .inputs import match_images
from .perturb import MODES, perturb, perturbation_size, relative_change
from .table import write_table

COLUMNS = ("stem", "shard", "caption", "changed", "fraction", "relative_change", "reused_from")
LEGACY_LEDGER = "parts.json"  # per-set ledger of an interrupted run of an earlier version of this code


def set_names(modes: Sequence[str], levels: Sequence[float]) -> list[str]:
    """The caption sets `<mode>/<level>`, in the order they are computed (a reused caption names an earlier one)."""
    return [f"{mode}/{level}" for mode in modes for level in levels]


def digest(matrix: torch.Tensor) -> str:
    """A hash of the matrix's bytes: equal digests, the same perturbed E_post."""
    return hashlib.sha1(matrix.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def caption_unit(adapter, posts: Sequence[torch.Tensor], stems: Sequence[str], images: Sequence[Path], shard: str,
                 modes: Sequence[str], levels: Sequence[float], *, seed: int, fill: str, batch_size: int,
                 max_new_tokens: int) -> dict[str, list[str]]:
    """Rows (`set` and COLUMNS, as strings) of every set of one unit's images, set by set, images in order.

    `changed` is the number of tokens masked or singular directions removed, `fraction` its share of the
    image's tokens or of min(tokens, width), `relative_change` = ||E_post - perturbed||^2 / ||E_post||^2.
    """
    rows: dict[str, list] = {k: [] for k in ("set", *COLUMNS)}
    captioned: dict[tuple[str, str], tuple[str, str]] = {}  # (stem, digest of perturbed E_post) -> (set, caption)
    for mode in modes:
        for level in levels:
            name, todo = f"{mode}/{level}", []  # todo: (row, key, image, perturbed E_post) still to caption
            for stem, post, image in zip(stems, posts, images):
                matrix = perturb(post, mode, level, stem, seed=seed, fill=fill)
                changed = perturbation_size(post, mode, level)
                key = (stem, digest(matrix))
                source, caption = captioned.get(key, ("", ""))
                if not source:
                    todo.append((len(rows["stem"]), key, image, matrix))
                whole = post.shape[0] if mode == "mask" else min(post.shape)
                row = {"set": name, "stem": stem, "shard": shard, "caption": caption, "changed": str(changed),
                       "fraction": f"{changed / whole:.6g}", "relative_change": f"{relative_change(post, matrix):.6g}",
                       "reused_from": source}
                for column, value in row.items():
                    rows[column].append(value)
            captions = generate_captions(adapter, [t[2] for t in todo], [t[3] for t in todo], batch_size=batch_size,
                                         max_new_tokens=max_new_tokens)
            for (row, key, _, _), caption in zip(todo, captions):
                rows["caption"][row] = caption
                captioned[key] = (name, caption)
    return rows


def perturbed_captions(adapter, folder: ImageFolder, shards: Sequence[Path], out: Path, model: dict, *,
                       modes: Sequence[str], levels: Sequence[float], seed: int, fill: str, batch_size: int,
                       max_new_tokens: int, max_window_mb: float, worker: int = 0, workers: int = 1,
                       desc: str = "perturb") -> dict:
    """Caption every image of the vector `shards` (images under `folder`) at every mode and level into
    `out` (see the module doc); `adapter` is used only for units not already in a part of this fingerprint.

    `model`: what identifies the model (e.g. its spec), for the fingerprint. workers > 1: compute worker
    `worker`'s share of the units into part files and stop; workers == 1: also join every part into the
    tables. Returns {"units", "computed", "ignored" (parts of another fingerprint), and for a join "sets":
    {set: {"captioned", "reused"}}}. After each computed unit, a SIGTERM (conngeo.interrupt) stops the
    run with Preempted.
    """
    if not 0 <= worker < workers:
        raise ValueError(f"worker must be in 0..{workers - 1} for {workers} workers, not {worker}")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"params.yaml perturb.modes: unknown {unknown}; choose from {MODES}")
    bad = [lv for lv in levels if not 0 < float(lv) <= 1]
    if bad:
        raise ValueError(f"params.yaml perturb.levels: {bad} not in (0, 1]")
    out = Path(out)
    readers = [VectorReader([f], sides=("post",)) for f in shards]
    images = [[it.path for it in match_images(folder, r.stems, str(f))] for r, f in zip(readers, shards)]
    window = images_within(max_window_mb, readers[0].image_bytes(), at_least=batch_size)
    settings = {"model": model, "modes": list(modes), "levels": list(levels), "seed": seed, "fill": fill,
                "batch_size": batch_size, "max_new_tokens": max_new_tokens, "window": window}
    fp = fingerprint(settings, [f / n for f in shards for n in ("index.csv", "post.safetensors")])
    units = parts.units([len(r) for r in readers], window)
    mine = parts.my_units(units, worker, workers)
    done, ignored, computed = {}, [], 0
    with tqdm(total=sum(b - a for _, a, b in mine), desc=desc, unit="img") as bar:
        for unit in mine:
            s, a, b = unit
            rows = parts.read_part(out, unit, fp)
            if rows is None:
                if parts.part_path(out, unit).is_file():
                    ignored.append(parts.part_path(out, unit))
                rows = caption_unit(adapter, readers[s].read("post", range(a, b)), readers[s].stems[a:b],
                                    images[s][a:b], shards[s].name, modes, levels, seed=seed, fill=fill,
                                    batch_size=batch_size, max_new_tokens=max_new_tokens)
                parts.write_part(out, unit, fp, rows)
                computed += 1
                interrupt.check(f"images {a}-{b} of {shards[s].name} ({out})")
            done[unit] = rows
            bar.update(b - a)
    summary = {"units": len(mine), "computed": computed, "ignored": ignored}
    if workers > 1:  # the tables belong to the joining run
        return summary

    names = set_names(modes, levels)
    tables = {name: {c: [] for c in COLUMNS} for name in names}
    for unit in units:
        rows = done[unit]
        for i, name in enumerate(rows["set"]):
            for c in COLUMNS:
                tables[name][c].append(rows[c][i])
    for name, table in tables.items():
        write_table(out / name / "captions.csv", table)
    for stale in sorted(p.parent for p in out.glob("*/*/captions.csv")
                        if f"{p.parent.parent.name}/{p.parent.name}" not in names):
        shutil.rmtree(stale)  # a mode or level no longer asked for
    shutil.rmtree(out / parts.PARTS, ignore_errors=True)
    (out / LEGACY_LEDGER).unlink(missing_ok=True)
    summary["sets"] = {name: {"captioned": sum(not r for r in t["reused_from"]),
                              "reused": sum(bool(r) for r in t["reused_from"])} for name, t in tables.items()}
    return summary


def verify_sets(out: Path, names: Sequence[str], stems: list[str]) -> list[str]:
    """Problems with the finished tables of the caption sets `names` under `out`, each of which should hold
    `stems` in this order (empty: complete): conngeo.captions.parts.verify_table for each, and no part
    left under `out`."""
    out, problems = Path(out), []
    for name in names:
        problems += parts.verify_table(out / name / "captions.csv", stems)
    for leftover in (out / parts.PARTS, out / LEGACY_LEDGER):
        if leftover.exists():
            problems.append(f"{leftover}: partial file left behind (an unfinished run; rerun the plain stage to "
                            "join parts)")
    return problems

