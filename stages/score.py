"""Stage score: every caption set of one model scored, per caption and on average (conngeo.scoring.sets).

Caption sets, built from params (never from globs, so a shrunk matrix leaves no stale set in):
    post               data/captions/<model>/captions.csv column post (the model's own caption)
    recon              ... column recon (from connector(reconstructed E_pre)), where present
    <mode>_<level>     data/perturb/<model>/<mode>/<level>/captions.csv for perturb.modes x perturb.levels

Per caption: CLIPScore and RefCLIPScore (image, caption, the image's reference captions from <stem>.txt;
the CLIP of the reference space score.clip names), BERTScore P/R/F1 against the references (bert-score's
multi-reference form), BERTScore against the post caption (stability; not for post itself), and, with
score.truth, the toy world's truth of the caption against its reference. The images are scored in chunks
of score.chunk_size, each kept as it finishes (an interrupted run resumes). An image without references is
left out of the reference-based means and counted. Writes data/scores/<model>/<set>.csv,
data/scores/<model>/summary.csv (one row per set) and metrics/score/<model>.json (means, counts of empty
captions, and what produced the numbers).
"""

import time
from pathlib import Path

import torch
import typer

from common import checkpoint_spec, load_params, run, write_json
from conngeo import layout
from conngeo.captions.inputs import match_images
from conngeo.captions.parts import fingerprint
from conngeo.data.images import scan
from conngeo.families.base import checked_folder
from conngeo.references import load_reference
from conngeo.scoring import CLIPSCORE_WEIGHT, BERTScore, caption_sets, score_sets

app = typer.Typer(add_completion=False)


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
    cfg = params["score"]
    device = device or params["device"]
    captions = captions or layout.data("captions", model) / "captions.csv"
    out = out or layout.data("scores", model)
    stems, sets = caption_sets(captions, perturb_root or layout.data("perturb", model), params["perturb"]["modes"],
                               params["perturb"]["levels"])
    items = match_images(scan(root or Path(params["data"]["root"])), stems, str(captions))

    space = checkpoint_spec("score.clip", cfg["clip"], ("source", "hub", "revision", "dtype"))
    clip = load_reference("clip", space["source"], revision=space["revision"], device=device, dtype=space["dtype"],
                          pooling="cls", hub=space["hub"])
    bert = BERTScore(cfg["bertscore_model"], num_layers=cfg["bertscore_num_layers"], idf=cfg["bertscore_idf"],
                     rescale_with_baseline=cfg["bertscore_rescale"], batch_size=cfg["bertscore_batch_size"],
                     device=device, max_unknown=cfg["max_unknown_share"],
                     source=cfg["bertscore_source"] and checked_folder(cfg["bertscore_source"], cfg["bertscore_revision"]))
    # chunks scored by an interrupted run of the same settings on the same captions are kept
    fp = fingerprint({"score": cfg.plain(), "clip": space, "sets": list(sets)},
                     [captions] + [s.source for s in sets.values() if s.source])
    done = score_sets(out, sets, items, clip, bert, chunk_size=cfg["chunk_size"], batch_size=cfg["batch_size"],
                      prefix=cfg["clip_prefix"], truth=cfg["truth"], fingerprint=fp,
                      max_unknown=cfg["max_unknown_share"], desc=f"score {model}")
    summary = {"model": model, **done.summary,
               "clipscore": {"prefix": cfg["clip_prefix"], "w": CLIPSCORE_WEIGHT,
                             "clip": space["hub"] or space["source"], "revision": space["revision"],
                             "distinct_texts": done.texts},  # distinct within each chunk, summed
               "bertscore": bert.info()}
    # how much was computed now (it depends on what an interrupted run left) is printed, not written
    write_json(metrics or layout.details("score", model), summary)
    typer.echo(f"score: {model}: {len(sets)} caption sets x {len(stems)} images in {done.chunks} chunks "
               f"({done.scored_now} scored now): {bert.pairs_computed} distinct BERTScore pairs computed now; "
               f"-> {out} in {time.perf_counter() - start:.1f} s; post CLIPScore {summary['post']['clipscore']}, "
               f"BERTScore F1 {summary['post']['bertscore_f1']}")


if __name__ == "__main__":
    run(app)
