"""Caption tables: plain CSV with a header, every value a string, written through a temporary name.

Read with `read_table`, not pandas' defaults: an empty caption must stay "" (pandas reads it as NaN),
since empty captions are a result the study counts.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path


def write_table(path: Path, columns: dict[str, list]) -> None:
    """Write `columns` (name -> values, all the same length) to `path` atomically."""
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{path}: columns of different lengths {lengths}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(list(columns))
        writer.writerows(zip(*columns.values()))
    os.replace(tmp, path)


def read_table(path: Path, required: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Columns of a CSV written by `write_table` (name -> list of strings); `required` columns must exist."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: caption table not found; run the stage that writes it (`dvc repro`)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file; delete it and rerun the stage that writes it")
        rows = list(reader)
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; has {header}. Rerun the stage that writes it")
    return {name: [row[i] for row in rows] for i, name in enumerate(header)}
