"""One model's reconstructor, end to end: trained and scored on its splits (`fit_reconstructor`), the
reconstructed E_pre of every image written in the extraction's shard format (`export_reconstructions`), and
every image's reconstruction judged against the baselines (`evaluate_reconstructions`). The recon, recon_export
and recon_eval stages call these; the pieces are conngeo.recon's other modules.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import interrupt
from ..data.vectors import TensorWriter, VectorReader, dtype_of, images_within, is_complete, write_index
from ..resume import STAMP, files_digest, stamp, stamped
from .data import SPLITS, TEST, TRAIN, VAL, Normalizer, read_split, split_by_stem, write_split
from .evaluate import reconstruction_report
from .figures import note_figure, patch_loss_figure
from .models import ReconConfig, choose_model_type, load_reconstructor
from .train import TrainSettings, evaluate, rank_and_world, reconstruct, train_reconstructor


def distributed(device: str) -> str:
    """Join the process group where torchrun started this process (WORLD_SIZE set: one process per GPU, or CPU
    processes under gloo); this rank's device (cuda:<LOCAL_RANK> on CUDA). Elsewhere `device` as it is."""
    if "WORLD_SIZE" not in os.environ:
        return device
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return device


def fit_reconstructor(reader: VectorReader, out: Path, cfg: Mapping, *, device: str, max_window_mb: float,
                      log: Callable[[int, dict], None] | None = None, resume: bool = True, eval_only: bool = False,
                      say: Callable[[str], None] = lambda line: None) -> dict | None:
    """Fit z-scores on the training split (by stem hash), train a reconstructor with early stopping on the
    validation split (conngeo.recon.train), keep the best in `out` (with split.csv, norm.safetensors,
    training.json), score it on every split; the report (None on ranks other than 0 of a torchrun group).

    cfg: the settings (params recon: model_type, sizes, epochs, patience, batch_size, lr, warmup, weight_decay,
    val_fraction, test_fraction, seed). eval_only: no training, the saved model and normalisation scored.
    resume: continue an interrupted training from its last finished epoch. log: `log(epoch, values)` of every
    epoch (rank 0). say: a callback for the line that describes the data."""
    rank, world = rank_and_world()
    n_pre, d_pre, n_post, d_post = reader.tokens("pre"), reader.width["pre"], reader.tokens("post"), reader.width["post"]
    split = split_by_stem(reader.stems, cfg["val_fraction"], cfg["test_fraction"])
    index = {side: [i for i, s in enumerate(split) if s == side] for side in SPLITS}
    window = images_within(max_window_mb, reader.image_bytes(), at_least=cfg["batch_size"])
    if rank == 0:
        say(f"{len(reader)} images ({len(index[TRAIN])} train, {len(index[VAL])} val, {len(index[TEST])} test), E_post "
            f"{n_post}x{d_post} -> E_pre {n_pre}x{d_pre}, {window} images in memory at a time"
            + (f", {world} processes" if world > 1 else ""))

    if eval_only:
        norm = Normalizer.load(out / "norm.safetensors")
        recon, config = load_reconstructor(out, device)
        if (config.n_pre, config.d_pre, config.n_post, config.d_post) != (n_pre, d_pre, n_post, d_post):
            raise ValueError(f"{out / 'config.json'} was trained for E_post {config.n_post}x{config.d_post} -> E_pre "
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
        epochs = (lambda epoch, values: log(epoch, {k: v for k, v in values.items() if k != "epoch"})) if log else None
        training = train_reconstructor(config, reader, index[TRAIN], index[VAL], norm, settings, out, log=epochs,
                                       resume=resume)
        if world > 1:
            dist.destroy_process_group()
        if rank:
            return None
        if training["resumed_from_epoch"]:
            say(f"resumed an interrupted training at epoch {training['resumed_from_epoch']}")
        # the same file whether or not the run was interrupted and resumed
        (out / "training.json").write_text(json.dumps({k: v for k, v in training.items() if k != "resumed_from_epoch"},
                                                      indent=2) + "\n")
        recon, _ = load_reconstructor(out, device)  # score what was saved, not what is in memory

    scores = {side: evaluate(recon, reader, index[side], norm, window=window, device=device) for side in SPLITS}
    return {"model_type": config.model_type, "config": asdict(config), "eval_only": eval_only,
            "images": {side: len(index[side]) for side in SPLITS},
            **{f"{side}_{k}": scores[side][k] for side in (TEST, VAL, TRAIN) for k in ("loss", "cosine")},
            **{k: training[k] for k in ("best_epoch", "epochs_run", "stopped_early", "parameters") if k in training}}


def export_reconstructions(shards: list[Path], recon: Path, out: Path, *, batch_size: int, max_window_mb: float,
                           device: str, remedy: str = "") -> dict:
    """The reconstructed E_pre of every image of the vector `shards`, by the reconstructor in `recon`, into
    <out>/<shard>/ (pre.safetensors, index.csv, fingerprint.json): the same shards, stems, token order and dtype
    as the extraction's E_pre. Written `batch_size` images at a time (within max_window_mb), a shard at a time;
    a shard finished by an interrupted run of the same reconstructor on the same vectors is kept, a shard the
    vectors no longer have is removed. `remedy`: what to run where the reconstructor does not fit the vectors.
    Returns {"images": exported now, "shards", "kept"}."""
    norm = Normalizer.load(recon / "norm.safetensors")
    net, config = load_reconstructor(recon, device)
    for old in sorted(p for p in out.iterdir() if p.is_dir() and p.name not in {f.name for f in shards}) \
            if out.is_dir() else []:
        shutil.rmtree(old)  # a shard the vectors no longer have
    model = [recon / name for name in ("model.safetensors", "config.json", "norm.safetensors")]
    images = kept = 0
    for folder in shards:
        reader = VectorReader([folder])
        if (reader.tokens("post"), reader.width["post"]) != (config.n_post, config.d_post):
            raise ValueError(f"{folder / 'post.safetensors'}: E_post is {reader.tokens('post')}x{reader.width['post']} "
                             f"per image but {recon} was trained on {config.n_post}x{config.d_post}; {remedy}")
        # a shard exported by an interrupted run of the same reconstructor from the same vectors is kept
        fp = files_digest(model + [p for p in (folder / "index.csv", folder / STAMP) if p.is_file()])
        shard_out = out / folder.name
        if is_complete(shard_out, ("pre",)) and stamped(shard_out, fp) is not None:
            kept += 1
            continue
        window = min(batch_size, images_within(max_window_mb, reader.image_bytes()))
        shard_out.mkdir(parents=True, exist_ok=True)
        (shard_out / "index.csv").unlink(missing_ok=True)  # incomplete while the file is written
        writer = TensorWriter(shard_out / "pre.safetensors", "vectors", (len(reader) * config.n_pre, config.d_pre),
                              dtype_of(reader.dtype["pre"]))
        for start_at in tqdm(range(0, len(reader), window), desc=f"recon_export {folder.name}"):
            part = list(range(start_at, min(start_at + window, len(reader))))
            pre = reconstruct(net, reader.read("post", part), norm, device=device)
            writer.write(pre.reshape(-1, config.d_pre))
        writer.close()
        write_index(shard_out, reader.stems, [config.n_pre] * len(reader))
        stamp(shard_out, fp)
        images += len(reader)
        interrupt.check(f"shard {folder.name}")
    return {"images": images, "shards": len(shards), "kept": kept}


def evaluate_reconstructions(original: VectorReader, rebuilt: VectorReader, recon: Path, out: Path, plot: Path, *,
                             alphas, linear_max_features: int, patch_maps: int, max_window_mb: float,
                             title: str, remedy: str = "") -> tuple[dict, str | None]:
    """Every image's reconstruction (`rebuilt`, E_pre only) against `original`, on the split the reconstructor
    in `recon` was trained with: <out>/per_image.csv (stem, split, every column of
    conngeo.recon.evaluate.reconstruction_report), <out>/patch_loss.csv (per-patch z-MSE on the patch grid,
    raster order, for the mean over the test images and `patch_maps` test images from best to worst) and their
    figure at `plot` (a note where E_pre is no square patch grid). Returns the summary per split with the
    baselines' verdicts, and that note (None where there are maps). The token layout is the one the extraction recorded: no family is named here. `title`: the
    figure's model name; `remedy`: what to run where the split does not cover the images."""
    saved_split = read_split(recon / "split.csv")
    missing = [s for s in original.stems if s not in saved_split]
    if missing:
        raise ValueError(f"{recon / 'split.csv'} has no split for {len(missing)} images (e.g. {missing[:3]}); "
                         f"the reconstructor was trained on other images: {remedy}")
    split = [saved_split[s] for s in original.stems]
    norm = Normalizer.load(recon / "norm.safetensors")
    tokens = original.layout  # the token layout the extraction recorded
    columns, summary, patch = reconstruction_report(
        original, rebuilt, split, norm, tokens.get("pre_to_post"), alphas=alphas,
        window=images_within(max_window_mb, original.image_bytes() + rebuilt.image_bytes()),
        linear_max_features=linear_max_features)
    summary = {"model_type": ReconConfig.load(recon).model_type, **summary}

    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"stem": original.stems, "split": split, **{k: v.numpy() for k, v in columns.items()}})
    table.to_csv(out / "per_image.csv", index=False, float_format="%.6g")

    raster = tokens.get("pre_raster")
    if raster is None:
        note = f"{title}: {patch.shape[1]} E_pre tokens are not a square patch grid; no patch-loss maps"
        note_figure(plot, note)
        return summary, note
    side = int(len(raster) ** 0.5)
    maps = patch[:, torch.tensor(raster)].reshape(-1, side, side)
    test_idx = [i for i, s in enumerate(split) if s == TEST]
    ranked = sorted(test_idx, key=lambda i: float(columns["mse_z"][i]))
    k = min(patch_maps, len(ranked))
    picks = [ranked[round(j * (len(ranked) - 1) / max(k - 1, 1))] for j in range(k)]  # best .. worst
    shown = torch.cat([maps[test_idx].mean(dim=0, keepdim=True), maps[picks]])
    names = ["test_mean"] + [original.stems[i] for i in picks]
    rows = [(name, r, c, float(m[r, c])) for name, m in zip(names, shown)
            for r in range(m.shape[0]) for c in range(m.shape[1])]
    pd.DataFrame(rows, columns=["image", "row", "col", "mse_z"]).to_csv(out / "patch_loss.csv", index=False,
                                                                        float_format="%.6g")
    titles = [f"mean of {len(test_idx)} test images"] + [
        f"{original.stems[i]}\nimage MSE {float(columns['mse_z'][i]):.3g}" for i in picks]
    patch_loss_figure(shown, titles, plot, f"{title} ({summary['model_type']}): E_pre reconstruction error "
                                           "per patch, test images, best to worst")
    return summary, None
