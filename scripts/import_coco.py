"""Turn COCO / Flickr30k captions into the study's image layout, <out>/<shard>/<stem>.jpg + <stem>.txt.

    python scripts/import_coco.py --captions captions_val2014.json --images coco/val2014 --out data/images/coco
    python scripts/import_coco.py --karpathy dataset_coco.json --images coco --split test --out data/images/coco
    python scripts/import_coco.py --karpathy dataset_flickr30k.json --images flickr30k-images --split test --out f30k
    python scripts/import_coco.py ... --instances instances_val2014.json     # also write <out>/objects.csv

Each <stem>.txt holds the image's reference captions, one per line, in annotation order. Images are
sorted by stem and cut into shards of --shard-size (shard000, shard001, ...). The photos are linked,
not copied (absolute symlinks by default; --link hardlink or copy on request). With --instances,
<out>/objects.csv gets one row per image: the number of instances of each category (0 = absent).
"""

import csv
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import typer
from tqdm import tqdm

app = typer.Typer(add_completion=False)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what conngeo.data.images.scan reads
LINKS = ("symlink", "hardlink", "copy")


@dataclass
class Entry:
    stem: str
    path: Path  # the original image file
    refs: list[str]  # cleaned, non-empty captions in annotation order


def clean(caption: str) -> str:
    return " ".join(str(caption).splitlines()).strip()


def load_json(path: Path, expected: str) -> dict:
    if not path.is_file():
        raise SystemExit(f"{path}: file not found; pass {expected}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SystemExit(f"{path}: not valid JSON ({err}); expected {expected}")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SystemExit(f"{path}: no 'images' list; expected {expected}")
    return data


def read_coco(path: Path, images: Path) -> list[Entry]:
    """Entries from a COCO captions file: images[].file_name under `images`, captions from annotations."""
    expected = "a COCO captions file (captions_*.json)"
    data = load_json(path, expected)
    if data["images"] and "sentences" in data["images"][0]:
        raise SystemExit(f"{path}: this is a Karpathy split file; pass it with --karpathy, not --captions")
    if not isinstance(data.get("annotations"), list):
        raise SystemExit(f"{path}: no 'annotations' list; expected {expected}")
    try:
        by_id = {img["id"]: Entry(Path(img["file_name"]).stem, images / img["file_name"], [])
                 for img in data["images"]}
        for ann in data["annotations"]:
            if ann["image_id"] not in by_id:
                raise SystemExit(f"{path}: annotation for image_id {ann['image_id']} has no entry in 'images'; "
                                 "the file is damaged, download it again")
            if clean(ann["caption"]):
                by_id[ann["image_id"]].refs.append(clean(ann["caption"]))
    except (KeyError, TypeError) as err:
        raise SystemExit(f"{path}: an image or annotation lacks {err}; expected {expected}")
    return list(by_id.values())


def read_karpathy(path: Path, images: Path, splits: list[str] | None) -> list[Entry]:
    """Entries from a Karpathy split file (dataset_coco.json / dataset_flickr30k.json), only `splits`."""
    expected = "a Karpathy split file (dataset_coco.json or dataset_flickr30k.json)"
    data = load_json(path, expected)
    if "annotations" in data:
        raise SystemExit(f"{path}: this is a COCO captions file; pass it with --captions, not --karpathy")
    try:
        present = sorted({img["split"] for img in data["images"]})
        if splits:
            unknown = [s for s in splits if s not in present]
            if unknown:
                raise SystemExit(f"{path}: no images with split {unknown}; splits in the file: {present}")
        return [Entry(Path(img["filename"]).stem, images / img.get("filepath", "") / img["filename"],
                      [clean(s["raw"]) for s in img["sentences"] if clean(s["raw"])])
                for img in data["images"] if not splits or img["split"] in splits]
    except (KeyError, TypeError) as err:
        raise SystemExit(f"{path}: an image or sentence lacks {err}; expected {expected}")


def read_instances(path: Path, stems: list[str]) -> tuple[list[str], dict[str, list[int]]]:
    """Category names in id order, and per stem in `stems` the instance count of each category."""
    expected = "a COCO instances file (instances_*.json)"
    data = load_json(path, expected)
    if not isinstance(data.get("categories"), list) or not isinstance(data.get("annotations"), list):
        raise SystemExit(f"{path}: no 'categories' and 'annotations' lists; expected {expected}")
    try:
        categories = sorted(data["categories"], key=lambda c: c["id"])
        column = {c["id"]: i for i, c in enumerate(categories)}
        stem_of = {img["id"]: Path(img["file_name"]).stem for img in data["images"]}
        wanted = set(stems)
        counts = {}
        for ann in data["annotations"]:
            stem = stem_of.get(ann["image_id"])
            if stem in wanted:
                if ann["category_id"] not in column:
                    raise SystemExit(f"{path}: annotation with category_id {ann['category_id']} not in "
                                     "'categories'; the file is damaged, download it again")
                counts.setdefault(stem, [0] * len(categories))[column[ann["category_id"]]] += 1
        names = [str(c["name"]) for c in categories]
    except (KeyError, TypeError) as err:
        raise SystemExit(f"{path}: an image, annotation or category lacks {err}; expected {expected}")
    if stems and not wanted & set(stem_of.values()):
        raise SystemExit(f"{path}: none of the images are listed in it; pass the instances file of the same "
                         "split as the captions (e.g. instances_val2014.json for val2014)")
    return names, counts


def check(entries: list[Entry], skip_missing: bool) -> tuple[list[Entry], int]:
    """Stop on a stem used twice or an unsupported file type; stop on (or list and drop) missing images."""
    first, present, missing = {}, [], []
    for e in entries:
        if e.stem in first:
            raise SystemExit(f"stem {e.stem!r} appears twice: {first[e.stem].path} and {e.path}; each image "
                             "needs a unique file stem, import the two collections into separate --out folders")
        if e.path.suffix.lower() not in IMAGE_SUFFIXES:
            raise SystemExit(f"{e.path}: unsupported image type; the layout reads {', '.join(IMAGE_SUFFIXES)}")
        first[e.stem] = e
        (present if e.path.is_file() else missing).append(e)
    if missing and not skip_missing:
        shown = ", ".join(str(e.path) for e in missing[:3])
        raise SystemExit(f"{len(missing)} image file(s) listed in the JSON are missing under --images, e.g. {shown}; "
                         "check --images, or pass --skip-missing to leave them out")
    for e in missing:
        typer.echo(f"skipping missing image {e.path}", err=True)
    return present, len(missing)


def place(src: Path, dst: Path, link: str) -> None:
    if link == "symlink":
        os.symlink(os.path.abspath(src), dst)
    elif link == "hardlink":
        try:
            os.link(src, dst)
        except OSError as err:
            raise SystemExit(f"{dst}: cannot hardlink {src} ({err.strerror}); "
                             "put --out on the same file system as --images, or use --link symlink or copy")
    else:
        shutil.copy2(src, dst)


def write_layout(entries: list[Entry], out: Path, shard_size: int, link: str) -> list[str]:
    """Write <out>/shardNNN/<stem><suffix> (linked or copied) and <stem>.txt; return the shard names."""
    shards = []
    for i, e in enumerate(tqdm(entries, desc="import", unit="img")):
        folder = out / f"shard{i // shard_size:03d}"
        if folder.name not in shards:
            folder.mkdir(parents=True)
            shards.append(folder.name)
        place(e.path, folder / f"{e.stem}{e.path.suffix}", link)
        if e.refs:
            (folder / f"{e.stem}.txt").write_text("\n".join(e.refs) + "\n", encoding="utf-8")
    return shards


def write_objects(path: Path, names: list[str], counts: dict[str, list[int]], stems: list[str]) -> None:
    """objects.csv: header stem,<category>,...; one row of instance counts per stem (zeros where none)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["stem", *names])
        for stem in stems:
            writer.writerow([stem, *counts.get(stem, [0] * len(names))])


@app.command()
def main(
    out: Path = typer.Option(..., help="root of the new image layout (<out>/<shard>/<stem>.jpg + .txt)"),
    images: Path = typer.Option(..., help="folder the JSON's file names are relative to (COCO Karpathy: the COCO root)"),
    captions: Path = typer.Option(None, help="COCO captions file, e.g. captions_val2014.json"),
    karpathy: Path = typer.Option(None, help="Karpathy split file, dataset_coco.json or dataset_flickr30k.json"),
    split: list[str] = typer.Option(None, help="Karpathy split(s) to take (train/val/test/restval); repeat or "
                                                 "comma-separate; default all"),
    instances: Path = typer.Option(None, help="COCO instances file, e.g. instances_val2014.json; writes objects.csv"),
    shard_size: int = typer.Option(1000, min=1, help="images per shard folder"),
    link: str = typer.Option("symlink", help="symlink (absolute), hardlink, or copy the photos"),
    limit: int = typer.Option(None, min=1, help="only the first N images after sorting by stem, to try it out"),
    skip_missing: bool = typer.Option(False, help="list images missing under --images and go on without them"),
    overwrite: bool = typer.Option(False, help="write into a non-empty --out, replacing its shard folders "
                                               "and objects.csv"),
):
    """Write COCO / Flickr30k images and their reference captions as <out>/<shard>/<stem>.jpg + .txt."""
    splits = [s.strip() for item in split or [] for s in item.split(",") if s.strip()]
    if link not in LINKS:
        raise SystemExit(f"--link {link!r}: choose one of {', '.join(LINKS)}")
    if splits and karpathy is None:
        raise SystemExit("--split needs --karpathy: only Karpathy split files carry splits")
    if captions is None and karpathy is None:
        raise SystemExit("give --captions (COCO captions_*.json) or --karpathy (dataset_coco.json / dataset_flickr30k.json)")
    if not images.is_dir():
        raise SystemExit(f"{images}: --images folder not found; pass the folder holding the image files")
    if out.exists() and not out.is_dir():
        raise SystemExit(f"{out}: --out exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SystemExit(f"{out}: --out is not empty; choose an empty folder or pass --overwrite")

    if karpathy is not None:
        if captions is not None:  # checked, but the Karpathy sentences are the references
            read_coco(captions, images)
            typer.echo("--karpathy given: it chooses the images, and the references come from its sentences")
        entries = read_karpathy(karpathy, images, splits)
    else:
        entries = read_coco(captions, images)
    entries, n_missing = check(sorted(entries, key=lambda e: e.stem), skip_missing)
    entries = entries[:limit] if limit else entries
    if not entries:
        raise SystemExit(f"{karpathy or captions}: no images to write; check --split and --images")

    if instances is not None:  # read before touching --out, so a bad file leaves it as it was
        names, counts = read_instances(instances, [e.stem for e in entries])
    if out.is_dir():  # --overwrite: drop what an earlier import wrote; anything else is left alone
        for old in out.iterdir():
            if old.is_dir() and re.fullmatch(r"shard\d+", old.name):
                shutil.rmtree(old)
        (out / "objects.csv").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    shards = write_layout(entries, out, shard_size, link)
    objects = "not written (no --instances)"
    if instances is not None:
        write_objects(out / "objects.csv", names, counts, [e.stem for e in entries])
        objects = (f"{out / 'objects.csv'} ({len(names)} categories; "
                   f"{len(entries) - len(counts)} image(s) without instance annotations, all zeros)")

    n_refs = [len(e.refs) for e in entries]
    with_refs = [n for n in n_refs if n]
    refs = (f"{min(with_refs)}/{sum(with_refs) / len(with_refs):.2f}/{max(with_refs)}" if with_refs else "-")
    typer.echo(f"import_coco: wrote {len(entries)} images in {len(shards)} shard(s) to {out} ({link})\n"
               f"  references per image (min/mean/max, images with captions): {refs}\n"
               f"  images without captions (no .txt): {n_refs.count(0)}\n"
               f"  missing images skipped: {n_missing}\n"
               f"  objects.csv: {objects}")


if __name__ == "__main__":
    app()
