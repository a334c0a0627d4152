"""Reader for image folders in the layout real users already have:

    <root>/<shard>/<stem>.jpg|.jpeg|.png   and optionally   <root>/<shard>/<stem>.txt  (reference captions,
                                                                                      one per line)

Shards and stems come back sorted. Nothing is dropped silently: a missing caption is listed in
`missing_captions`, and an unreadable image either raises `BadImageError` (naming the file and the
fix) or, with on_bad_image="skip", is listed in `skipped` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


@dataclass
class ImageFolder:
    root: Path
    items: list[Item] = field(default_factory=list)
    missing_captions: list[Path] = field(default_factory=list)  # the .txt files that were expected
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (image, reason)

    def __len__(self) -> int:
        return len(self.items)

    def shard(self, name: str) -> list[Item]:
        return [it for it in self.items if it.shard == name]

    @property
    def shards(self) -> list[str]:
        return sorted({it.shard for it in self.items})


def load_image(path: Path) -> Image.Image:
    """Open an image as RGB, or raise BadImageError naming the file and what to do."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except Exception as err:  # PIL raises several types for broken files
        raise BadImageError(
            f"{path}: cannot read image ({type(err).__name__}: {err}). Replace or delete the file, "
            "or set on_bad_image: skip to list it and go on"
        ) from err


def scan(root: Path, shards: list[str] | None = None, on_bad_image: str = "error") -> ImageFolder:
    """List every image under `root` (all shard folders, or only `shards`), checking each opens.

    on_bad_image: "error" raises BadImageError at the first unreadable image; "skip" lists it.
    """
    root = Path(root)
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', not {on_bad_image!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image root not found; expected <root>/<shard>/<stem>.png|.jpg")
    present = sorted(p.name for p in root.iterdir() if p.is_dir())
    if shards is None:
        shards = present
    missing = [s for s in shards if s not in present]
    if missing:
        raise FileNotFoundError(f"{root}: shard folder(s) {missing} not found; present: {present}")

    folder = ImageFolder(root)
    for shard in shards:
        paths = sorted(p for p in (root / shard).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        stems = [p.stem for p in paths]
        dupes = sorted({s for s in stems if stems.count(s) > 1})
        if dupes:
            raise ValueError(f"{root / shard}: stems with several image files {dupes}; keep one file per stem")
        for path in paths:
            try:
                load_image(path)
            except BadImageError as err:
                if on_bad_image == "error":
                    raise
                folder.skipped.append((path, str(err.__cause__)))
                continue
            text = path.with_suffix(".txt")
            if text.is_file():
                references = read_references(text)
            else:
                references = []
                folder.missing_captions.append(text)
            folder.items.append(Item(shard, path.stem, path, references))
    if not folder.items:
        raise FileNotFoundError(f"{root}: no readable images in shards {shards}")
    return folder
