"""Every image's caption from its own E_post and from connector(reconstructed E_pre): the captions table of
one model, in resumable units that N processes share without overlap, and the join.

    post   generated from E_post as extracted: the model's own caption
    recon  generated from adapter.connect(E_pre reconstructed from E_post): what the language model says when
           the connector sees the reconstruction
    recon_post_mse_z   the error that reaches the language model: mean over tokens and features of
           ((connector(reconstructed E_pre) - E_post) / std)^2, in the z-units of E_post (the reconstructor's
           training statistics)

The unit of work is one generate batch (`batch_size` images of a vector shard, exactly as one process batches
them), dealt to the workers and written as a part as it finishes (conngeo.captions.parts); the joining run
(workers=1) keeps every part of its fingerprint, computes the rest, writes <out>/captions.csv and removes the
parts: the same bytes as one uninterrupted process. One batch of vectors and images is in memory at a time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tqdm import tqdm

from .. import interrupt
from ..data.images import ImageFolder, load_image
from ..data.vectors import VectorReader, is_complete
from ..recon import Normalizer
from ..resume import fingerprint, write_json
from . import parts
from .inputs import match_images
from .table import write_table

COLUMNS = ("stem", "shard", "post", "recon", "recon_post_mse_z")
GENERATION = "generation.json"  # the generation settings, kept beside the parts for the joining run


def recon_readers(shards: list[Path], recon_vectors: Path, remedy: str) -> list[VectorReader]:
    """A reader of the reconstructed E_pre of each vector shard (the same stems in the same order); an error
    naming `remedy` where one is missing or stale."""
    readers = []
    for folder in shards:
        if not is_complete(recon_vectors / folder.name, ("pre",)):
            raise FileNotFoundError(f"{recon_vectors / folder.name}: no reconstructed E_pre for shard {folder.name}; "
                                    f"{remedy}")
        readers.append(VectorReader([recon_vectors / folder.name], sides=("pre",)))
        if readers[-1].stems != VectorReader([folder], sides=("post",)).stems:
            raise ValueError(f"{recon_vectors / folder.name}: stems differ from {folder}; {remedy}")
    return readers


def post_and_recon_captions(adapter, folder: ImageFolder, shards: list[Path], out: Path, model: dict, *,
                            recon_vectors: Path | None, recon_dir: Path | None, batch_size: int,
                            max_new_tokens: int, worker: int = 0, workers: int = 1, remedy: str = "",
                            desc: str = "captions") -> dict:
    """Caption every image of the vector `shards` (images under `folder`) from E_post and, with `recon_vectors`
    (shards of reconstructed E_pre) and `recon_dir` (the reconstructor, for E_post's z-units), from
    connector(reconstructed E_pre), into <out>/captions.csv (see the module doc); `adapter` is used only for
    units not already in a part of this fingerprint. `model`: what identifies the model (its spec), for the
    fingerprint; `remedy`: what to run where the reconstructions are missing or stale.

    workers > 1: compute worker `worker`'s share of the batches into part files and stop. Returns {"computed"
    (images captioned now), "ignored" (parts of another fingerprint)}, and for a join also "images",
    "generation" (the decoding settings), "missing_references", "empty_post" and, with recon, "empty_recon",
    "recon_equals_post" (the share of images whose two captions are equal). After each computed batch a
    SIGTERM (conngeo.interrupt) stops the run with Preempted.
    """
    if not 0 <= worker < workers:
        raise ValueError(f"worker must be in 0..{workers - 1} for {workers} workers, not {worker}")
    out, recon = Path(out), recon_vectors is not None
    posts = [VectorReader([f], sides=("post",)) for f in shards]
    recons = recon_readers(shards, recon_vectors, remedy) if recon else []
    norm = Normalizer.load(recon_dir / "norm.safetensors") if recon else None
    stems = [r.stems for r in posts]
    columns = COLUMNS if recon else COLUMNS[:3]

    settings = {"model": model, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "recon": recon}
    inputs = [f / n for f in shards for n in ("index.csv", "post.safetensors")]
    inputs += [recon_vectors / f.name / n for f in shards if recon for n in ("index.csv", "pre.safetensors")]
    fp = fingerprint(settings, inputs)
    todo = parts.my_units(parts.units([len(s) for s in stems], batch_size), worker, workers)
    done, ignored = parts.read_parts(out, fp)
    rows, computed = {}, 0
    settings_file = out / parts.PARTS / GENERATION
    for s, a, b in tqdm(todo, desc=desc, unit="batch"):
        if all(stem in done for stem in stems[s][a:b]):
            rows.update({stem: done[stem] for stem in stems[s][a:b]})
            continue
        batch = match_images(folder, stems[s][a:b], str(shards[s]))
        images = [load_image(it.path) for it in batch]
        post = posts[s].read("post", range(a, b))
        got = {"stem": [it.stem for it in batch], "shard": [shards[s].name] * len(batch),
               "post": adapter.generate(images, post=list(post), max_new_tokens=max_new_tokens)}
        if recon:  # the LM sees connector(reconstructed E_pre): its captions, and how far it is from E_post
            post_hat = adapter.connect(list(recons[s].read("pre", range(a, b))))
            got["recon"] = adapter.generate(images, post=post_hat, max_new_tokens=max_new_tokens)
            error = [(norm.post_to_z(h) - norm.post_to_z(p)).pow(2).mean().item() for h, p in zip(post_hat, post)]
            got["recon_post_mse_z"] = [f"{e:.6g}" for e in error]
        rows.update({stem: {c: got[c][i] for c in columns} for i, stem in enumerate(got["stem"])})
        if not settings_file.is_file():  # how the captions were generated, for the joining run
            write_json(settings_file, adapter.generation_settings(max_new_tokens))
        parts.write_part(out, (s, a, b), fp, {c: got[c] for c in columns})
        computed += b - a
        interrupt.check(f"images {a}-{b} of {shards[s].name}")
    summary = {"computed": computed, "ignored": ignored}
    if workers > 1:  # the table belongs to the joining run
        return summary

    if not settings_file.is_file():
        write_json(settings_file, adapter.generation_settings(max_new_tokens))
    order = [stem for shard_stems in stems for stem in shard_stems]
    table = {c: [rows[st][c] for st in order] for c in columns}
    write_table(out / "captions.csv", table)
    generation = json.loads(settings_file.read_text())
    shutil.rmtree(out / parts.PARTS, ignore_errors=True)

    n, by_stem = len(table["stem"]), {it.stem: it for it in folder.items}
    summary |= {"images": n, "generation": generation,
                "missing_references": sum(not by_stem[st].references for st in order),
                "empty_post": sum(not c.strip() for c in table["post"])}
    if recon:
        summary["empty_recon"] = sum(not c.strip() for c in table["recon"])
        summary["recon_equals_post"] = sum(a == b for a, b in zip(table["post"], table["recon"])) / max(n, 1)
    return summary
