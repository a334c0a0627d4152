"""Reader for image folders in the layout real users already have:

    <root>/<shard>/<stem>.jpg|.jpeg|.png   and optionally   <root>/<shard>/<stem>.txt  (reference captions,
                                                                                      one per line)

Shards and stems come back sorted. Listing a folder opens no image. Nothing is dropped silently: a
missing caption is listed in `missing_captions`, a shard folder without any image in `empty_shards`;
an unreadable image, when it is decoded, either raises `BadImageError` (naming the file and the fix)
or, with on_bad_image="skip", is listed with the reason (`decode`). Every image is decoded to 8-bit
RGB whatever its mode (grey, palette, RGBA, CMYK, 16-bit grey).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class BadImageError(ValueError):
    pass


@dataclass
class Item:
    shard: str
    stem: str
    path: Path
    references: list[str]  # the lines of <stem>.txt (COCO has five); [] where it is missing or empty

    @property
    def caption(self) -> str | None:
        """The first reference (the toy world has one per image); None without any."""
        return self.references[0] if self.references else None


def read_references(path: Path) -> list[str]:
    """The non-empty lines of a reference file, stripped, in order."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class ImageFolder:
    root: Path
    items: list[Item] = field(default_factory=list)
    missing_captions: list[Path] = field(default_factory=list)  # the .txt files that were expected
    empty_shards: list[Path] = field(default_factory=list)  # shard folders holding no image (left out)

    def notes(self) -> list[str]:
        """What a stage says of the folder before it starts: the shards left out, the references missing."""
        lines = [f"{empty}: a shard folder without images (left out)" for empty in self.empty_shards]
        if self.missing_captions:
            lines.append(f"{len(self.missing_captions)} images without a reference file (kept; e.g. "
                         f"{self.missing_captions[0]})")
        return lines

    def __len__(self) -> int:
        return len(self.items)

    def shard(self, name: str) -> list[Item]:
        return [it for it in self.items if it.shard == name]

    @property
    def shards(self) -> list[str]:
        return sorted({it.shard for it in self.items})


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB. 16-bit grey (PNG "I;16", or "I") is scaled by 1/257 first: Pillow's own
    conversion clips it at 255, which turns nearly every pixel white."""
    if img.mode == "I" or img.mode.startswith("I;16"):
        grey = np.asarray(img).astype(np.float64) / 257
        img = Image.fromarray(grey.round().clip(0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def load_image(path: Path) -> Image.Image:
    """Open an image as RGB, or raise BadImageError naming the file and what to do."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except Exception as err:  # PIL raises several types for broken files
        raise BadImageError(
            f"{path}: cannot read image ({type(err).__name__}: {err}). Replace or delete the file, "
            "or set on_bad_image: skip to list it and go on"
        ) from err


def scan(root: Path, shards: list[str] | None = None) -> ImageFolder:
    """List every image under `root` (all shard folders, or only `shards`) without opening any: an
    unreadable image is found where it is first decoded (`load_image`, `decode`), and
    `check_images` reads a whole folder on demand (`python stages/verify.py images`)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image root not found; expected <root>/<shard>/<stem>.png|.jpg")
    present = sorted(p.name for p in root.iterdir() if p.is_dir())
    if shards is None:
        shards = present
    missing = [s for s in shards if s not in present]
    if missing:
        raise FileNotFoundError(f"{root}: shard folder(s) {missing} not found; present: {present}")

    folder, where = ImageFolder(root), {}
    for shard in shards:
        paths = sorted(p for p in (root / shard).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            folder.empty_shards.append(root / shard)
        for path in paths:
            if path.stem in where:  # a stem names one image: the split, the joins and every table key on it
                raise ValueError(f"{path} and {where[path.stem]}: two images with the stem {path.stem!r}; rename "
                                 "or remove one (a stem must be unique under the image root)")
            where[path.stem] = path
            text = path.with_suffix(".txt")
            if text.is_file():
                references = read_references(text)
            else:
                references = []
                folder.missing_captions.append(text)
            folder.items.append(Item(shard, path.stem, path, references))
    if not folder.items:
        raise FileNotFoundError(f"{root}: no images in shards {shards}")
    return folder


def decode(items: list[Item], on_bad_image: str = "error") -> tuple[list[Item], list, list[tuple[Path, str]]]:
    """(kept items, their RGB images, skipped (path, reason)) of `items`: an unreadable image raises
    BadImageError with on_bad_image="error", or is left out and listed with "skip"."""
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', not {on_bad_image!r}")
    kept, images, skipped = [], [], []
    for it in items:
        try:
            images.append(load_image(it.path))
            kept.append(it)
        except BadImageError as err:
            if on_bad_image == "error":
                raise
            skipped.append((it.path, str(err.__cause__)))
    return kept, images, skipped


def check_images(folder: ImageFolder) -> list[tuple[Path, str]]:
    """(path, reason) of every image of `folder` that cannot be read; empty when all decode."""
    return decode(folder.items, on_bad_image="skip")[2]
