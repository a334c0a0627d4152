"""Small shared helpers for the model-adapter tests: toy images and the word-level tokenizer."""

from __future__ import annotations

from conngeo.data.toyworld import caption, make_image, vocabulary
from conngeo.zoo.tokenizer import build_tokenizer

IMAGE_SIZE = 48


def toy_images(n: int = 3, size: int = IMAGE_SIZE, seed: int = 0) -> tuple[list, list[str]]:
    """`n` toy-food images of the study split (shard 0) and their reference captions."""
    scenes, images = zip(*(make_image(seed, "study", 0, i, size) for i in range(n)))
    return list(images), [caption(s) for s in scenes]


def toy_tokenizer(special_tokens=()):
    """The toy world's word-level tokenizer with a family's image placeholder tokens."""
    return build_tokenizer(vocabulary(), list(special_tokens))


class Interrupted(Exception):
    pass


class DiesAfter:
    """The adapter, but the process 'dies' at the n-th batch."""

    def __init__(self, adapter, n):
        self.adapter, self.n = adapter, n

    def __getattr__(self, name):
        return getattr(self.adapter, name)

    def encode(self, images):
        self.n -= 1
        if self.n < 0:
            raise Interrupted
        return self.adapter.encode(images)
