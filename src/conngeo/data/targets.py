"""Ground-truth attributes of the study images, as targets for linear probes (conngeo.geometry.probes).

An image root may carry the truth about its images:

    <root>/attributes.csv   the toy world's factors (conngeo.data.toyworld.ATTRIBUTE_COLUMNS)
    <root>/objects.csv      stem + one column per object category: the number of its individually
                            annotated instances; then `crowd`: the categories the image has a crowd
                            region of, ";"-separated (scripts/import_coco.py writes it from COCO's
                            instance annotations; a file without the column has no crowd regions)

`probe_targets` turns either into targets: name -> (kind, values in the order of `stems`), kind "class"
(probe accuracy against the majority class) or "number" (held-out R^2):

    toy world   kind:<food>      is the food kind on the plate (one target per kind, 8)
                count            how many foods there are in all (1-6)
                colour           the colour of the first food of the caption
                plate            the plate's colour
    COCO        object:<name>    is there a <name>: an instance or a crowd region (the `top` most frequent)
                objects          how many individually annotated instances there are in all (a crowd
                                 region, whose instances nobody counted, adds none)

A root with neither file has no targets (the probes are skipped and the report says so).

`content_covariates` reads the same files for what each image shows, the covariates the report's
adjusted tests stratify by (what an image shows can drive both a geometry change and an instability):

    toy world   food_count       foods on the plate (1-6)
                kinds            food kinds (1-2)
                plate            the plate's colour
    COCO        objects          individually annotated instances in all (objects.csv)
                categories       categories present (an instance or a crowd region)
    any root    reference_words  mean words per reference caption (<stem>.txt; empty where it has none)
"""

from __future__ import annotations

import csv
from pathlib import Path

TOY, OBJECTS, CROWD = "attributes.csv", "objects.csv", "crowd"


def _rows(path: Path, stems: list[str]) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        by_stem = {row["stem"]: row for row in csv.DictReader(f)}
    missing = [s for s in stems if s not in by_stem]
    if missing:
        raise ValueError(f"{path}: {len(missing)} stems of the study have no row (e.g. {missing[:3]}); the file belongs "
                         "to other images: regenerate it for this image root")
    return [by_stem[s] for s in stems]


def probe_targets(root, stems: list[str], top: int = 10) -> dict[str, tuple[str, list]]:
    """The probe targets of `stems` from `root`'s attributes.csv or objects.csv (module docstring)."""
    root = Path(root)
    if (root / TOY).is_file():
        from conngeo.data.toyworld import FOODS

        rows = _rows(root / TOY, stems)
        targets = {f"kind:{kind}": ("class", [int(kind in (r["kind1"], r["kind2"])) for r in rows]) for kind in FOODS}
        targets["count"] = ("number", [int(r["count1"]) + int(r["count2"] or 0) for r in rows])
        targets["colour"] = ("class", [r["colour1"] for r in rows])
        targets["plate"] = ("class", [r["plate_colour"] for r in rows])
        return targets
    if (root / OBJECTS).is_file():
        rows = _rows(root / OBJECTS, stems)
        names, has = _objects(rows)
        present = {c: sum(has[c]) for c in names}
        common = [c for c in sorted(names, key=lambda c: -present[c]) if 0 < present[c] < len(rows)][:top]
        targets = {f"object:{c}": ("class", has[c]) for c in common}
        targets["objects"] = ("number", [sum(int(r[c]) for c in names) for r in rows])
        return targets
    return {}


def _objects(rows: list[dict]) -> tuple[list[str], dict[str, list[int]]]:
    """The category columns of objects.csv rows, and per category whether each image has it: an instance or
    a crowd region."""
    names = [c for c in rows[0] if c not in ("stem", CROWD)]
    crowds = [set((r.get(CROWD) or "").split(";")) for r in rows]
    return names, {c: [int(int(r[c]) > 0 or c in crowd) for r, crowd in zip(rows, crowds)] for c in names}


def content_covariates(root, items) -> dict[str, list]:
    """What each of `items` (conngeo.data.images.Item: stem and references) shows, in their order: column ->
    values, stem first (module docstring). Counts are ints, the plate a string, reference_words a float or
    None for an image without references."""
    root = Path(root)
    stems = [it.stem for it in items]
    out: dict[str, list] = {"stem": stems}
    if (root / TOY).is_file():
        rows = _rows(root / TOY, stems)
        out["food_count"] = [int(r["count1"]) + int(r["count2"] or 0) for r in rows]
        out["kinds"] = [1 + bool(r["kind2"]) for r in rows]
        out["plate"] = [r["plate_colour"] for r in rows]
    elif (root / OBJECTS).is_file():
        rows = _rows(root / OBJECTS, stems)
        names, has = _objects(rows)
        out["objects"] = [sum(int(r[c]) for c in names) for r in rows]
        out["categories"] = [sum(has[c][i] for c in names) for i in range(len(rows))]
    out["reference_words"] = [round(sum(len(t.split()) for t in it.references) / len(it.references), 4)
                              if it.references else None for it in items]
    return out
