"""Batched greedy captions from a supplied E_post: the original one, connector(reconstructed E_pre),
or a perturbed one. Everything goes through `Adapter.generate(images, post=...)`, which replays
native generation token for token when E_post is unmodified.

Images may be PIL images or paths (read one batch at a time, so a large study never holds all its
pixels); E_post and E_pre are per-image [tokens, d] matrices in the model's order, as the vector
shards store them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from ..data.images import load_image

ImageLike = Image.Image | str | Path


def _load(batch: Sequence[ImageLike]) -> list[Image.Image]:
    return [load_image(Path(x)) if isinstance(x, (str, Path)) else x for x in batch]


def _check_lengths(images, mats, what: str) -> None:
    if mats is not None and len(mats) != len(images):
        raise ValueError(f"{len(images)} images but {len(mats)} {what} matrices; they must pair up one to one")


@torch.no_grad()
def generate_captions(adapter, images: Sequence[ImageLike], post: Sequence[torch.Tensor] | None = None,
                      batch_size: int = 32, max_new_tokens: int = 24,
                      transform: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
                      desc: str | None = None) -> list[str]:
    """One greedy caption per image, `batch_size` images per `adapter.generate` call.

    post: per-image E_post to generate from (None: the model's own, from the pixels).
    transform: applied to each batch of `post` before generation, e.g. `adapter.connect` when `post`
    holds (reconstructed) E_pre; see `captions_from_recon`.
    desc: show a progress bar with this label.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    _check_lengths(images, post, "E_post")
    captions: list[str] = []
    with tqdm(total=len(images), desc=desc, unit="img", disable=desc is None) as bar:
        for start in range(0, len(images), batch_size):
            batch = _load(images[start:start + batch_size])
            supplied = None
            if post is not None:
                supplied = list(post[start:start + batch_size])
                if transform is not None:
                    supplied = transform(supplied)
            captions += adapter.generate(batch, post=supplied, max_new_tokens=max_new_tokens)
            bar.update(len(batch))
    return captions


def captions_from_recon(adapter, images: Sequence[ImageLike], recon_pre: Sequence[torch.Tensor],
                        batch_size: int = 32, max_new_tokens: int = 24, desc: str | None = None) -> list[str]:
    """Greedy captions from connector(reconstructed E_pre): the model's real connector (`adapter.connect`)
    is applied to each batch of `recon_pre`, and the language model generates from its output."""
    _check_lengths(images, recon_pre, "reconstructed E_pre")
    return generate_captions(adapter, images, recon_pre, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             transform=adapter.connect, desc=desc)
