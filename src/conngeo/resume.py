"""Reusing finished work: the fingerprints that say whether it still holds, and the writes that never leave
half a file looking finished.

Every piece of finished work (a part, a shard, a checkpoint, a training state) carries a fingerprint of what
it was made from, and work of another fingerprint is never used. Each stage resumes at its own grain (the
extraction: part files per chunk of a shard, conngeo.extraction; the captions and the perturbation sweep:
part tables per unit of images, conngeo.captions.parts; the scores: chunk folders, conngeo.scoring.sets; the
reconstructor export: whole shards; a training: one state file), with these pieces:

    digest(value)                 the fingerprint of settings: sha256 of their canonical JSON, 16 hex digits
    fingerprint(settings, files)  ... together with the size and modification time of input files
    files_digest(files)           ... of files' bytes (what a small input, e.g. a reconstructor, holds)
    folder_digest(folder)         ... of a folder's files, names and bytes (a checkpoint without a revision)
    write_json(path, value)       a file written through a temporary name
    stamp(folder, fp, ...)        a finished folder's fingerprint.json; stamped(folder, fp): is it there
    save_state / load_state       a training loop's weights, optimizer and record, stamped with its fingerprint

A hub checkpoint is named by its pinned revision. A folder of one's own (the tiny zoo, a lab's fine-tune) has
none, and the same folder retrained in place must not pass for the old one: the fingerprints that reuse
finished work (extraction shards and parts, caption, perturbation and score parts, a connector variant's
base) carry its folder_digest, not the folder's name.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

STAMP = "fingerprint.json"  # in a finished folder: the fingerprint it was made with, and what the maker records


def digest(value) -> str:
    """sha256 of `value` as JSON (keys sorted; what JSON cannot hold as its str), first 16 hex digits."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(settings: dict, files: list[Path]) -> str:
    """The digest of `settings` (JSON-able) and of the size and mtime of each of `files`. Comparing times is
    conservative: a rewritten or re-checked-out input invalidates the work even when its bytes did not change."""
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in map(Path, files)]
    return digest({"settings": settings, "files": stats})


def files_digest(files: list[Path]) -> str:
    """sha256 of the bytes of `files`, one after the other (first 16 hex digits)."""
    return hashlib.sha256(b"".join(Path(f).read_bytes() for f in files)).hexdigest()[:16]


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


def write_text(path: Path, text: str) -> None:
    """`text` at `path` through a temporary name in the same folder (a half-written file never looks done)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, value) -> None:
    """`value` as indented JSON at `path`, through a temporary name."""
    write_text(path, json.dumps(value, indent=2) + "\n")


def stamp(folder: Path, fp: str, **record) -> None:
    """Mark `folder` finished with fingerprint `fp` (written last, after everything it vouches for), with
    whatever else its maker records (folder/fingerprint.json: {"fingerprint": fp, **record})."""
    write_text(Path(folder) / STAMP, json.dumps({"fingerprint": fp, **record}) + "\n")


def stamped(folder: Path, fp: str | None = None) -> dict | None:
    """The record of `folder`'s stamp if it has one (of fingerprint `fp`, where given), else None."""
    path = Path(folder) / STAMP
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if fp is None or record.get("fingerprint") == fp else None


# -- a training loop's state ------------------------------------------------------------------------------
# The trained weights, the optimizer's moments and counters, and a JSON record (step or epoch, history, the
# random states) stamped with a fingerprint of what is being trained; a state with another fingerprint is
# never used. Safetensors through a temporary name, never a pickle. (torch is imported where it is used: the
# stages that only fingerprint never need it.)

def save_state(path: Path, weights: dict[str, torch.Tensor], opt: torch.optim.Optimizer, meta: dict) -> None:
    """`weights` (name -> tensor), the optimizer's state and `meta` (JSON; it must hold "fingerprint")."""
    import torch

    from .data.vectors import atomic_save

    tensors = {f"model.{k}": v.detach().cpu() for k, v in weights.items()}
    opt_state = opt.state_dict()
    for idx, state in opt_state["state"].items():
        for name, value in state.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(value).cpu()
    atomic_save(tensors, path, metadata={"state": json.dumps({**meta, "param_groups": opt_state["param_groups"]})})


def load_state(path: Path, fp: str, opt: torch.optim.Optimizer, device) -> tuple[dict, dict] | None:
    """(weights, meta) of the state at `path` if its fingerprint is `fp`, the optimizer loaded from it;
    None where there is no such state."""
    from safetensors import safe_open

    if not Path(path).is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
        if meta["fingerprint"] != fp:
            return None
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value if name == "step" else value.to(device)
    opt.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, meta
