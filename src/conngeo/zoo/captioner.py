"""Training and checking the tiny zoo: a family's tiny model learns to caption the toy-food world.

The recipe follows the real families: LLaVA and Idefics2 keep a pretrained vision encoder frozen and
train connector + language model; the Qwen families train everything jointly
(`Adapter.trains_vision_encoder`). The loss is the model's own caption loss (`labels` from
`Adapter.prepare(images, captions)`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from .. import interrupt
from ..data.toyworld import caption_truth
from ..schedule import warmup_cosine
from ..resume import digest, load_state, save_state

ATTRIBUTES = ("parses", "kinds", "counts", "colours", "exact")


def trainable_parameters(adapter) -> list[torch.nn.Parameter]:
    """Everything, or everything but the vision encoder where the family's recipe freezes it."""
    if adapter.trains_vision_encoder:
        return [p for p in adapter.model.parameters() if p.requires_grad]
    frozen = {id(p) for p in adapter.vision_encoder().parameters()}
    frozen -= {id(p) for p in adapter.connector().parameters()}
    for p in adapter.model.parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
    return [p for p in adapter.model.parameters() if p.requires_grad]


def start_digest(model: torch.nn.Module, images: list[Image.Image]) -> str:
    """sha256 of every parameter's bytes and every image's pixels before training: a saved training
    state resumes only a run from the same start (initialisation, frozen encoder or base model, images)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    for image in images:
        h.update(image.tobytes())
    return h.hexdigest()[:16]


def dihedral(image: Image.Image, draw: torch.Tensor) -> Image.Image:
    """One of the 8 flips/rotations of a square image, chosen by three coin tosses in `draw`."""
    if draw[0]:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if draw[1]:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if draw[2]:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    return image


def train_captioner(adapter, images: list, captions: list[str], *, steps: int, batch_size: int, lr: float,
                    seed: int = 0, warmup: int = 100, weight_decay: float = 0.01, augment: bool = False,
                    log: Callable[[int, dict], None] | None = None, log_every: int = 50,
                    heldout: tuple[list, list[str]] | None = None, eval_every: int = 250,
                    state: Path | None = None, save_every: int = 100, progress: bool = True) -> list[float]:
    """Train `adapter.model` on (image, caption) pairs with its caption loss; returns the loss per step.

    `augment` shows each image under a random flip/rotation (`dihedral`): only for captions that
    say nothing about left, right, up or down, as the toy world's do.
    `state`: a file where every `save_every` steps the trained parameters, the optimizer, the step, the
    data order and the random states are kept (conngeo.resume.save_state), so that an interrupted run
    resumes from its last save and ends as the uninterrupted one would; removed when training ends.
    A SIGTERM (conngeo.interrupt) stops the loop right after a save. `progress`: a progress bar.
    `heldout`: (images, captions) whose greedy-caption accuracy (`caption_accuracy`) is logged as
    `heldout/<attribute>` every `eval_every` steps and at the last; greedy decoding draws no random
    numbers, so the trained weights are the same with or without it.
    """
    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    params = trainable_parameters(adapter)
    named = {name: p for name, p in adapter.model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warmup))
    model = training_mode(adapter)
    losses, perm, first = [], torch.empty(0, dtype=torch.long), 0
    fp = digest([adapter.family, sorted(named), len(images), captions, steps, batch_size, lr, seed, warmup,
                 weight_decay, augment, start_digest(adapter.model, images)])
    loaded = load_state(state, fp, opt, next(iter(params)).device) if state else None
    if loaded is not None:
        weights, meta = loaded
        with torch.no_grad():
            for name, value in weights.items():
                if name.startswith("rng."):
                    continue
                named[name].copy_(value)
        first, losses, perm = meta["step"], meta["losses"], weights["rng.perm"].long()
        torch.set_rng_state(weights["rng.torch"].to(torch.uint8))
        order.set_state(weights["rng.order"].to(torch.uint8))
        sched.last_epoch = first  # the schedule at step `first`, as `first` scheduler steps would leave it
        for group, base in zip(opt.param_groups, sched.base_lrs):
            group["lr"] = base * warmup_cosine(first, steps, warmup)
        sched._last_lr = [group["lr"] for group in opt.param_groups]
    for step in tqdm(range(first, steps), desc=f"train {adapter.family}", unit="step", initial=first, total=steps,
                     disable=not progress):
        if len(perm) < batch_size:
            perm = torch.randperm(len(images), generator=order)
        idx, perm = perm[:batch_size].tolist(), perm[batch_size:]
        batch_images = [images[i] for i in idx]
        if augment:
            draws = torch.randint(0, 2, (len(idx), 3), generator=order)
            batch_images = [dihedral(image, draw) for image, draw in zip(batch_images, draws)]
        batch = adapter.prepare(batch_images, [captions[i] for i in idx])
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step % log_every == 0 or step == steps - 1):
            log(step, {"loss": sum(losses[-log_every:]) / len(losses[-log_every:]), "lr": sched.get_last_lr()[0]})
        if log and heldout and ((step + 1) % eval_every == 0 or step == steps - 1):
            log(step, {f"heldout/{k}": v for k, v in heldout_accuracy(adapter, *heldout).items()})
        if state and (step + 1) % save_every == 0 and step + 1 < steps:
            rng = {"rng.perm": perm, "rng.torch": torch.get_rng_state(), "rng.order": order.get_state()}
            save_state(state, {**named, **rng}, opt, {"fingerprint": fp, "step": step + 1, "losses": losses})
            interrupt.check(f"step {step + 1} of {steps}")
    model.eval()
    if state:
        Path(state).unlink(missing_ok=True)
    return losses


def training_mode(adapter) -> torch.nn.Module:
    """The model in training mode, a frozen vision encoder left in eval mode (no dropout noise either)."""
    adapter.model.train()
    if not adapter.trains_vision_encoder:
        adapter.vision_encoder().eval()
    return adapter.model


def heldout_accuracy(adapter, images: list, captions: list[str]) -> dict[str, float]:
    """`caption_accuracy` in the middle of training: eval mode for the check, training mode after."""
    adapter.model.eval()
    accuracy, _ = caption_accuracy(adapter, images, captions)
    training_mode(adapter)
    return accuracy


@torch.no_grad()
def caption_accuracy(adapter, images: list, references: list[str], batch_size: int = 64,
                     max_new_tokens: int = 24) -> tuple[dict[str, float], list[str]]:
    """Per-attribute accuracy of greedy captions against the toy world's reference captions."""
    generated = []
    for i in range(0, len(images), batch_size):
        generated += adapter.generate(images[i:i + batch_size], max_new_tokens=max_new_tokens)
    truth = [caption_truth(g, r) for g, r in zip(generated, references)]
    return {a: sum(t[a] for t in truth) / len(truth) for a in ATTRIBUTES}, generated
