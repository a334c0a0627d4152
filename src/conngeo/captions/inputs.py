"""Pairing vector shards with the images they came from, for the caption stages."""

from __future__ import annotations


from ..data.images import ImageFolder, Item
from ..data.vectors import shard_folders  # noqa: F401 (the caption stages' import of it)


def match_images(folder: ImageFolder, stems: list[str], where: str) -> list[Item]:
    """The image of each stem (in `stems` order); an error naming `where` if any is missing."""
    by_stem = {it.stem: it for it in folder.items}
    missing = [s for s in stems if s not in by_stem]
    if missing:
        raise FileNotFoundError(f"{where}: {len(missing)} stem(s) have no image under {folder.root}, e.g. "
                                f"{missing[:3]}; the vectors come from other images: rerun extraction on this root")
    return [by_stem[s] for s in stems]
