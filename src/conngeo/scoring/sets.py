"""A model's caption sets scored in chunks of images: resumable, in memory bounded by the chunk.

    caption_sets(captions, perturb_root, modes, levels)   the sets a study scores, read from their tables
    score_chunk(items, captions, clip, bert, ...)          every set's score columns for a few images
    score_sets(out, sets, items, clip, bert, ...)          every chunk scored (or kept), joined, and the means

Caption sets: "post" (the model's own caption, column post of captions.csv), "recon" (column recon, where
present) and "<mode>_<level>" (<perturb_root>/<mode>/<level>/captions.csv), one caption per image in the
stem order of captions.csv. Per caption: CLIPScore and RefCLIPScore (conngeo.scoring.clipscore), BERTScore
P/R/F1 against the image's references and, except for post itself, against the post caption (stability),
and with `truth` the toy world's truth against the first reference (conngeo.scoring.truth). The post set
also holds the scoring CLIP's sanity check: image -> caption retrieval among the chunk's images
(`retrieval_columns`).

Chunks: the images, in stem order, are cut into chunks of `chunk_size` (the last one shorter), and a chunk
is scored whole: its images embedded by the CLIP in batches of `batch_size` from the chunk's first image,
every distinct text among all sets' captions of its images and their references embedded once by the CLIP,
every distinct sentence embedded once and every distinct (candidate, reference) pair scored once by
BERTScore; then all of it is dropped. So memory follows chunk_size, not the number of images, and the sets,
which share most of their captions, still share that work within a chunk.

What equals what: within a chunk, equal captions (and equal pairs) score bit-identically in every caption
set. Across chunks a text is embedded in a batch of other texts, and batch composition changes the last
float32 bits of an embedding: equal captions of two chunks agree to float32 rounding, not bit for bit. The
chunks are fixed by the stem order and chunk_size alone, so every number depends on the inputs and the
settings only, never on where a run was interrupted and resumed. (With chunk_size a multiple of batch_size
the image batches, and so the image embeddings, are those of an unchunked run.) With BERTScore's idf
weighting, the weights are computed once from every image's references (scores against the references)
and from every post caption (stability).

Resume: each finished chunk is written at once to <out>/parts/<fingerprint>/<start>-<stop>/<set>.csv (the
chunk's folder is written under a temporary name and renamed), where the fingerprint is the caller's hash of
the settings and inputs. A run with the same fingerprint keeps the finished chunks and scores the rest; parts of
another fingerprint are removed. After the last chunk every set's parts are joined into <out>/<set>.csv, its
means accumulated as the rows pass, then <out>/summary.csv is written (one row per set) and the parts go.
SIGTERM (conngeo.interrupt) stops the run after the chunk in progress.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .. import interrupt
from ..captions.table import read_table, write_table
from ..data.images import Item, load_image
from .bertscore import BERTScore
from .clipscore import TextEmbeddings, clip_scores, retrieval_hits
from .truth import TRUTH_KEYS, reference_parses, truth_table

PARTS = "parts"
# the perturb table's columns a set keeps, copied into the set's scores per image for the report: the actual
# fraction changed, the share of E_post's energy moved (the dose) and the level whose caption was reused
PERTURBATION = ("fraction", "relative_change", "reused_from")
DESCRIBED = ("fraction", "relative_change")  # ... whose means the summary gives
NOT_SCORES = ("stem", "caption", *PERTURBATION)  # the columns of a set's scores that are not averaged


@dataclass
class CaptionSet:
    """One caption per image (stem order); a perturbed set's mode, level, table and columns PERTURBATION."""
    captions: list[str]
    mode: str = ""
    level: float | str = ""
    source: Path | None = None
    perturbation: dict[str, list[str]] = field(default_factory=dict)


def caption_sets(captions: Path, perturb_root: Path, modes: Sequence[str],
                 levels: Sequence[float]) -> tuple[list[str], dict[str, CaptionSet]]:
    """The stems of `captions` and the caption sets post, recon (where the table has it) and <mode>_<level>
    for every mode x level (each perturb table must list the same stems in the same order)."""
    base = read_table(captions, required=("stem", "post"))
    stems = base["stem"]
    sets = {"post": CaptionSet(base["post"]), **({"recon": CaptionSet(base["recon"])} if "recon" in base else {})}
    for mode in modes:
        for level in levels:
            path = Path(perturb_root) / mode / str(level) / "captions.csv"
            table = read_table(path, required=("stem", "caption", *PERTURBATION))
            if table["stem"] != stems:
                raise ValueError(f"{path}: stems differ from {captions}; rerun the captions and perturb stages "
                                 "of this model")
            sets[f"{mode}_{level}"] = CaptionSet(table["caption"], mode, level, path,
                                                 {k: table[k] for k in PERTURBATION})
    return stems, sets


def fmt(values) -> list[str]:
    return [f"{float(v):.6g}" for v in values]


def chunk_texts(captions: dict[str, Sequence[str]], references: Sequence[Sequence[str]]) -> list[str]:
    """Every caption of every set and every reference (with repeats)."""
    return [t for caps in captions.values() for t in caps] + [r for refs in references for r in refs]


def score_chunk(items: Sequence[Item], captions: dict[str, Sequence[str]], clip, bert: BERTScore, *,
                prefix: str, batch_size: int, truth: bool, idf: dict | None = None,
                max_unknown: float = 0.2) -> dict[str, dict[str, list]]:
    """Score columns of every caption set for the images `items`: set name -> {column: one value per image}.

    captions: set name -> one caption per item, "post" among them (the stability reference). clip: a
    CLIPReference with a text tower; bert: a BERTScore, whose kept embeddings are cleared on return. idf:
    with bert.idf, {"references": weights, "post": weights} (BERTScore.idf_weights; None: each call's own)."""
    references = [it.references for it in items]
    post = captions["post"]
    image_emb = torch.cat([clip.embed([load_image(it.path) for it in items[i:i + batch_size]])
                           for i in range(0, len(items), batch_size)])
    every_text = chunk_texts(captions, references)
    texts = TextEmbeddings(clip, prefix=prefix, batch_size=4 * batch_size, max_unknown=max_unknown)
    texts.add(every_text)  # every distinct text of the chunk embedded once, before any score
    idf, out = idf or {}, {}
    try:
        if not bert.idf:
            bert.prepare(every_text)
        for name, caps in captions.items():
            clip_out = clip_scores(texts, image_emb, caps, references)
            vs_ref = bert.score(caps, references, idf.get("references"))
            columns = {"stem": [it.stem for it in items], "caption": list(caps),
                       "clipscore": fmt(clip_out["clipscore"]), "refclipscore": fmt(clip_out["refclipscore"]),
                       **{f"bertscore_{k.lower()}": fmt(vs_ref[k]) for k in ("P", "R", "F1")}}
            if name != "post":
                vs_post = bert.score(caps, post, idf.get("post"))
                columns |= {f"stability_{k.lower()}": fmt(vs_post[k]) for k in ("P", "R", "F1")}
            if name == "post":  # the scoring CLIP's sanity check: does it find each image's own caption?
                columns |= retrieval_columns(image_emb, texts, references)
            if truth:
                table = truth_table(caps, [r[0] if r else "" for r in references])
                columns |= {f"truth_{k}": ["" if math.isnan(v) else str(int(v)) for v in table[k]] for k in TRUTH_KEYS}
            out[name] = columns
    finally:
        bert.clear()
    return out


def retrieval_columns(image_emb: torch.Tensor, texts: TextEmbeddings, references: Sequence[Sequence[str]]) -> dict:
    """Per image of a chunk: whether the CLIP retrieves the image's first reference among the first references
    of the chunk's images (clip_retrieval, 1 or 0) and the hit rate of a random pick (clip_retrieval_chance);
    empty for an image without references (clipscore.retrieval_hits)."""
    have = [i for i, refs in enumerate(references) if refs]
    hit, chance = [""] * len(references), [""] * len(references)
    if have:
        first = [references[i][0] for i in have]
        got = retrieval_hits(image_emb[have], texts.embed(first), first)
        for i, h, c in zip(have, *got):
            hit[i], chance[i] = f"{float(h):.6g}", f"{float(c):.6g}"
    return {"clip_retrieval": hit, "clip_retrieval_chance": chance}


class Means:
    """A caption set's means and counts, accumulated over its written rows chunk by chunk: every score column
    (empty and NaN values left out), the share of captions equal to the post caption and the count of
    stability pairs with an empty side (sets compared with post), empty captions, and images without a
    reference (refclipscore NaN)."""

    def __init__(self):
        self.sums: dict[str, list] = {}  # key -> [total, count], in the order the means are reported
        self.counts: dict[str, int] = {}

    def mean(self, key: str, values) -> None:
        total = self.sums.setdefault(key, [0.0, 0])
        for v in values:
            if v != "" and not math.isnan(float(v)):
                total[0] += float(v)
                total[1] += 1

    def count(self, key: str, n: int) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def add(self, columns: dict[str, list[str]], post: Sequence[str]) -> None:
        captions = columns["caption"]
        for key, values in columns.items():
            if key not in NOT_SCORES:
                self.mean(key, values)
        if "stability_f1" in columns:
            self.mean("same_as_post", [float(a == b) for a, b in zip(captions, post)])
            self.count("empty_stability_pairs", sum(not a.strip() or not b.strip() for a, b in zip(captions, post)))
        self.count("empty", sum(not c.strip() for c in captions))
        self.count("no_reference", sum(v == "nan" for v in columns["refclipscore"]))

    def result(self) -> dict:
        return {**{k: round(t / n, 6) if n else None for k, (t, n) in self.sums.items()}, **self.counts}


def mean(values) -> float | None:
    """The mean of the values that are not empty or NaN (None if none), to 6 decimals."""
    means = Means()
    means.mean("x", values)
    return means.result()["x"]


def chunk_bounds(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """(start, stop) of every chunk of `n` images."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, not {chunk_size}")
    return [(a, min(a + chunk_size, n)) for a in range(0, n, chunk_size)]


def write_chunk(folder: Path, columns: dict[str, dict[str, list]]) -> None:
    """One finished chunk, <folder>/<set>.csv, written under a temporary folder name and renamed."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, table in columns.items():
        write_table(tmp / f"{name}.csv", table)
    os.replace(tmp, folder)


def join_chunks(folders: Sequence[Path], name: str, path: Path, post: Sequence[str]) -> dict:
    """Set `name`'s rows of every chunk, in order, into `path` (through a temporary name); its Means."""
    means, row = Means(), 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        for k, folder in enumerate(folders):
            columns = read_table(folder / f"{name}.csv")
            if k == 0:
                writer.writerow(list(columns))
            writer.writerows(zip(*columns.values()))
            n = len(columns["stem"])
            means.add(columns, post[row:row + n])
            row += n
    os.replace(tmp, path)
    return means.result()


@dataclass
class Scored:
    """What score_sets did: the summary (images, references, truth, each set's means), the number of
    chunks, how many of them this call scored (the others were kept from an interrupted run), and the texts
    the CLIP embeds in a whole run (distinct per chunk, summed)."""
    summary: dict
    chunks: int
    scored_now: int
    texts: int


def score_sets(out: Path, sets: dict[str, CaptionSet], items: Sequence[Item], clip, bert: BERTScore, *,
               chunk_size: int, batch_size: int, prefix: str, truth: bool, fingerprint: str,
               max_unknown: float = 0.2, desc: str | None = None) -> Scored:
    """Score every caption set of `sets` ("post" among them) for the images `items` (stem order, each with
    its references), chunk by chunk, resuming from the finished chunks of `fingerprint`; write
    <out>/<set>.csv and <out>/summary.csv; remove a <set>.csv no longer in `sets`. desc: the progress bar's
    label (None: no bar)."""
    out, n = Path(out), len(items)
    if not n:
        raise ValueError(f"{out}: no images to score")
    if bad := {name: len(s.captions) for name, s in sets.items() if len(s.captions) != n}:
        raise ValueError(f"caption sets {bad} do not have one caption for each of the {n} images")
    parts = out / PARTS
    for stale in sorted(parts.glob("*")):
        if stale.name != fingerprint:  # made from other inputs or settings
            shutil.rmtree(stale)
    bounds = chunk_bounds(n, chunk_size)
    folders = [parts / fingerprint / f"{a:07d}-{b:07d}" for a, b in bounds]  # another chunk_size: other folders
    idf, scored, texts = None, 0, 0
    with tqdm(total=n, desc=desc, unit="img", disable=desc is None) as bar:
        for folder, (a, b) in zip(folders, bounds):
            captions = {name: s.captions[a:b] for name, s in sets.items()}
            texts += len(set(chunk_texts(captions, [it.references for it in items[a:b]])))
            if not folder.is_dir():
                if bert.idf and idf is None:
                    idf = {"references": bert.idf_weights([it.references for it in items]),
                           "post": bert.idf_weights(sets["post"].captions)}
                columns = score_chunk(items[a:b], captions, clip, bert, prefix=prefix, batch_size=batch_size,
                                      truth=truth, idf=idf, max_unknown=max_unknown)
                for name, s in sets.items():
                    columns[name] |= {key: s.perturbation[key][a:b] for key in PERTURBATION if s.perturbation}
                write_chunk(folder, columns)
                scored += 1
            bar.update(b - a)
            interrupt.check(f"images {a + 1}-{b} of {n}")

    references = [it.references for it in items]
    summary = {"images": n, "references": {"per_image_max": max(map(len, references)),
                                           "images_without": sum(not r for r in references)}}
    if truth:
        summary["truth"] = {"references_parsed": sum(reference_parses(r[0]) for r in references if r)}
    rows = []
    for name, s in sets.items():
        means = join_chunks(folders, name, out / f"{name}.csv", sets["post"].captions)
        means |= {key: mean(s.perturbation[key]) for key in DESCRIBED if s.perturbation}
        if s.perturbation:
            summary.setdefault("perturb", {}).setdefault(s.mode, {})[str(s.level)] = means
        else:
            summary[name] = means
        rows.append({"set": name, "mode": s.mode, "level": s.level, **means})
    keys = list(dict.fromkeys(k for row in rows for k in row))
    write_table(out / "summary.csv", {k: ["" if row.get(k) is None else row.get(k) for row in rows] for k in keys})
    for stale in sorted(p for p in out.glob("*.csv") if p.stem not in sets and p.name != "summary.csv"):
        stale.unlink()  # a caption set no longer in `sets`
    shutil.rmtree(parts)
    return Scored(summary, len(bounds), scored, texts)
