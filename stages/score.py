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

import typer

from common import checkpoint_spec, load_params, run, use_threads, write_json
from conngeo import layout
from conngeo.scoring.study import score_model

app = typer.Typer(add_completion=False)


@app.command()
def main(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    root: Path = typer.Option(None, help="image root (default: params data.root)"),
    captions: Path = typer.Option(None, help="default data/captions/<model>/captions.csv"),
    perturb_root: Path = typer.Option(None, help="default data/perturb/<model> (then <mode>/<level>/captions.csv)"),
    out: Path = typer.Option(None, help="per-caption CSV folder (default data/scores/<model>)"),
    metrics: Path = typer.Option(None, help="default metrics/score/<model>.json"),
):
    """CLIPScore, RefCLIPScore, BERTScore (vs the references and vs the post caption) and toy truth per caption."""
    start = time.perf_counter()
    params = load_params()
    use_threads(params["threads"])
    cfg = params["score"].plain()  # every key: they are all in the fingerprint
    clip = checkpoint_spec("score.clip", params["score"]["clip"], ("source", "hub", "revision", "dtype"))
    summary, line = score_model(captions or layout.data("captions", model) / "captions.csv",
                                perturb_root or layout.data("perturb", model), root or Path(params["data"]["root"]),
                                out or layout.data("scores", model), cfg, clip, params["perturb"]["modes"],
                                params["perturb"]["levels"], device=params["device"], desc=f"score {model}")
    # how much was computed now (it depends on what an interrupted run left) is printed, not written
    write_json(metrics or layout.details("score", model), {"model": model, **summary})
    typer.echo(f"score: {model}: {line} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run(app)
