"""Model adapters, one file per VLM family, and the registry that names them (conngeo.families.registry).

    adapter_class(family)        the family's Adapter subclass (its file imported on first use)
    load_adapter(family, ...)    adapter_class(family).load(...)
    families()                   every known family -> its class (every family file imported)
    register                     a class decorator for a family file outside this package

A family inside this package is one file here plus its line in registry.FAMILIES (docs/development.md).
"""

from __future__ import annotations

import importlib

from .base import Adapter, MissingCheckpointError
from .registry import FAMILIES

_REGISTERED: dict[str, type[Adapter]] = {}  # families registered from outside this package


def register(cls: type[Adapter]) -> type[Adapter]:
    """Make `cls` known under its `family`, as a file of registry.FAMILIES would be: for a family file of your
    own outside this package (import the file and the family is known)."""
    if not (isinstance(cls, type) and issubclass(cls, Adapter)) or not getattr(cls, "family", None):
        raise TypeError(f"{cls!r}: register an Adapter subclass that sets `family`")
    if cls.family in FAMILIES:
        raise ValueError(f"family {cls.family!r} is already in conngeo.families.registry; give yours another name")
    _REGISTERED[cls.family] = cls
    return cls


def adapter_class(family: str) -> type[Adapter]:
    """The Adapter subclass of `family`. Only that family's file is imported (with its transformers classes)."""
    if family in _REGISTERED:
        return _REGISTERED[family]
    if family not in FAMILIES:
        raise KeyError(f"unknown model family {family!r}; known families: {sorted([*FAMILIES, *_REGISTERED])} "
                       "(a new one: docs/development.md)")
    module, name = FAMILIES[family][0].split(":")
    return getattr(importlib.import_module(module), name)


def families() -> dict[str, type[Adapter]]:
    """family name -> Adapter subclass, for every family of the registry (all imported) and every registered one."""
    return {name: adapter_class(name) for name in [*FAMILIES, *_REGISTERED]}


def load_adapter(family: str, source, revision: str | None = None, device: str = "cpu", dtype: str = "float32",
                 prompt: str = "", image_size: int | None = None, hub: str | None = None) -> Adapter:
    """`adapter_class(family).load(...)`: see Adapter.load."""
    return adapter_class(family).load(source, revision=revision, device=device, dtype=dtype, prompt=prompt,
                                      image_size=image_size, hub=hub)


__all__ = ["Adapter", "FAMILIES", "MissingCheckpointError", "adapter_class", "families", "load_adapter", "register"]
