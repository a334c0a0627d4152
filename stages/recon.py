"""Stage recon: train an E_post -> E_pre reconstructor for one model, keep its best checkpoint."""

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
import typer
from dvclive import Live

from common import dvclive_logger, load_params
from conngeo.data.vectors import is_complete
from conngeo.recon import (Normalizer, ReconConfig, TrainSettings, choose_model_type, evaluate, load_pairs,
                           load_reconstructor, split_by_stem, train_reconstructor, write_split)
from conngeo.recon.data import TRAIN

app = typer.Typer(add_completion=False)


def shard_folders(root: Path) -> list[Path]:
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not folders or not all(is_complete(f) for f in folders):
        raise SystemExit(f"{root}: missing or incomplete vector shards; run `dvc repro extract` first")
    return folders


def requested_type(cfg: dict, model: str) -> str:
    """params recon.model_type: one value for every model, or {model: value} (missing models: auto)."""
    value = cfg.get("model_type", "auto")
    return value.get(model, "auto") if isinstance(value, dict) else value


@app.command()
def main(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    vectors: Path = typer.Option(None, help="vector shards (default data/vectors/<model>)"),
    out: Path = typer.Option(None, help="checkpoint folder (default data/recon/<model>)"),
    metrics: Path = typer.Option(None, help="default metrics/recon/<model>.json"),
    live: Path = typer.Option(None, help="dvclive folder (default dvclive/recon/<model>)"),
    eval_only: bool = typer.Option(False, help="no training: load the saved model and normalisation, score validation"),
    resume: bool = typer.Option(True, help="continue an interrupted training from its last finished epoch"),
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's choice)"),
):
    """Fit z-scores on the training split (by stem hash), train with early stopping, save the best model."""
    if threads:
        torch.set_num_threads(threads)
    params = load_params()
    cfg = params["recon"]
    vectors = vectors or Path("data/vectors") / model
    out = out or Path("data/recon") / model
    start = time.perf_counter()
    pairs = load_pairs(shard_folders(vectors))
    split = split_by_stem(pairs.stems, cfg["val_fraction"])
    is_train = torch.tensor([s == TRAIN for s in split])
    train, val = pairs.select(is_train), pairs.select(~is_train)
    n_pre, d_pre, n_post, d_post = *pairs.pre.shape[1:], *pairs.post.shape[1:]
    typer.echo(f"recon: {model}: {len(pairs.stems)} images from {vectors} ({len(train.stems)} train, "
               f"{len(val.stems)} val), E_post {n_post}x{d_post} -> E_pre {n_pre}x{d_pre}")
    device = params["device"]

    if eval_only:
        norm = Normalizer.load(out / "norm.safetensors")
        recon, config = load_reconstructor(out, device)
        if (config.n_pre, config.d_pre, config.n_post, config.d_post) != (n_pre, d_pre, n_post, d_post):
            raise SystemExit(f"{out / 'config.json'} was trained for E_post {config.n_post}x{config.d_post} -> E_pre "
                             f"{config.n_pre}x{config.d_pre}, not this data's; retrain without --eval-only")
        training = json.loads((out / "training.json").read_text()) if (out / "training.json").is_file() else {}
    else:
        config = ReconConfig(choose_model_type(requested_type(cfg, model), n_pre, n_post), n_post, d_post, n_pre, d_pre,
                             hidden_size=cfg["hidden_size"], num_layers=cfg["num_layers"],
                             num_heads=cfg["num_heads"], dropout=cfg["dropout"])
        settings = TrainSettings(epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"], warmup=cfg["warmup"],
                                 weight_decay=cfg["weight_decay"], patience=cfg["patience"], seed=cfg["seed"],
                                 device=device)
        out.mkdir(parents=True, exist_ok=True)
        write_split(out / "split.csv", pairs.stems, split)
        norm = Normalizer.fit(train)  # training images only
        norm.save(out / "norm.safetensors", metadata={"fitted_on": "train", "images": len(train.stems)})
        with Live(dir=str(live or Path("dvclive/recon") / model), dvcyaml=False, save_dvc_exp=False) as dvclive:
            logger = dvclive_logger(dvclive)
            log = lambda epoch, values: logger(epoch, {k: v for k, v in values.items() if k != "epoch"})  # noqa: E731
            training = train_reconstructor(config, train, val, norm, settings, out, log=log, resume=resume)
        (out / "training.json").write_text(json.dumps(training, indent=2) + "\n")
        recon, _ = load_reconstructor(out, device)  # score what was saved, not what is in memory

    scores = {side: evaluate(recon, part, norm, device=device) for side, part in (("train", train), ("val", val))}
    report = {"model_type": config.model_type, "config": asdict(config), "eval_only": eval_only,
              "images": {"train": len(train.stems), "val": len(val.stems)},
              "val_loss": scores["val"]["loss"], "val_cosine": scores["val"]["cosine"],
              "train_loss": scores["train"]["loss"], "train_cosine": scores["train"]["cosine"],
              **{k: training[k] for k in ("best_epoch", "epochs_run", "stopped_early", "parameters") if k in training},
              "seconds": round(time.perf_counter() - start, 1)}
    metrics = metrics or Path("metrics/recon") / f"{model}.json"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(f"recon: {model}: {config.model_type}, val loss {report['val_loss']:.4f} (z-MSE), "
               f"val cosine {report['val_cosine']:.4f}; {out} in {report['seconds']} s")


if __name__ == "__main__":
    app()
