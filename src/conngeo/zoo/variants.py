"""A connector variant trained: a base model's connector replaced by another kind (linear, mlp, resampler<n>,
merger; conngeo.families.variant) and trained alone with the caption loss (conngeo.zoo.captioner), the base's
vision encoder and language model frozen byte for byte; then saved, reloaded and checked on held-out images
beside its base."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..data.images import Item, load_image
from ..families.variant import ConnectorVariant
from .captioner import caption_accuracy, train_captioner


def train_variant(base, recipe: dict, train: list[Item], heldout: list[Item], out: Path, *, base_source: str,
                  base_revision: str | None, seed: int, save_every: int, reload: Callable[[Path], object],
                  log=None, say: Callable[[str], None] = lambda line: None) -> dict:
    """Replace `base`'s connector by `recipe["kind"]` (sizes: recipe hidden, layers, heads), train it on the
    `train` images and captions (recipe steps, batch_size, lr, augment; the state in <out>/train_state.safetensors
    every `save_every` steps, so an interrupted run resumes), save it in `out` and check `reload(out)` (the
    variant loaded as the study loads it) and the base on the `heldout` images; its report."""
    images, captions = [load_image(it.path) for it in train], [it.caption for it in train]
    test_images, test_captions = [load_image(it.path) for it in heldout], [it.caption for it in heldout]
    base_accuracy, _ = caption_accuracy(base, test_images, test_captions)
    size = {k: recipe[k] for k in ("hidden", "layers", "heads") if k in recipe}
    adapter = ConnectorVariant.from_base(base, recipe["kind"], base_source=base_source, base_revision=base_revision,
                                         seed=seed, **size)
    n_params = sum(p.numel() for p in adapter.connector().parameters())
    say(f"{recipe['kind']} connector ({n_params / 1e6:.3f}M parameters, {adapter.image_tokens} image tokens) on "
        f"{base_source}, {len(train)} training images, {len(heldout)} held out")
    out.mkdir(parents=True, exist_ok=True)
    losses = train_captioner(adapter, images, captions, steps=recipe["steps"], batch_size=recipe["batch_size"],
                             lr=recipe["lr"], seed=seed, augment=recipe["augment"], log=log,
                             state=out / "train_state.safetensors", save_every=save_every)
    adapter.save(out)
    accuracy, generated = caption_accuracy(reload(out), test_images, test_captions)
    tail = losses[-50:]
    return {"kind": recipe["kind"], "size": adapter.config["size"], "connector_parameters": n_params,
            "image_tokens": adapter.image_tokens, "native_image_tokens": adapter.config["native_image_tokens"],
            "steps": recipe["steps"], "batch_size": recipe["batch_size"], "lr": recipe["lr"],
            "augment": recipe["augment"], "train_images": len(train), "heldout_images": len(heldout),
            "final_loss": sum(tail) / max(len(tail), 1), "accuracy": accuracy, "base_accuracy": base_accuracy,
            "examples": [{"reference": r, "generated": g} for r, g in zip(test_captions[:5], generated)]}
