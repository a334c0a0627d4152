"""Stage score: every caption set of one model scored, per caption and on average.

Caption sets, built from params (never from globs, so a shrunk matrix leaves no stale set in):
    post               data/captions/<model>/captions.csv column post (the model's own caption)
    recon              ... column recon (from connector(reconstructed E_pre)), where present
    <mode>_<level>     data/perturb/<model>/<mode>/<level>/captions.csv for perturb.modes x perturb.levels

Per caption: CLIPScore and RefCLIPScore (image, caption, reference caption; CLIP from
references.spaces.clip), BERTScore P/R/F1 against the reference caption, BERTScore against the post
caption (stability; not for post itself), and the toy world's truth of the caption against the
reference. Writes data/scores/<model>/<set>.csv, data/scores/<model>/summary.csv (one row per set) and
metrics/score/<model>.json (means, counts of empty captions, and what produced the numbers).
"""

import json
import math
import time
from pathlib import Path

import torch
import typer

from common import load_params
from conngeo.captions import read_table, write_table
from conngeo.captions.inputs import match_images
from conngeo.data.images import load_image, scan
from conngeo.models.references import load_reference
from conngeo.scoring import CLIPSCORE_WEIGHT, TRUTH_KEYS, BERTScore, clip_scores, truth_table
from conngeo.scoring.truth import reference_parses

app = typer.Typer(add_completion=False)


def fmt(values) -> list[str]:
    return [f"{float(v):.6g}" for v in values]


def mean(values) -> float | None:
    kept = [float(v) for v in values if not math.isnan(float(v))]
    return round(sum(kept) / len(kept), 6) if kept else None


@app.command()
def main(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    root: Path = typer.Option(None, help="image root (default: params data.root)"),
    captions: Path = typer.Option(None, help="default data/captions/<model>/captions.csv"),
    perturb_root: Path = typer.Option(None, help="default data/perturb/<model> (then <mode>/<level>/captions.csv)"),
    out: Path = typer.Option(None, help="per-caption CSV folder (default data/scores/<model>)"),
    metrics: Path = typer.Option(None, help="default metrics/score/<model>.json"),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: params score.device)"),
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's choice)"),
):
    """CLIPScore, RefCLIPScore, BERTScore (vs reference and vs the post caption) and toy truth per caption."""
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    params = load_params()
    cfg, data = params["score"], params["data"]
    device = device or cfg.get("device", "cpu")
    root = root or Path(data["root"])
    captions = captions or Path("data/captions") / model / "captions.csv"
    perturb_root = perturb_root or Path("data/perturb") / model
    out = out or Path("data/scores") / model

    base = read_table(captions, required=("stem", "reference", "post"))
    stems, references, post = base["stem"], base["reference"], base["post"]
    sets = {"post": (post, None), **({"recon": (base["recon"], None)} if "recon" in base else {})}
    for mode in params["perturb"]["modes"]:
        for level in params["perturb"]["levels"]:
            path = perturb_root / mode / str(level) / "captions.csv"
            table = read_table(path, required=("stem", "caption"))
            if table["stem"] != stems:
                raise SystemExit(f"{path}: stems differ from {captions}; rerun `dvc repro perturb` and `captions`")
            sets[f"{mode}_{level}"] = (table["caption"], {"mode": mode, "level": level, "table": table})

    space = params["references"]["spaces"]["clip"]
    spec = {"revision": None, "dtype": "float32", **space[space.get("use", "tiny")]}
    clip = load_reference("clip", spec["source"], revision=spec["revision"], device=device, dtype=spec["dtype"],
                          pooling="cls")
    items = match_images(scan(root, on_bad_image=data["on_bad_image"]), stems, str(captions))
    batch = cfg.get("batch_size", 64)
    image_emb = torch.cat([clip.embed([load_image(it.path) for it in items[i:i + batch]])
                           for i in range(0, len(items), batch)])
    bert = BERTScore(cfg["bertscore_model"], num_layers=cfg.get("bertscore_num_layers"),
                     idf=cfg.get("bertscore_idf", False), rescale_with_baseline=cfg.get("bertscore_rescale", False),
                     batch_size=cfg.get("bertscore_batch_size", 64), device=device)

    summary = {"model": model, "images": len(stems),
               "clipscore": {"prefix": cfg["clip_prefix"], "w": CLIPSCORE_WEIGHT, "clip": spec["source"]},
               "bertscore": bert.info(),
               "truth": {"references_parsed": sum(map(reference_parses, references))}}
    rows = []
    for name, (texts, perturbation) in sets.items():
        clip_out = clip_scores(clip, image_emb, texts, references, prefix=cfg["clip_prefix"],
                               batch_size=cfg.get("batch_size", 64) * 4)
        vs_ref = bert.score(texts, references)
        columns = {"stem": stems, "caption": texts, "clipscore": fmt(clip_out["clipscore"]),
                   "refclipscore": fmt(clip_out["refclipscore"]),
                   **{f"bertscore_{k.lower()}": fmt(vs_ref[k]) for k in ("P", "R", "F1")}}
        means = {"clipscore": mean(clip_out["clipscore"]), "refclipscore": mean(clip_out["refclipscore"]),
                 **{f"bertscore_{k.lower()}": mean(vs_ref[k]) for k in ("P", "R", "F1")}}
        if name != "post":
            vs_post = bert.score(texts, post)
            columns |= {f"stability_{k.lower()}": fmt(vs_post[k]) for k in ("P", "R", "F1")}
            means |= {f"stability_{k.lower()}": mean(vs_post[k]) for k in ("P", "R", "F1")}
            means["same_as_post"] = mean([float(a == b) for a, b in zip(texts, post)])
            means["empty_stability_pairs"] = int(vs_post["empty"].sum())
        truth = truth_table(texts, references)
        columns |= {f"truth_{k}": [("" if math.isnan(v) else int(v)) for v in truth[k]] for k in TRUTH_KEYS}
        means |= {f"truth_{k}": mean(truth[k]) for k in TRUTH_KEYS}
        means["empty"] = int(clip_out["empty"].sum())
        means["empty_reference"] = int(clip_out["empty_reference"].sum())
        if perturbation:
            table = perturbation["table"]
            for key in ("fraction", "relative_change"):
                if key in table:
                    means[key] = mean(table[key])
        write_table(out / f"{name}.csv", columns)
        if perturbation:
            summary.setdefault("perturb", {}).setdefault(perturbation["mode"], {})[str(perturbation["level"])] = means
        else:
            summary[name] = means
        rows.append({"set": name, "mode": perturbation["mode"] if perturbation else "",
                     "level": perturbation["level"] if perturbation else "", **means})
    keys = list(dict.fromkeys(k for row in rows for k in row))
    write_table(out / "summary.csv", {k: ["" if row.get(k) is None else row.get(k) for row in rows] for k in keys})
    summary["seconds"] = round(time.perf_counter() - start, 2)
    metrics = metrics or Path("metrics/score") / f"{model}.json"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps(summary, indent=2) + "\n")
    typer.echo(f"score: {model}: {len(sets)} caption sets x {len(stems)} images -> {out} in {summary['seconds']} s; "
               f"post CLIPScore {summary['post']['clipscore']}, BERTScore F1 {summary['post']['bertscore_f1']}")


if __name__ == "__main__":
    app()
