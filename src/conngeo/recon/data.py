"""What a reconstructor trains on: stacked token matrices, a split by stem, z-score statistics.

Every image of one model must have the same token matrix shape (pre [n_pre, d_pre], post
[n_post, d_post]); the study's images all have one size, so this holds. The learned position
queries of the transformer reconstructor need it.

Split: an image is in validation iff fraction(stem) < val_fraction, where fraction(stem) is the
first 8 bytes of sha256(stem) read as an integer / 2^64. It depends on the stem alone, so the same
image is in the same split whatever the order, the shards or the other images, and adding images
never moves an old one. It does not depend on the training seed on purpose: varying the seed
varies the training, not what it is validated on.

Normalisation: per feature, z = (x - mean) / std with mean and (population) std over every token of
every *training* image, separately for E_pre (the targets) and E_post (the inputs). A feature whose
std is below `eps` (constant on the training split) gets std 1, so it maps to 0 and back.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from conngeo.data.vectors import atomic_save, read_shard

TRAIN, VAL = "train", "val"


@dataclass
class Pairs:
    """E_pre and E_post of N images, stacked: pre [N, n_pre, d_pre], post [N, n_post, d_post]."""

    stems: list[str]
    pre: torch.Tensor
    post: torch.Tensor

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
    """Read vector shards (conngeo.data.vectors) in order and stack them; errors name the file."""
    stems, pre, post = [], [], []
    for folder in map(Path, folders):
        shard = read_shard(folder)
        stems += shard.stems
        pre.append(stack_tokens(shard.pre, shard.stems, str(folder / "pre.safetensors")))
        post.append(stack_tokens(shard.post, shard.stems, str(folder / "post.safetensors")))
    for name, parts in (("pre", pre), ("post", post)):
        if len({tuple(p.shape[1:]) for p in parts}) > 1:
            shapes = {str(f): tuple(p.shape[1:]) for f, p in zip(folders, parts)}
            raise ValueError(f"{name}.safetensors: token matrix shape differs between shards {shapes}; "
                             "every shard must come from the same model and image size: re-extract")
    dupes = sorted({s for s in stems if stems.count(s) > 1}) if len(set(stems)) != len(stems) else []
    if dupes:
        raise ValueError(f"stems repeat across shards (e.g. {dupes[:3]}): the split is by stem, so stems must be unique")
    return Pairs(stems, torch.cat(pre), torch.cat(post))


def stem_fraction(stem: str) -> float:
    """A number in [0, 1) fixed by the stem: sha256(stem)[:8] as a big-endian integer / 2^64."""
    return int.from_bytes(hashlib.sha256(stem.encode()).digest()[:8], "big") / 2**64


def split_by_stem(stems: list[str], val_fraction: float) -> list[str]:
    """"val" for stems with stem_fraction < val_fraction, else "train" (see the module docstring)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}: early stopping needs validation images")
    split = [VAL if stem_fraction(s) < val_fraction else TRAIN for s in stems]
    for side in (TRAIN, VAL):
        if side not in split:
            raise ValueError(f"the split by stem put none of {len(stems)} images in {side!r} at val_fraction "
                             f"{val_fraction}; use more images or a val_fraction nearer 0.5")
    return split


def write_split(path: Path, stems: list[str], split: list[str]) -> None:
    path.write_text("stem,split\n" + "".join(f"{s},{p}\n" for s, p in zip(stems, split)))


def read_split(path: Path) -> dict[str, str]:
    rows = Path(path).read_text().splitlines()[1:]
    return dict(r.split(",") for r in rows)


def _mean_std(x: torch.Tensor, eps: float, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and population std over images and tokens of x [N, T, D], in float64,
    a chunk of images at a time (the stacked data may be large)."""
    n = x.shape[0] * x.shape[1]
    total = sum(x[i:i + chunk].double().sum(dim=(0, 1)) for i in range(0, x.shape[0], chunk))
    mean = total / n
    sq = sum(((x[i:i + chunk].double() - mean) ** 2).sum(dim=(0, 1)) for i in range(0, x.shape[0], chunk))
    std = (sq / n).sqrt()
    std = torch.where(std < eps, torch.ones_like(std), std)
    return mean.float(), std.float()


@dataclass
class Normalizer:
    """Per-feature z-scores of E_pre and E_post (module docstring); float32 [d] each."""

    pre_mean: torch.Tensor
    pre_std: torch.Tensor
    post_mean: torch.Tensor
    post_std: torch.Tensor

    @classmethod
    def fit(cls, train: Pairs, eps: float = 1e-6) -> "Normalizer":
        """Statistics of the given (training) images only."""
        pre_mean, pre_std = _mean_std(train.pre, eps)
        post_mean, post_std = _mean_std(train.post, eps)
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
