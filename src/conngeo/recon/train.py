"""Train a reconstructor on z-scored (E_post -> E_pre) pairs, with early stopping and resume.

Loss: MSE in z-units, (1/(T D)) sum (P - z(E_pre))^2 averaged over the batch. AdamW, learning rate
lr * warmup_cosine(step) (linear warmup over `warmup` steps, cosine decay to 0.1 lr at the last
epoch), gradient norm clipped to 1, autocast bf16 on CUDA and full float32 elsewhere.

After every epoch the validation loss decides: a new best is saved at once (model.safetensors +
config.json in `out`), and `patience` epochs without a new best stop the run. Then the training
state (current weights, AdamW moments, counters) is written to `out`/train_state.safetensors, so an
interrupted run resumes from its last finished epoch. The data order and dropout noise of an epoch
depend only on (seed, epoch), so a resumed run computes what the uninterrupted one would have. The
state carries a fingerprint of the config, settings and split; another fingerprint starts afresh.
The state file is removed when training finishes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from conngeo.data.vectors import atomic_save
from conngeo.models.zoo import warmup_cosine
from conngeo.recon.data import Normalizer, Pairs
from conngeo.recon.metrics import token_cosine
from conngeo.recon.models import CONFIG, WEIGHTS, ReconConfig, build_reconstructor, save_reconstructor

STATE = "train_state.safetensors"


@dataclass
class TrainSettings:
    epochs: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100          # steps of linear warmup
    weight_decay: float = 0.01
    patience: int = 20         # epochs without a better validation loss before stopping
    seed: int = 0
    device: str = "cpu"


def autocast(device: str):
    """bf16 autocast on CUDA, nothing elsewhere (CPU bf16 is slow and lossy for small models)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_z(model: torch.nn.Module, post: torch.Tensor, norm: Normalizer, batch_size: int = 256,
              device: str = "cpu") -> torch.Tensor:
    """The model's E_pre in z-units, [N, n_pre, d_pre] float32 on the CPU, from raw E_post [N, n_post, d_post]."""
    was_training = model.training
    model.eval()
    outs = []
    for i in range(0, post.shape[0], batch_size):
        with autocast(device):
            outs.append(model(norm.post_to_z(post[i:i + batch_size].to(device))).float().cpu())
    model.train(was_training)
    return torch.cat(outs)


def reconstruct(model: torch.nn.Module, post: torch.Tensor, norm: Normalizer, batch_size: int = 256,
                device: str = "cpu") -> torch.Tensor:
    """The reconstructed E_pre in raw units, [N, n_pre, d_pre] float32, from raw E_post."""
    return norm.pre_from_z(predict_z(model, post, norm, batch_size, device))


def evaluate(model: torch.nn.Module, pairs: Pairs, norm: Normalizer, batch_size: int = 256,
             device: str = "cpu") -> dict[str, float]:
    """{loss: MSE in z-units (the training loss), cosine: mean per-token cosine in raw units}."""
    pred_z = predict_z(model, pairs.post, norm, batch_size, device)
    loss = (pred_z - norm.pre_to_z(pairs.pre)).pow(2).mean().item()
    cosine = token_cosine(norm.pre_from_z(pred_z), pairs.pre).mean().item()
    return {"loss": loss, "cosine": cosine}


def fingerprint(config: ReconConfig, settings: TrainSettings, train: Pairs, val: Pairs) -> str:
    blob = {"config": asdict(config), "settings": {k: v for k, v in asdict(settings).items() if k != "device"},
            "train": train.stems, "val": val.stems}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _save_state(path: Path, model, opt, meta: dict) -> None:
    tensors = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    for idx, state in opt_state["state"].items():
        for name, value in state.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(value).cpu()
    meta = {**meta, "param_groups": opt_state["param_groups"]}
    atomic_save(tensors, path, metadata={"state": json.dumps(meta)})


def _load_state(path: Path, model, opt, fp: str, device: str) -> dict | None:
    """Load the state at `path` into model and opt if its fingerprint is `fp`; its metadata, else None."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
        if meta["fingerprint"] != fp:
            return None
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value if name == "step" else value.to(device)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


def train_reconstructor(config: ReconConfig, train: Pairs, val: Pairs, norm: Normalizer, settings: TrainSettings,
                        out: Path, log: Callable[[int, dict], None] | None = None, resume: bool = True) -> dict:
    """Train (or resume) and keep the best-validation model in `out`; returns a summary.

    `log(epoch, values)` is called after every epoch with train/val loss and cosine and the lr.
    Summary: best_epoch, best_val_loss, epochs_run, stopped_early, resumed_from_epoch, parameters,
    history (one row per epoch).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = settings.device
    torch.manual_seed(settings.seed)
    model = build_reconstructor(config).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases and norms: no weight decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)
    n = len(train.stems)
    steps_per_epoch = math.ceil(n / settings.batch_size)
    total = settings.epochs * steps_per_epoch

    fp = fingerprint(config, settings, train, val)
    meta = _load_state(out / STATE, model, opt, fp, device) if resume else None
    if meta is None:
        meta = {"fingerprint": fp, "epoch": 0, "best_val_loss": math.inf, "best_epoch": -1, "bad_epochs": 0, "history": []}
        for name in (WEIGHTS, CONFIG):  # a model from an earlier run must never pass for this run's
            (out / name).unlink(missing_ok=True)
    resumed_from = meta["epoch"] if meta["epoch"] else None

    train_pre, train_post = train.pre.to(device), train.post.to(device)  # once, not per batch
    stopped_early = meta["bad_epochs"] >= settings.patience  # interrupted right after its stopping epoch
    epoch = meta["epoch"]
    while epoch < settings.epochs and not stopped_early:
        model.train()
        torch.manual_seed(settings.seed * 1_000_003 + epoch)  # dropout noise of this epoch
        order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch))
        loss_sum = cos_sum = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * settings.batch_size:(b + 1) * settings.batch_size]
            for group in opt.param_groups:
                group["lr"] = settings.lr * warmup_cosine(epoch * steps_per_epoch + b, total, settings.warmup)
            idx = idx.to(device)
            pre, post = train_pre[idx], train_post[idx]
            target = norm.pre_to_z(pre)
            with autocast(device):
                pred = model(norm.post_to_z(post))
            loss = (pred.float() - target).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_sum += loss.item() * len(idx)
            cos_sum += token_cosine(norm.pre_from_z(pred.detach()), pre).mean().item() * len(idx)
        scores = evaluate(model, val, norm, device=device)
        if scores["loss"] < meta["best_val_loss"]:
            meta.update(best_val_loss=scores["loss"], best_epoch=epoch, bad_epochs=0)
            save_reconstructor(model, config, out)
        else:
            meta["bad_epochs"] += 1
        row = {"epoch": epoch, "train/loss": loss_sum / n, "train/cosine": cos_sum / n,
               "val/loss": scores["loss"], "val/cosine": scores["cosine"], "lr": opt.param_groups[0]["lr"]}
        meta["history"].append(row)
        meta["epoch"] = epoch + 1
        _save_state(out / STATE, model, opt, meta)
        if log:
            log(epoch, row)
        stopped_early = meta["bad_epochs"] >= settings.patience
        epoch += 1

    (out / STATE).unlink(missing_ok=True)
    return {"best_epoch": meta["best_epoch"], "best_val_loss": meta["best_val_loss"], "epochs_run": meta["epoch"],
            "stopped_early": stopped_early, "resumed_from_epoch": resumed_from,
            "parameters": sum(p.numel() for p in model.parameters()), "history": meta["history"]}
