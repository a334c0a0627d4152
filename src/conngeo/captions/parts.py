"""Caption generation in resumable units, split over N processes without overlap, and the join.

The unit of work is a run of consecutive images of a vector shard, the runs of each shard starting at
its first image: for the captions stage one generate batch (`batch_size` images, exactly as a single
process batches them), for the perturbation sweep (conngeo.captions.sweep) a window of images with
every caption set of them. Units of all shards, in order, are dealt round-robin to the workers
(`my_units`). Every finished unit is written at once to its own file `parts/<shard>-<start>.csv`
(through a temporary name), so no file is written by two processes and an interrupted run loses at
most the unit in progress. A plain run reuses every unit whose rows lie in parts with its
fingerprint, computes the rest, writes the tables and removes the parts: the same bytes as an
uninterrupted single-process run, since every caption came from the same batch.

A part's fingerprint (conngeo.resume.fingerprint) covers what its captions depend on: the model spec,
the generation settings, and the size and modification time of every vector file read.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .table import read_table, write_table

PARTS = "parts"


def units(shard_sizes: list[int], size: int) -> list[tuple[int, int, int]]:
    """(shard number, start, stop) of every run of `size` images (e.g. a generate batch), shard by shard."""
    if size < 1:
        raise ValueError(f"a unit must hold >= 1 image, not {size}")
    return [(s, a, min(a + size, n)) for s, n in enumerate(shard_sizes) for a in range(0, n, size)]


def my_units(all_units: list, worker: int, workers: int) -> list:
    """Worker `worker`'s share of `all_units` (round-robin): disjoint across workers, covering all."""
    if not 0 <= worker < workers:
        raise ValueError(f"worker must be in 0..{workers - 1}, not {worker}")
    return all_units[worker::workers]


def part_path(out: Path, unit: tuple[int, int, int]) -> Path:
    return Path(out) / PARTS / f"{unit[0]:03d}-{unit[1]:07d}.csv"


def write_part(out: Path, unit: tuple[int, int, int], fp: str, columns: dict[str, list]) -> Path:
    """The rows of one finished unit (`columns` as for write_table), stamped with `fp` on every row."""
    n = len(next(iter(columns.values()), []))
    path = part_path(out, unit)
    write_table(path, {**columns, "fingerprint": [fp] * n})
    return path


def read_part(out: Path, unit: tuple[int, int, int], fp: str) -> dict[str, list[str]] | None:
    """The columns of one unit's part if it is there and stamped `fp` on every row, else None."""
    path = part_path(out, unit)
    if not path.is_file():
        return None
    table = read_table(path, required=("fingerprint",))
    if set(table.pop("fingerprint")) != {fp}:
        return None
    return table


def read_parts(out: Path, fp: str) -> tuple[dict[str, dict[str, str]], list[Path]]:
    """Rows of every part under `out/parts` stamped `fp`, by stem, and the parts that were ignored
    (another fingerprint: made from other inputs or settings)."""
    rows, ignored = {}, []
    folder = Path(out) / PARTS
    for path in sorted(folder.glob("*.csv")) if folder.is_dir() else []:
        table = read_table(path, required=("stem", "fingerprint"))
        if set(table["fingerprint"]) - {fp}:
            ignored.append(path)
            continue
        for i, stem in enumerate(table["stem"]):
            rows[stem] = {name: values[i] for name, values in table.items() if name != "fingerprint"}
    return rows, ignored


def verify_table(path: Path, stems: list[str]) -> list[str]:
    """Problems with a finished caption table at `path` that should hold `stems` in this order
    (empty: complete): every stem exactly once, in order, and no part or temporary file left."""
    path, problems = Path(path), []
    if not path.is_file():
        return [f"{path}: not found"]
    got = read_table(path, required=("stem",))["stem"]
    dupes = sorted(s for s, n in Counter(got).items() if n > 1)
    if dupes:
        problems.append(f"{path}: stems listed more than once, e.g. {dupes[:3]}")
    if got != stems:
        missing, extra = sorted(set(stems) - set(got)), sorted(set(got) - set(stems))
        problems.append(f"{path}: {len(got)} rows for {len(stems)} images (missing {missing[:3]}, "
                        f"unexpected {extra[:3]}, or out of order)")
    leftovers = [p for p in path.parent.rglob("*") if p.name == PARTS or p.name.endswith(".tmp")]
    problems += [f"{p}: partial file left behind (an unfinished run; rerun the plain stage to join parts)"
                 for p in sorted(leftovers)]
    return problems
