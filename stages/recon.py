"""Stage recon: train an E_post -> E_pre reconstructor for one model, keep its best checkpoint.

Images are read from the vector shards a window at a time (params max_window_mb), so memory does not
grow with the number of images; on CUDA only the current batch is on the GPU. Data parallel on the
GPUs of one node: `torchrun --nproc-per-node N stages/recon.py --model NAME` (every rank trains on its
share of each batch; the result is the one-process result of the same global batch, to float precision).
The work is conngeo.recon.study.fit_reconstructor.
"""

import time
from contextlib import nullcontext
from pathlib import Path

import typer
from dvclive import Live

from common import dvclive_logger, load_params, run, use_threads, write_json
from conngeo import layout
from conngeo.data.vectors import VectorReader, shard_folders
from conngeo.recon.study import distributed, fit_reconstructor
from conngeo.recon.train import rank_and_world

app = typer.Typer(add_completion=False)


@app.command()
def main(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    vectors: Path = typer.Option(None, help="vector shards (default data/vectors/<model>)"),
    out: Path = typer.Option(None, help="checkpoint folder (default data/recon/<model>)"),
    metrics: Path = typer.Option(None, help="default metrics/recon/<model>.json"),
    live: Path = typer.Option(None, help="dvclive folder (default dvclive/recon/<model>)"),
    eval_only: bool = typer.Option(False, help="no training: load the saved model and normalisation, score the splits"),
    resume: bool = typer.Option(True, help="continue an interrupted training from its last finished epoch"),
):
    """Fit z-scores on the training split (by stem hash), train with early stopping on the validation split,
    save the best model, score it on every split (test: the numbers to report)."""
    params = load_params()
    use_threads(params["threads"])  # the thread count changes the trained weights' last bits
    device = distributed(params["device"])  # under torchrun: this rank's
    vectors, out, start = vectors or layout.data("vectors", model), out or layout.data("recon", model), time.perf_counter()
    reader = VectorReader(shard_folders(vectors, f"dvc repro extract@{model}"))
    curves = Live(dir=str(live or layout.live("recon", model)), dvcyaml=False, save_dvc_exp=False) \
        if rank_and_world()[0] == 0 and not eval_only else nullcontext()
    with curves as dvclive:
        report = fit_reconstructor(reader, out, params["recon"], device=device, max_window_mb=params["max_window_mb"],
                                   log=dvclive_logger(dvclive) if dvclive else None, resume=resume, eval_only=eval_only,
                                   say=lambda line: typer.echo(f"recon: {model}: {line}"))
    if report is None:  # not rank 0 of a torchrun group
        return
    write_json(metrics or layout.details("recon", model), report)
    typer.echo(f"recon: {model}: {report['model_type']}, test loss {report['test_loss']:.4f} (z-MSE), "
               f"test cosine {report['test_cosine']:.4f}; {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run(app)
