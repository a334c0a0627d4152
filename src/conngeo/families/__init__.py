"""Model adapters, one file per family, registered by importing every module in this package."""

from __future__ import annotations

import importlib
import pkgutil

from .base import Adapter, MissingCheckpointError

_NOT_FAMILIES = {"base", "tokenizer", "zoo", "references", "pretrain", "pretrain_siglip", "rehearsal"}


def families() -> dict[str, type[Adapter]]:
    """family name -> Adapter subclass, for every family file in this package (all imported) and every
    Adapter subclass imported from elsewhere (a family file of your own: import it, and it is known)."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_FAMILIES:
            importlib.import_module(f"{__name__}.{info.name}")
    return _registered()


def _registered() -> dict[str, type[Adapter]]:
    return {cls.family: cls for cls in _subclasses(Adapter) if getattr(cls, "family", None)}


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _plain(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def adapter_class(family: str) -> type[Adapter]:
    """The Adapter subclass of `family`. Only that family's file is imported (with its transformers
    classes), found by name: the file's name and the family's agree in their letters and digits
    (qwen2_5_vl.py holds "qwen2.5vl"); anything else falls back to importing every family file."""
    known = _registered()
    if family not in known:
        for info in pkgutil.iter_modules(__path__):
            if info.name not in _NOT_FAMILIES and _plain(info.name) == _plain(family):
                importlib.import_module(f"{__name__}.{info.name}")
        known = _registered()
    if family not in known:
        known = families()
    if family not in known:
        raise KeyError(f"unknown model family {family!r}; known families: {sorted(known)}")
    return known[family]


def load_adapter(family: str, source, revision: str | None = None, device: str = "cpu", dtype: str = "float32",
                 prompt: str = "", image_size: int | None = None, hub: str | None = None) -> Adapter:
    """`adapter_class(family).load(...)`: see Adapter.load."""
    return adapter_class(family).load(source, revision=revision, device=device, dtype=dtype, prompt=prompt,
                                      image_size=image_size, hub=hub)


__all__ = ["Adapter", "MissingCheckpointError", "families", "adapter_class", "load_adapter"]
