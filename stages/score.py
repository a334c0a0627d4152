"""Stage score: every caption set of one model scored, per caption and on average.

Caption sets, built from params (never from globs, so a shrunk matrix leaves no stale set in):
    post               data/captions/<model>/captions.csv column post (the model's own caption)
    recon              ... column recon (from connector(reconstructed E_pre)), where present
    <mode>_<level>     data/perturb/<model>/<mode>/<level>/captions.csv for perturb.modes x perturb.levels

Per caption: CLIPScore and RefCLIPScore (image, caption, the image's reference captions from <stem>.txt;
the CLIP of the reference space score.clip names, every distinct text embedded once), BERTScore P/R/F1
against the references (bert-score's multi-reference form), BERTScore against the post caption
(stability; not for post itself), and, with score.truth, the toy world's truth of the caption against
its reference. An image without references is left out of the reference-based means and counted. Writes data/scores/<model>/<set>.csv, data/scores/<model>/summary.csv (one row per set) and
metrics/score/<model>.json (means, counts of empty captions, and what produced the numbers).
"""

import json
import math
import time
from pathlib import Path

import torch
import typer

from common import checkpoint_spec, load_params, run, write_json
from conngeo import interrupt, layout
from conngeo.captions import parts, read_table, write_table
from conngeo.captions.inputs import match_images
from conngeo.data.images import load_image, scan
from conngeo.models.base import checked_folder
from conngeo.models.references import load_reference
from conngeo.scoring import CLIPSCORE_WEIGHT, TRUTH_KEYS, BERTScore, TextEmbeddings, clip_scores, truth_table
from conngeo.scoring.truth import reference_parses

app = typer.Typer(add_completion=False)


def fmt(values) -> list[str]:
    return [f"{float(v):.6g}" for v in values]


def mean(values) -> float | None:
    kept = [float(v) for v in values if v != "" and not math.isnan(float(v))]
    return round(sum(kept) / len(kept), 6) if kept else None


def set_means(columns: dict[str, list], post: list[str], perturbation: dict | None) -> dict:
    """A caption set's means and counts, from its written columns (so a set kept from an interrupted run
    gives the same numbers as one scored now)."""
    captions = columns["caption"]
    means = {k: mean(v) for k, v in columns.items()
             if k not in ("stem", "caption", "fraction", "relative_change", "reused_from")}
    if "stability_f1" in columns:
        means["same_as_post"] = mean([float(a == b) for a, b in zip(captions, post)])
        means["empty_stability_pairs"] = sum(not a.strip() or not b.strip() for a, b in zip(captions, post))
    means["empty"] = sum(not c.strip() for c in captions)
    means["no_reference"] = sum(v == "nan" for v in columns["refclipscore"])
    if perturbation:
        for key in ("fraction", "relative_change"):
            means[key] = mean(perturbation["table"][key])
    return means


@app.command()
def main(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    root: Path = typer.Option(None, help="image root (default: params data.root)"),
    captions: Path = typer.Option(None, help="default data/captions/<model>/captions.csv"),
    perturb_root: Path = typer.Option(None, help="default data/perturb/<model> (then <mode>/<level>/captions.csv)"),
    out: Path = typer.Option(None, help="per-caption CSV folder (default data/scores/<model>)"),
    metrics: Path = typer.Option(None, help="default metrics/score/<model>.json"),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: params device)"),
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's choice)"),
):
    """CLIPScore, RefCLIPScore, BERTScore (vs the references and vs the post caption) and toy truth per caption."""
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    params = load_params()
    cfg, data = params["score"], params["data"]
    device = device or params["device"]
    root = root or Path(data["root"])
    captions = captions or layout.data("captions", model) / "captions.csv"
    perturb_root = perturb_root or layout.data("perturb", model)
    out = out or layout.data("scores", model)

    base = read_table(captions, required=("stem", "post"))
    stems, post = base["stem"], base["post"]
    sets = {"post": (post, None), **({"recon": (base["recon"], None)} if "recon" in base else {})}
    for mode in params["perturb"]["modes"]:
        for level in params["perturb"]["levels"]:
            path = perturb_root / mode / str(level) / "captions.csv"
            table = read_table(path, required=("stem", "caption", "fraction", "relative_change", "reused_from"))
            if table["stem"] != stems:
                raise SystemExit(f"{path}: stems differ from {captions}; rerun `dvc repro perturb` and `captions`")
            sets[f"{mode}_{level}"] = (table["caption"], {"mode": mode, "level": level, "table": table})
    items = match_images(scan(root), stems, str(captions))
    references = [it.references for it in items]  # <stem>.txt, one reference per line

    space = checkpoint_spec("score.clip", cfg["clip"], ("source", "hub", "revision", "dtype"))
    clip = load_reference("clip", space["source"], revision=space["revision"], device=device, dtype=space["dtype"],
                          pooling="cls", hub=space["hub"])
    batch = cfg["batch_size"]
    image_emb = torch.cat([clip.embed([load_image(it.path) for it in items[i:i + batch]])
                           for i in range(0, len(items), batch)])
    every_text = [t for caps, _ in sets.values() for t in caps] + [r for refs in references for r in refs]
    texts = TextEmbeddings(clip, prefix=cfg["clip_prefix"], batch_size=4 * batch)
    texts.add(every_text)  # every distinct text embedded once, before any score
    bert = BERTScore(cfg["bertscore_model"], num_layers=cfg["bertscore_num_layers"], idf=cfg["bertscore_idf"],
                     rescale_with_baseline=cfg["bertscore_rescale"], batch_size=cfg["bertscore_batch_size"],
                     device=device, source=cfg["bertscore_source"] and checked_folder(cfg["bertscore_source"],
                                                                                      cfg["bertscore_revision"]))
    if not cfg["bertscore_idf"]:
        bert.prepare(every_text)

    summary = {"model": model, "images": len(stems),
               "references": {"per_image_max": max(map(len, references)),
                              "images_without": sum(not r for r in references)},
               "clipscore": {"prefix": cfg["clip_prefix"], "w": CLIPSCORE_WEIGHT,
                             "clip": space["hub"] or space["source"], "revision": space["revision"],
                             "distinct_texts": len(texts)},
               "bertscore": bert.info()}
    if cfg["truth"]:
        summary["truth"] = {"references_parsed": sum(reference_parses(r[0]) for r in references if r)}
    # a set scored by an interrupted run of the same settings on the same captions is kept
    settings = {"score": cfg.plain(), "clip": space, "sets": list(sets)}
    inputs = [captions] + [perturb_root / mode / str(level) / "captions.csv"
                           for mode in params["perturb"]["modes"] for level in params["perturb"]["levels"]]
    fp = parts.fingerprint(settings, inputs)
    done_file = out / "parts.json"
    done = json.loads(done_file.read_text()) if done_file.is_file() else {}
    rows, scored = [], 0
    for name, (captions_of_set, perturbation) in sets.items():
        path = out / f"{name}.csv"
        if done.get(name) == fp and path.is_file():
            columns = read_table(path)
        else:
            clip_out = clip_scores(texts, image_emb, captions_of_set, references)
            vs_ref = bert.score(captions_of_set, references)
            columns = {"stem": stems, "caption": captions_of_set, "clipscore": fmt(clip_out["clipscore"]),
                       "refclipscore": fmt(clip_out["refclipscore"]),
                       **{f"bertscore_{k.lower()}": fmt(vs_ref[k]) for k in ("P", "R", "F1")}}
            if name != "post":
                vs_post = bert.score(captions_of_set, post)
                columns |= {f"stability_{k.lower()}": fmt(vs_post[k]) for k in ("P", "R", "F1")}
            if cfg["truth"]:
                truth = truth_table(captions_of_set, [r[0] if r else "" for r in references])
                columns |= {f"truth_{k}": [("" if math.isnan(v) else str(int(v))) for v in truth[k]] for k in TRUTH_KEYS}
            if perturbation:  # the actual share of tokens / directions changed in each image, and of E_post's
                columns |= {k: perturbation["table"][k] for k in ("fraction", "relative_change", "reused_from")}  # energy
            write_table(path, columns)
            done[name] = fp
            write_json(done_file, done)
            scored += 1
        means = set_means(columns, post, perturbation)
        if perturbation:
            summary.setdefault("perturb", {}).setdefault(perturbation["mode"], {})[str(perturbation["level"])] = means
        else:
            summary[name] = means
        rows.append({"set": name, "mode": perturbation["mode"] if perturbation else "",
                     "level": perturbation["level"] if perturbation else "", **means})
        interrupt.check(f"caption set {name}")
    done_file.unlink(missing_ok=True)
    for stale in sorted(p for p in out.glob("*.csv") if p.stem not in sets and p.name != "summary.csv"):
        stale.unlink()  # a caption set no longer in params
    keys = list(dict.fromkeys(k for row in rows for k in row))
    write_table(out / "summary.csv", {k: ["" if row.get(k) is None else row.get(k) for row in rows] for k in keys})
    # how much was computed now (it depends on what an interrupted run left) is printed, not written
    write_json(metrics or layout.details("score", model), summary)
    typer.echo(f"score: {model}: {len(sets)} caption sets x {len(stems)} images ({scored} scored now): "
               f"{len(texts)} distinct texts embedded by CLIP, {bert.pairs_computed} distinct BERTScore pairs computed; "
               f"-> {out} in {time.perf_counter() - start:.1f} s; post CLIPScore {summary['post']['clipscore']}, "
               f"BERTScore F1 {summary['post']['bertscore_f1']}")


if __name__ == "__main__":
    run(app)
