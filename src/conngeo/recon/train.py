"""Train a reconstructor on z-scored (E_post -> E_pre) pairs, streaming, with early stopping and resume.

Loss: MSE in z-units, (1/(T D)) sum (P - z(E_pre))^2 per image, averaged over the batch. AdamW, learning
rate lr * warmup_cosine(step) (linear warmup over `warmup` steps, cosine decay to 0.1 lr at the last
epoch), gradient norm clipped to 1, autocast bf16 on CUDA and full float32 elsewhere.

Data: images are read from the source a window at a time (conngeo.recon.data: windows of consecutive
training images in a shuffled order, images shuffled inside a window), so memory holds one window of
`window` images and the device one batch; batches do not cross windows.

After every epoch the validation loss decides: a new best is saved at once (model.safetensors +
config.json in `out`), and `patience` epochs without a new best stop the run. Then the training
state (current weights, AdamW moments, counters) is written to `out`/train_state.safetensors, so an
interrupted run resumes from its last finished epoch. The data order and dropout noise of an epoch
depend only on (seed, epoch), so a resumed run computes what the uninterrupted one would have. The
state carries a fingerprint of the config, settings, split and data (its z-statistics); another
fingerprint starts afresh. The state file is removed when training finishes.

Data parallel: inside an initialised torch.distributed process group (`torchrun`), the model is
wrapped in DistributedDataParallel and every rank reads and trains on its share of each batch (images
r, r + W, ... of it): each rank's loss is its images' sum / the batch size * W, so that the averaged
gradient is the one-process gradient of the whole batch; every rank evaluates the validation images
itself (they are few) and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from conngeo import interrupt
from conngeo.recon.data import Normalizer, Pairs, windows
from conngeo.recon.metrics import token_cosine
from conngeo.recon.models import CONFIG, WEIGHTS, ReconConfig, build_reconstructor, save_reconstructor
from conngeo.resume import digest, load_state, save_state
from conngeo.schedule import warmup_cosine

STATE = "train_state.safetensors"


@dataclass
class TrainSettings:
    """The training knobs (params.yaml `recon` has them all; nothing here is a default of its own)."""

    epochs: int
    batch_size: int
    lr: float
    warmup: int              # steps of linear warmup
    weight_decay: float
    patience: int            # epochs without a better validation loss before stopping
    seed: int
    device: str
    window: int              # images read into memory at once (see conngeo.recon.data)


def autocast(device: str):
    """bf16 autocast on CUDA, nothing elsewhere (CPU bf16 is slow and lossy for small models)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


@torch.no_grad()
def predict_z(model: torch.nn.Module, post: torch.Tensor, norm: Normalizer, device: str = "cpu") -> torch.Tensor:
    """The model's E_pre in z-units, [N, n_pre, d_pre] float32 on the CPU, from raw E_post [N, n_post, d_post]."""
    was_training = model.training
    model.eval()
    with autocast(device):
        out = model(norm.post_to_z(post.to(device))).float().cpu()
    model.train(was_training)
    return out


def reconstruct(model: torch.nn.Module, post: torch.Tensor, norm: Normalizer, device: str = "cpu") -> torch.Tensor:
    """The reconstructed E_pre in raw units, [N, n_pre, d_pre] float32, from raw E_post."""
    return norm.pre_from_z(predict_z(model, post, norm, device))


def evaluate(model: torch.nn.Module, source, indices: list[int], norm: Normalizer, window: int,
             device: str = "cpu") -> dict[str, float]:
    """{loss: MSE in z-units (the training loss), cosine: mean per-token cosine in raw units} over images
    `indices` of `source`, `window` images at a time (memory does not grow with the split)."""
    loss = cosine = 0.0
    for part in windows(list(indices), window):
        pre = source.read("pre", part)
        pred_z = predict_z(model, source.read("post", part), norm, device)
        loss += (pred_z - norm.pre_to_z(pre)).pow(2).mean(dim=(1, 2)).sum().item()
        cosine += token_cosine(norm.pre_from_z(pred_z), pre).mean(dim=1).sum().item()
    return {"loss": loss / len(indices), "cosine": cosine / len(indices)}


def fingerprint(config: ReconConfig, settings: TrainSettings, train: list[str], val: list[str],
                norm: Normalizer) -> str:
    """What a saved state must match to be resumed: config, settings, split, and the data through the
    z-statistics fitted on it (vectors re-extracted from a retrained model give other statistics)."""
    moments = hashlib.sha256()
    for name in ("pre_mean", "pre_std", "post_mean", "post_std"):
        moments.update(getattr(norm, name).float().cpu().numpy().tobytes())
    blob = {"config": asdict(config), "settings": {k: v for k, v in asdict(settings).items() if k != "device"},
            "train": train, "val": val, "data": moments.hexdigest()}
    return digest(blob)


def epoch_windows(indices: list[int], window: int, seed: int) -> list[list[int]]:
    """The windows of one epoch, each with its images in training order (conngeo.recon.data)."""
    g = torch.Generator().manual_seed(seed)
    parts = windows(sorted(indices), window)
    return [[parts[w][i] for i in torch.randperm(len(parts[w]), generator=g).tolist()]
            for w in torch.randperm(len(parts), generator=g).tolist()]


def in_memory(source, train: list[int], val: list[int]) -> tuple[Pairs, list[int], list[int]]:
    """Images `train` and `val` of `source` held in memory (a Pairs), with their indices there. The new
    indices keep every order the training depends on (the sorted order of `train`, the order of `val`),
    so batches, and with them the trained weights, are the ones `source` gives."""
    ordered = sorted(train)
    rank = {i: k for k, i in enumerate(ordered)}
    keep = ordered + list(val)
    pairs = Pairs([source.stems[i] for i in keep], source.read("pre", keep), source.read("post", keep))
    return pairs, [rank[i] for i in train], list(range(len(train), len(keep)))


def train_reconstructor(config: ReconConfig, source, train: list[int], val: list[int], norm: Normalizer,
                        settings: TrainSettings, out: Path, log: Callable[[int, dict], None] | None = None,
                        resume: bool = True) -> dict:
    """Train (or resume) on images `train` of `source`, keep the best model on images `val` in `out`;
    returns a summary.

    `log(epoch, values)` is called after every epoch with train/val loss and cosine and the lr (rank 0).
    Summary: best_epoch, best_val_loss, epochs_run, stopped_early, resumed_from_epoch, parameters,
    history (one row per epoch).
    """
    out = Path(out)
    rank, world = rank_and_world()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    device = settings.device
    torch.manual_seed(settings.seed)
    model = build_reconstructor(config).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases and norms: no weight decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    window = max(settings.window, settings.batch_size)
    n = len(train)
    steps_per_epoch = sum(math.ceil(len(w) / settings.batch_size) for w in windows(sorted(train), window))
    total = settings.epochs * steps_per_epoch

    fp = fingerprint(config, settings, [source.stems[i] for i in train], [source.stems[i] for i in val], norm)
    if len(train) + len(val) <= window:  # they fit in memory: read them once, not once per epoch
        source, train, val = in_memory(source, train, val)
    loaded = load_state(out / STATE, fp, opt, device) if resume else None
    meta = None
    if loaded is not None:
        weights, meta = loaded
        model.load_state_dict(weights)
    if meta is None:
        meta = {"fingerprint": fp, "epoch": 0, "best_val_loss": math.inf, "best_epoch": -1, "bad_epochs": 0, "history": []}
        if rank == 0:
            for name in (WEIGHTS, CONFIG):  # a model from an earlier run must never pass for this run's
                (out / name).unlink(missing_ok=True)
    resumed_from = meta["epoch"] if meta["epoch"] else None
    if resumed_from and rank == 0 and log:  # the curves of the epochs before the interruption, again
        for row in meta["history"]:
            log(row["epoch"], row)

    stopped_early = meta["bad_epochs"] >= settings.patience  # interrupted right after its stopping epoch
    epoch = meta["epoch"]
    while epoch < settings.epochs and not stopped_early:
        net.train()
        seed = settings.seed * 1_000_003 + epoch
        torch.manual_seed(seed)  # dropout noise of this epoch
        sums = torch.zeros(2, dtype=torch.float64)  # loss and cosine summed over this rank's images
        step = epoch * steps_per_epoch
        for part in epoch_windows(train, window, seed):
            mine = sorted({i for b in windows(part, settings.batch_size) for i in b[rank::world]})
            at = {i: k for k, i in enumerate(mine)}
            pre_all, post_all = source.read("pre", mine), source.read("post", mine)
            pre_z_all, post_z_all = norm.pre_to_z(pre_all), norm.post_to_z(post_all)  # once per window
            for batch in windows(part, settings.batch_size):
                for group in opt.param_groups:
                    group["lr"] = settings.lr * warmup_cosine(step, total, settings.warmup)
                rows = torch.tensor([at[i] for i in batch[rank::world]], dtype=torch.long)
                pre, pre_z, post_z = pre_all[rows].to(device), pre_z_all[rows].to(device), post_z_all[rows].to(device)
                with autocast(device):
                    pred = net(post_z)
                per_image = (pred.float() - pre_z).pow(2).mean(dim=(1, 2))
                loss = per_image.sum() * world / len(batch)  # averaged over ranks: the whole batch's mean
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step += 1
                sums[0] += per_image.sum().item()
                sums[1] += token_cosine(norm.pre_from_z(pred.detach()), pre).mean(dim=1).sum().item()
        if world > 1:
            dist.all_reduce(sums)
        scores = evaluate(model, source, val, norm, window=window, device=device)
        if scores["loss"] < meta["best_val_loss"]:
            meta.update(best_val_loss=scores["loss"], best_epoch=epoch, bad_epochs=0)
            if rank == 0:
                save_reconstructor(model, config, out)
        else:
            meta["bad_epochs"] += 1
        row = {"epoch": epoch, "train/loss": sums[0].item() / n, "train/cosine": sums[1].item() / n,
               "val/loss": scores["loss"], "val/cosine": scores["cosine"], "lr": opt.param_groups[0]["lr"]}
        meta["history"].append(row)
        meta["epoch"] = epoch + 1
        if rank == 0:
            save_state(out / STATE, model.state_dict(), opt, meta)
            if log:
                log(epoch, row)
        stopped_early = meta["bad_epochs"] >= settings.patience
        epoch += 1
        interrupt.check(f"epoch {epoch - 1} of {out}")

    if world > 1:
        dist.barrier()  # every rank is done before the state goes
    if rank == 0:
        (out / STATE).unlink(missing_ok=True)
    return {"best_epoch": meta["best_epoch"], "best_val_loss": meta["best_val_loss"], "epochs_run": meta["epoch"],
            "stopped_early": stopped_early, "resumed_from_epoch": resumed_from,
            "parameters": sum(p.numel() for p in model.parameters()), "history": meta["history"]}
