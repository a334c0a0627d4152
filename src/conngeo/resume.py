"""What names a checkpoint that has no hub revision: a digest of its files.

A hub checkpoint is named by its pinned revision. A folder of one's own (the tiny zoo, a lab's
fine-tune) has none, and the same folder retrained in place must not pass for the old one: the
fingerprints that let a stage reuse finished work (extraction shards and parts, caption, perturbation
and score parts, a connector variant's base) carry this digest, not the folder's name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def folder_digest(folder) -> str:
    """sha256 over the relative path and the sha256 of the bytes of every file under `folder`, in sorted
    order (first 16 hex digits). Names and contents count; file times and the folder's own path do not."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    whole = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            content = hashlib.file_digest(f, "sha256").hexdigest()
        whole.update(f"{path.relative_to(folder).as_posix()}\0{content}\n".encode())
    return whole.hexdigest()[:16]
