"""Turn COCO / Flickr30k captions into the study's image layout, <out>/<shard>/<stem>.jpg + <stem>.txt.

    python scripts/import_coco.py --karpathy dataset_coco.json --images coco --split test --out data/images/coco
    python scripts/import_coco.py --karpathy dataset_coco.json --images coco --split test --limit 20 --out trial
    python scripts/import_coco.py --captions captions_val2014.json --images coco/val2014 --out data/images/coco
    python scripts/import_coco.py --karpathy dataset_flickr30k.json --images flickr30k-images --split test --out f30k
    python scripts/import_coco.py ... --instances instances_val2014.json     # also write <out>/objects.csv

Each <stem>.txt holds the image's reference captions, one per line, in annotation order. Images are
sorted by stem and cut into shards of --shard-size (shard000, shard001, ...); --limit N keeps the first N
of them (after --split). The photos are linked, not copied (absolute symlinks by default; --link hardlink
or copy on request).

With --instances, <out>/objects.csv gets one row per image: `stem`, then per category (in id order) the
number of its individually annotated instances, then `crowd`: the categories (";"-separated) that the image
has a crowd region of. A crowd region (`iscrowd: 1`) is one annotation covering many instances (a crowd
of people, a stack of books) whose number nobody counted: it adds no instance, and the category counts
as present (conngeo.data.targets). 0 means absent only for an image the instances file lists: an image
it does not list has unknown objects, which stops the import naming the images, or with
--skip-missing-instances leaves them out, listed.

The input is checked, never trusted: an image id used twice in a COCO file (its captions or objects
would land on the wrong image), an annotation of an unlisted image, a stem used twice, a missing image
file: each stops with a one-line error naming them, before anything is written.
"""

import csv
import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import typer
from tqdm import tqdm

app = typer.Typer(add_completion=False)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what conngeo.data.images.scan reads
LINKS = ("symlink", "hardlink", "copy")
CROWD = "crowd"  # objects.csv's last column (conngeo.data.targets reads it)


@dataclass
class Entry:
    stem: str
    path: Path  # the original image file
    refs: list[str]  # cleaned, non-empty captions in annotation order


@dataclass
class Objects:
    names: list[str]  # category names in id order
    counts: dict[str, list[int]]  # stem -> individually annotated instances per category
    crowd: dict[str, list[str]]  # stem -> categories with a crowd region, in id order
    listed: set[str]  # every stem the instances file lists (an image with no annotation has no objects)


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


def unique_ids(path: Path, images: list[dict]) -> None:
    """Stop on an image id used twice: annotations find their image by id, so one image would get the
    other's captions or objects."""
    twice = sorted((i for i, n in Counter(img["id"] for img in images).items() if n > 1), key=str)
    if twice:
        files = {}
        for img in images:
            files.setdefault(img["id"], []).append(str(img.get("file_name")))
        shown = "; ".join(f"id {i}: {', '.join(files[i])}" for i in twice[:3])
        raise SystemExit(f"{path}: {len(twice)} image id(s) appear more than once in 'images' ({shown}); an id "
                         "must name one image, or annotations land on the wrong one: the file is damaged or merged "
                         "from two, download it again")


def read_coco(path: Path, images: Path) -> list[Entry]:
    """Entries from a COCO captions file: images[].file_name under `images`, captions from annotations."""
    expected = "a COCO captions file (captions_*.json)"
    data = load_json(path, expected)
    if data["images"] and "sentences" in data["images"][0]:
        raise SystemExit(f"{path}: this is a Karpathy split file; pass it with --karpathy, not --captions")
    if not isinstance(data.get("annotations"), list):
        raise SystemExit(f"{path}: no 'annotations' list; expected {expected}")
    try:
        unique_ids(path, data["images"])
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


def read_instances(path: Path, stems: list[str]) -> Objects:
    """The objects of the images in `stems` (see the module docstring: instances, crowd regions, listed)."""
    expected = "a COCO instances file (instances_*.json)"
    data = load_json(path, expected)
    if not isinstance(data.get("categories"), list) or not isinstance(data.get("annotations"), list):
        raise SystemExit(f"{path}: no 'categories' and 'annotations' lists; expected {expected}")
    try:
        unique_ids(path, data["images"])
        categories = sorted(data["categories"], key=lambda c: c["id"])
        names = [str(c["name"]) for c in categories]
        if clash := {"stem", CROWD} & set(names):
            raise SystemExit(f"{path}: a category is named {sorted(clash)}, which objects.csv uses for its own column; "
                             "rename the category")
        column = {c["id"]: i for i, c in enumerate(categories)}
        stem_of = {img["id"]: Path(img["file_name"]).stem for img in data["images"]}
        wanted = set(stems)
        counts, crowd = {}, {}
        for ann in data["annotations"]:
            if ann["image_id"] not in stem_of:
                raise SystemExit(f"{path}: annotation for image_id {ann['image_id']} has no entry in 'images'; "
                                 "the file is damaged, download it again")
            if ann["category_id"] not in column:
                raise SystemExit(f"{path}: annotation with category_id {ann['category_id']} not in "
                                 "'categories'; the file is damaged, download it again")
            stem = stem_of[ann["image_id"]]
            if stem in wanted:
                if ann.get("iscrowd", 0):
                    crowd.setdefault(stem, set()).add(column[ann["category_id"]])
                else:
                    counts.setdefault(stem, [0] * len(categories))[column[ann["category_id"]]] += 1
    except (KeyError, TypeError) as err:
        raise SystemExit(f"{path}: an image, annotation or category lacks {err}; expected {expected}")
    listed = wanted & set(stem_of.values())
    if stems and not listed:
        raise SystemExit(f"{path}: none of the images are listed in it; pass the instances file of the same "
                         "split as the captions (e.g. instances_val2014.json for val2014)")
    return Objects(names, counts, {s: [names[i] for i in sorted(c)] for s, c in crowd.items()}, listed)


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


def write_objects(path: Path, objects: Objects, stems: list[str]) -> None:
    """objects.csv: header stem,<category>,...,crowd; per stem its instance counts (zeros where none) and the
    categories of its crowd regions (empty where none)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["stem", *objects.names, CROWD])
        for stem in stems:
            writer.writerow([stem, *objects.counts.get(stem, [0] * len(objects.names)),
                             ";".join(objects.crowd.get(stem, []))])


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
    skip_missing_instances: bool = typer.Option(False, help="list images that the --instances file does not list "
                                                            "(their objects are unknown) and go on without them"),
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
    unlisted = []
    if instances is not None:  # read before touching --out, so a bad file leaves it as it was
        objects = read_instances(instances, [e.stem for e in entries])
        if skip_missing_instances:  # before --limit, so that --limit N still gives N images
            unlisted = [e for e in entries if e.stem not in objects.listed]
            entries = [e for e in entries if e.stem in objects.listed]
            for e in unlisted:
                typer.echo(f"skipping {e.stem}: not listed in {instances}, its objects are unknown", err=True)
    entries = entries[:limit] if limit else entries
    if not entries:
        raise SystemExit(f"{karpathy or captions}: no images to write; check --split and --images")
    if instances is not None and not skip_missing_instances:
        absent = [e.stem for e in entries if e.stem not in objects.listed]
        if absent:
            raise SystemExit(f"{instances}: {len(absent)} of the {len(entries)} images are not listed in it (e.g. "
                             f"{', '.join(absent[:5])}), so their objects are unknown; pass the instances file that "
                             "covers them, or --skip-missing-instances to leave them out")

    if out.is_dir():  # --overwrite: drop what an earlier import wrote; anything else is left alone
        for old in out.iterdir():
            if old.is_dir() and re.fullmatch(r"shard\d+", old.name):
                shutil.rmtree(old)
        (out / "objects.csv").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    shards = write_layout(entries, out, shard_size, link)
    summary = "not written (no --instances)"
    if instances is not None:
        stems = [e.stem for e in entries]
        write_objects(out / "objects.csv", objects, stems)
        summary = (f"{out / 'objects.csv'} ({len(objects.names)} categories; "
                   f"{sum(s not in objects.counts and s not in objects.crowd for s in stems)} image(s) without "
                   f"objects, all zeros; {sum(s in objects.crowd for s in stems)} with a crowd region; "
                   f"{len(unlisted)} not in the instances file, skipped)")

    n_refs = [len(e.refs) for e in entries]
    with_refs = [n for n in n_refs if n]
    refs = (f"{min(with_refs)}/{sum(with_refs) / len(with_refs):.2f}/{max(with_refs)}" if with_refs else "-")
    typer.echo(f"import_coco: wrote {len(entries)} images in {len(shards)} shard(s) to {out} ({link})\n"
               f"  references per image (min/mean/max, images with captions): {refs}\n"
               f"  images without captions (no .txt): {n_refs.count(0)}\n"
               f"  missing images skipped: {n_missing}\n"
               f"  objects.csv: {summary}")


if __name__ == "__main__":
    app()
