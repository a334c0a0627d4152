"""Stage recon: train an E_post -> E_pre reconstructor for one model, keep its best checkpoint.

Images are read from the vector shards a window at a time (params max_window_mb), so memory does not
grow with the number of images; on CUDA only the current batch is on the GPU. Data parallel on the
GPUs of one node: `torchrun --nproc-per-node N stages/recon.py --model NAME` (every rank trains on its
share of each batch; the result is the one-process result of the same global batch, to float precision).
"""

import json
import os
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import typer
from dvclive import Live

from common import dvclive_logger, load_params, run, write_json
from conngeo import layout
from conngeo.data.vectors import VectorReader, images_within, shard_folders
from conngeo.recon import (SPLITS, TEST, TRAIN, VAL, Normalizer, ReconConfig, TrainSettings, choose_model_type,
                           evaluate, load_reconstructor, split_by_stem, train_reconstructor, write_split)

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
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's choice)"),
):
    """Fit z-scores on the training split (by stem hash), train with early stopping on the validation split,
    save the best model, score it on every split (test: the numbers to report)."""
    if threads:
        torch.set_num_threads(threads)
    params = load_params()
    cfg = params["recon"]
    device, rank, world = params["device"], 0, 1
    if "WORLD_SIZE" in os.environ:  # under torchrun: one process per GPU (or CPU process, gloo)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    vectors = vectors or layout.data("vectors", model)
    out = out or layout.data("recon", model)
    start = time.perf_counter()
    reader = VectorReader(shard_folders(vectors, f"dvc repro extract@{model}"))
    n_pre, d_pre, n_post, d_post = reader.tokens("pre"), reader.width["pre"], reader.tokens("post"), reader.width["post"]
    split = split_by_stem(reader.stems, cfg["val_fraction"], cfg["test_fraction"])
    index = {side: [i for i, s in enumerate(split) if s == side] for side in SPLITS}
    window = images_within(params["max_window_mb"], reader.image_bytes(), at_least=cfg["batch_size"])
    if rank == 0:
        typer.echo(f"recon: {model}: {len(reader)} images from {vectors} ({len(index[TRAIN])} train, "
                   f"{len(index[VAL])} val, {len(index[TEST])} test), E_post {n_post}x{d_post} -> E_pre {n_pre}x{d_pre}, "
                   f"{window} images in memory at a time" + (f", {world} processes" if world > 1 else ""))

    if eval_only:
        norm = Normalizer.load(out / "norm.safetensors")
        recon, config = load_reconstructor(out, device)
        if (config.n_pre, config.d_pre, config.n_post, config.d_post) != (n_pre, d_pre, n_post, d_post):
            raise SystemExit(f"{out / 'config.json'} was trained for E_post {config.n_post}x{config.d_post} -> E_pre "
                             f"{config.n_pre}x{config.d_pre}, not this data's; retrain without --eval-only")
        training = json.loads((out / "training.json").read_text()) if (out / "training.json").is_file() else {}
    else:
        config = ReconConfig(choose_model_type(cfg["model_type"], n_pre, n_post), n_post, d_post, n_pre, d_pre,
                             hidden_size=cfg["hidden_size"], num_layers=cfg["num_layers"],
                             num_heads=cfg["num_heads"], dropout=cfg["dropout"])
        settings = TrainSettings(epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"], warmup=cfg["warmup"],
                                 weight_decay=cfg["weight_decay"], patience=cfg["patience"], seed=cfg["seed"],
                                 device=device, window=window)
        norm = Normalizer.fit(reader, index[TRAIN], window=window)  # training images only
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            write_split(out / "split.csv", reader.stems, split)
            norm.save(out / "norm.safetensors", metadata={"fitted_on": "train", "images": len(index[TRAIN])})
        with Live(dir=str(live or layout.live("recon", model)), dvcyaml=False, save_dvc_exp=False) \
                if rank == 0 else nullcontext() as dvclive:
            logger = dvclive_logger(dvclive) if dvclive else None
            log = (lambda epoch, values: logger(epoch, {k: v for k, v in values.items() if k != "epoch"})) if logger else None
            training = train_reconstructor(config, reader, index[TRAIN], index[VAL], norm, settings, out, log=log,
                                           resume=resume)
        if world > 1:
            dist.destroy_process_group()
        if rank:
            return
        if training["resumed_from_epoch"]:
            typer.echo(f"recon: {model}: resumed an interrupted training at epoch {training['resumed_from_epoch']}")
        # the same file whether or not the run was interrupted and resumed
        (out / "training.json").write_text(json.dumps({k: v for k, v in training.items() if k != "resumed_from_epoch"},
                                                      indent=2) + "\n")
        recon, _ = load_reconstructor(out, device)  # score what was saved, not what is in memory

    scores = {side: evaluate(recon, reader, index[side], norm, window=window, device=device) for side in SPLITS}
    report = {"model_type": config.model_type, "config": asdict(config), "eval_only": eval_only,
              "images": {side: len(index[side]) for side in SPLITS},
              **{f"{side}_{k}": scores[side][k] for side in (TEST, VAL, TRAIN) for k in ("loss", "cosine")},
              **{k: training[k] for k in ("best_epoch", "epochs_run", "stopped_early", "parameters") if k in training}}
    metrics = metrics or layout.details("recon", model)
    write_json(metrics, report)
    typer.echo(f"recon: {model}: {config.model_type}, test loss {report['test_loss']:.4f} (z-MSE), "
               f"test cosine {report['test_cosine']:.4f}; {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run(app)
