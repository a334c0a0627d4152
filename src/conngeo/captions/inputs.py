"""Pairing vector shards with the images they came from, for the caption stages."""

from __future__ import annotations

from pathlib import Path

from ..data.images import ImageFolder, Item
from ..data.vectors import is_complete


def shard_folders(root: Path, produced_by: str) -> list[Path]:
    """The complete vector shard folders under `root`, sorted; a clear error naming the stage to run
    when there are none or one is incomplete."""
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not folders:
        raise FileNotFoundError(f"{root}: no vector shards; run `{produced_by}` first")
    incomplete = [str(f) for f in folders if not is_complete(f)]
    if incomplete:
        raise FileNotFoundError(f"incomplete vector shard(s) {incomplete}; rerun `{produced_by}`")
    return folders


def match_images(folder: ImageFolder, stems: list[str], where: str) -> list[Item]:
    """The image of each stem (in `stems` order); an error naming `where` if any is missing."""
    by_stem = {it.stem: it for it in folder.items}
    missing = [s for s in stems if s not in by_stem]
    if missing:
        raise FileNotFoundError(f"{where}: {len(missing)} stem(s) have no image under {folder.root}, e.g. "
                                f"{missing[:3]}; the vectors come from other images: rerun extraction on this root")
    return [by_stem[s] for s in stems]
