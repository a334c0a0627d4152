"""What a reconstructor trains on: images read a window at a time, a split by stem, z-score statistics.

Every image of one model has the same token matrix shape (pre [n_pre, d_pre], post [n_post, d_post]):
the study brings every image to one size, and the transformer reconstructor's learned position
queries need it.

Sources: the training code reads images through one interface, `read(side, indices)` ->
[B, tokens, width] float32 with `stems`, `tokens(side)`, `width[side]` and `image_bytes()`:
conngeo.data.vectors.VectorReader reads them from the memory-mapped vector shards, `Pairs` holds small
data in memory (tests, toy runs). Nothing here needs every image at once.

Split: by a hash of the stem, fraction(stem) = the first 8 bytes of sha256(stem) read as an integer /
2^64: test iff fraction < test_fraction, val iff test_fraction <= fraction < test_fraction +
val_fraction, else train. Training fits the weights and the normalisation; validation decides early
stopping and which checkpoint is kept; test is what every reported number is measured on. The split
depends on the stem alone, so the same image is in the same split whatever the order, the shards or
the other images, and adding images never moves an old one. It does not depend on the training seed
on purpose: varying the seed varies the training, not what it is judged on.

Normalisation: per feature, z = (x - mean) / std with mean and (population) std over every token of
every *training* image, separately for E_pre (the targets) and E_post (the inputs), in one streaming
pass (count, mean and sum of squared deviations of each window, combined by Chan et al.'s pairwise
update, in float64). A feature whose std is below `eps` (constant on the training split) gets std 1,
so it maps to 0 and back.

Order (conngeo.recon.train.epoch_windows): an epoch visits the training images in windows of
consecutive images (storage order), the windows in a shuffled order and the images shuffled inside
each window: reads stay sequential and memory stays within one window, while a window that holds every
image gives a plain permutation of all of them.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from conngeo.data.vectors import VectorReader, atomic_save, windows

TRAIN, VAL, TEST = "train", "val", "test"
SPLITS = (TRAIN, VAL, TEST)


@dataclass
class Pairs:
    """E_pre and E_post of N images held in memory: pre [N, n_pre, d_pre], post [N, n_post, d_post].
    Reads like a VectorReader (`read`, `stems`, `tokens`, `width`), for small data and tests."""

    stems: list[str]
    pre: torch.Tensor
    post: torch.Tensor

    def __len__(self) -> int:
        return len(self.stems)

    def read(self, side: str, indices) -> torch.Tensor:
        return getattr(self, side)[torch.as_tensor(list(indices), dtype=torch.long)].float()

    def tokens(self, side: str) -> int:
        return getattr(self, side).shape[1]

    @property
    def width(self) -> dict[str, int]:
        return {"pre": self.pre.shape[2], "post": self.post.shape[2]}

    def image_bytes(self) -> int:
        return 4 * (self.pre[0].numel() + self.post[0].numel())

    def select(self, mask: torch.Tensor) -> "Pairs":
        idx = mask.nonzero().flatten()
        return Pairs([self.stems[i] for i in idx.tolist()], self.pre[idx], self.post[idx])


def stack_tokens(mats: list[torch.Tensor], stems: list[str], name: str) -> torch.Tensor:
    """[N, tokens, dim] from per-image matrices of one shape, checked for shape and NaN/inf.

    `name` (e.g. the file the matrices came from) is named in every error.
    """
    if not mats:
        raise ValueError(f"{name}: no images")
    shapes = [tuple(m.shape) for m in mats]
    if any(len(s) != 2 for s in shapes):
        raise ValueError(f"{name}: expected one [tokens, dim] matrix per image, got shapes {sorted(set(shapes))[:5]}")
    if len(set(shapes)) > 1:
        odd = [f"{stems[i]} {shapes[i]}" for i in range(len(shapes)) if shapes[i] != shapes[0]][:3]
        raise ValueError(
            f"{name}: images have different token matrix shapes ({shapes[0]} for {stems[0]}, but {', '.join(odd)}); "
            "a reconstructor needs one shape for every image of a model: give all images one size and re-extract"
        )
    stacked = torch.stack(mats)
    finite = torch.isfinite(stacked).flatten(1).all(dim=1)
    if not finite.all():
        bad = [stems[i] for i in (~finite).nonzero().flatten().tolist()]
        raise ValueError(
            f"{name}: {len(bad)} of {len(mats)} images contain NaN or inf (e.g. {bad[:3]}); delete the shard folder "
            "and rerun the stage that wrote it (data/vectors: `dvc repro extract`), or drop those images from the study"
        )
    return stacked


def load_pairs(folders: list[Path]) -> Pairs:
    """Every image of vector shards (conngeo.data.vectors) in memory, stacked: small data only."""
    reader = VectorReader(folders)
    dupes = sorted({s for s in reader.stems if reader.stems.count(s) > 1}) if len(set(reader.stems)) < len(reader) else []
    if dupes:
        raise ValueError(f"stems repeat across shards (e.g. {dupes[:3]}): the split is by stem, so stems must be unique")
    everything = range(len(reader))
    return Pairs(reader.stems, reader.read("pre", everything), reader.read("post", everything))


def stem_fraction(stem: str) -> float:
    """A number in [0, 1) fixed by the stem: sha256(stem)[:8] as a big-endian integer / 2^64."""
    return int.from_bytes(hashlib.sha256(stem.encode()).digest()[:8], "big") / 2**64


def split_by_stem(stems: list[str], val_fraction: float, test_fraction: float) -> list[str]:
    """"test", "val" or "train" per stem by stem_fraction (see the module docstring)."""
    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be > 0 and sum to < 1: "
                         "early stopping needs validation images and every reported number test images")
    split = []
    for s in stems:
        f = stem_fraction(s)
        split.append(TEST if f < test_fraction else VAL if f < test_fraction + val_fraction else TRAIN)
    for side in SPLITS:
        if side not in split:
            raise ValueError(f"the split by stem put none of {len(stems)} images in {side!r} at val_fraction "
                             f"{val_fraction}, test_fraction {test_fraction}; use more images or larger fractions")
    return split


def write_split(path: Path, stems: list[str], split: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:  # csv quoting: a stem may hold a comma or a quote
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["stem", "split"])
        writer.writerows(zip(stems, split))


def read_split(path: Path) -> dict[str, str]:
    """stem -> split, as write_split wrote them (saved beside the reconstructor by the recon stage)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no split file; (re)run `dvc repro recon` first")
    with open(path, newline="", encoding="utf-8") as f:
        return {row["stem"]: row["split"] for row in csv.DictReader(f)}


class _Moments:
    """Count, mean and sum of squared deviations per feature, updated a chunk at a time (Chan et al.)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        n, mean = x.shape[0], x.mean(dim=0)
        m2 = ((x - mean) ** 2).sum(dim=0)
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.n * n / total)
        self.n = total

    def mean_std(self, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        std = (self.m2 / self.n).sqrt()
        return self.mean.float(), torch.where(std < eps, torch.ones_like(std), std).float()


@dataclass
class Normalizer:
    """Per-feature z-scores of E_pre and E_post (module docstring); float32 [d] each."""

    pre_mean: torch.Tensor
    pre_std: torch.Tensor
    post_mean: torch.Tensor
    post_std: torch.Tensor

    @classmethod
    def fit(cls, source, indices: list[int] | None = None, window: int = 256, eps: float = 1e-6) -> "Normalizer":
        """Statistics of images `indices` of `source` (all of them by default: pass the training images),
        in one streaming pass of `window` images at a time."""
        moments = {"pre": _Moments(), "post": _Moments()}
        for part in windows(list(range(len(source))) if indices is None else list(indices), window):
            for side, m in moments.items():
                m.add(source.read(side, part))
        (pre_mean, pre_std), (post_mean, post_std) = (moments[s].mean_std(eps) for s in ("pre", "post"))
        return cls(pre_mean, pre_std, post_mean, post_std)

    def pre_to_z(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.pre_mean.to(x.device)) / self.pre_std.to(x.device)

    def pre_from_z(self, z: torch.Tensor) -> torch.Tensor:
        return z.float() * self.pre_std.to(z.device) + self.pre_mean.to(z.device)

    def post_to_z(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.post_mean.to(x.device)) / self.post_std.to(x.device)

    def save(self, path: Path, metadata: dict | None = None) -> None:
        """safetensors with pre_mean, pre_std, post_mean, post_std (+ JSON metadata, e.g. the split)."""
        atomic_save({k: getattr(self, k) for k in ("pre_mean", "pre_std", "post_mean", "post_std")}, Path(path),
                    metadata={"info": json.dumps(metadata or {})})

    @classmethod
    def load(cls, path: Path) -> "Normalizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no normalisation statistics; train the reconstructor first "
                                    "(`python stages/recon.py --model NAME` or `dvc repro recon`)")
        with safe_open(str(path), framework="pt") as f:
            return cls(*(f.get_tensor(k) for k in ("pre_mean", "pre_std", "post_mean", "post_std")))
