"""scripts/import_coco.py: COCO / Karpathy / Flickr30k captions -> <out>/<shard>/<stem>.jpg + .txt (+ objects.csv)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conngeo.data.images import scan

ROOT = Path(__file__).resolve().parents[1]
S1, S2, S3, S4 = (f"COCO_val2014_00000000000{i}" for i in (1, 2, 3, 4))


def import_coco(*args):
    return subprocess.run([sys.executable, "scripts/import_coco.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


def ok(*args):
    proc = import_coco(*args)
    assert proc.returncode == 0, proc.stderr
    return proc


def fails(*args):
    """Run, expect a one-line error on stderr (no traceback), and return it."""
    proc = import_coco(*args)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def coco(tmp_path):
    """A tiny COCO root: val2014/ images, captions, instances and a Karpathy file; plus a Flickr30k one."""
    val = tmp_path / "coco" / "val2014"
    val.mkdir(parents=True)
    files = {1: f"{S1}.jpg", 2: f"{S2}.png", 3: f"{S3}.jpg", 4: f"{S4}.jpg"}
    for i, name in files.items():
        Image.new("RGB", (8 + 4 * i, 6 + 2 * i), (40 * i, 10, 200)).save(val / name)
    images = [{"id": i, "file_name": name, "width": 8 + 4 * i, "height": 6 + 2 * i} for i, name in files.items()]
    captions = [(4, "A pizza."), (1, "  A dog on a\nsofa.  "), (2, "Two cats."), (1, "A brown dog."),
                (1, "   "), (2, "Cats sleeping.")]  # image 3 has none
    write_json(tmp_path / "captions.json", {"images": images, "annotations": [
        {"id": 100 + k, "image_id": i, "caption": c} for k, (i, c) in enumerate(captions)]})
    write_json(tmp_path / "instances.json", {
        "images": images,
        "categories": [{"id": 18, "name": "dog"}, {"id": 17, "name": "cat"}],  # id order: cat, dog
        "annotations": [{"id": 1, "image_id": 1, "category_id": 18}, {"id": 2, "image_id": 1, "category_id": 18},
                        {"id": 3, "image_id": 2, "category_id": 17}, {"id": 4, "image_id": 2, "category_id": 17},
                        {"id": 5, "image_id": 2, "category_id": 18}, {"id": 6, "image_id": 4, "category_id": 17},
                        {"id": 7, "image_id": 4, "category_id": 18, "iscrowd": 1},  # a crowd of dogs
                        {"id": 8, "image_id": 2, "category_id": 17, "iscrowd": 0}]})
    splits = {1: "test", 2: "val", 3: "test", 4: "train"}
    write_json(tmp_path / "dataset_coco.json", {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": files[i], "cocoid": i, "split": splits[i],
         "sentences": [{"raw": f"Karpathy {i}.{k}", "tokens": []} for k in range(i % 3)]} for i in files]})

    flickr = tmp_path / "flickr30k-images"
    flickr.mkdir()
    for name in ("1000092795.jpg", "10002456.jpg"):
        Image.new("RGB", (10, 7)).save(flickr / name)
    write_json(tmp_path / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "test", "sentences": [{"raw": "Two young guys."}]},
        {"filename": "10002456.jpg", "imgid": 1, "split": "train", "sentences": [{"raw": "Workers."}]}]})
    return tmp_path


def test_help():
    assert "--karpathy" in ok("--help").stdout


def test_coco_captions_symlinks_references_objects_and_scan(coco):
    out = coco / "out"
    proc = ok("--captions", coco / "captions.json", "--images", coco / "coco" / "val2014", "--out", out,
              "--instances", coco / "instances.json", "--shard-size", 3)
    assert sorted(p.name for p in out.iterdir()) == ["objects.csv", "shard000", "shard001"]
    assert sorted(p.name for p in (out / "shard000").iterdir()) == sorted(
        [f"{S1}.jpg", f"{S1}.txt", f"{S2}.png", f"{S2}.txt", f"{S3}.jpg"])
    assert sorted(p.name for p in (out / "shard001").iterdir()) == [f"{S4}.jpg", f"{S4}.txt"]
    for shard, name in (("shard000", f"{S1}.jpg"), ("shard000", f"{S2}.png"), ("shard001", f"{S4}.jpg")):
        link = out / shard / name
        assert link.is_symlink()
        target = os.readlink(link)
        assert os.path.isabs(target) and target == str(coco / "coco" / "val2014" / name)
    assert (out / "shard000" / f"{S1}.txt").read_text() == "A dog on a sofa.\nA brown dog.\n"
    assert (out / "shard000" / f"{S2}.txt").read_text() == "Two cats.\nCats sleeping.\n"
    assert (out / "shard001" / f"{S4}.txt").read_text() == "A pizza.\n"
    assert (out / "objects.csv").read_text() == (  # image 3 is listed and has no annotation: no objects
        f"stem,cat,dog,crowd\n{S1},0,2,\n{S2},3,1,\n{S3},0,0,\n{S4},1,0,dog\n")
    summary = proc.stdout
    assert "wrote 4 images in 2 shard(s)" in summary and "symlink" in summary
    assert "1/1.67/2" in summary and "without captions (no .txt): 1" in summary
    assert "1 image(s) without objects, all zeros; 1 with a crowd region; 0 not in the instances file" in summary

    folder = scan(out)
    assert [it.stem for it in folder.items] == [S1, S2, S3, S4]
    assert folder.shards == ["shard000", "shard001"]
    assert folder.missing_captions == [out / "shard000" / f"{S3}.txt"]
    assert folder.items[1].references == ["Two cats.", "Cats sleeping."]


@pytest.mark.parametrize("mode", ["hardlink", "copy"])
def test_hardlink_and_copy(coco, mode):
    out = coco / "out"
    proc = ok("--captions", coco / "captions.json", "--images", coco / "coco" / "val2014", "--out", out,
              "--link", mode, "--limit", 2)
    assert "objects.csv: not written" in proc.stdout
    assert sorted(p.name for p in (out / "shard000").iterdir()) == sorted(
        [f"{S1}.jpg", f"{S1}.txt", f"{S2}.png", f"{S2}.txt"])
    original, placed = coco / "coco" / "val2014" / f"{S1}.jpg", out / "shard000" / f"{S1}.jpg"
    assert not placed.is_symlink() and placed.read_bytes() == original.read_bytes()
    assert (placed.stat().st_ino == original.stat().st_ino) == (mode == "hardlink")


def test_karpathy_splits_limit_and_flickr(coco):
    args = ("--karpathy", coco / "dataset_coco.json", "--images", coco / "coco")
    ok(*args, "--split", "test", "--out", coco / "test")
    assert sorted(p.name for p in (coco / "test" / "shard000").iterdir()) == [f"{S1}.jpg", f"{S1}.txt", f"{S3}.jpg"]
    assert (coco / "test" / "shard000" / f"{S1}.txt").read_text() == "Karpathy 1.0\n"
    ok(*args, "--split", "test,val", "--split", "train", "--limit", 3, "--shard-size", 1, "--out", coco / "lim")
    assert [it.stem for it in scan(coco / "lim").items] == [S1, S2, S3]
    assert (coco / "lim" / "shard001" / f"{S2}.txt").read_text() == "Karpathy 2.0\nKarpathy 2.1\n"
    assert "no images with split ['tset']" in fails(*args, "--split", "tset", "--out", coco / "bad")

    ok("--karpathy", coco / "dataset_flickr30k.json", "--images", coco / "flickr30k-images",
       "--split", "test", "--out", coco / "f30k")
    link = coco / "f30k" / "shard000" / "1000092795.jpg"
    assert os.readlink(link) == str(coco / "flickr30k-images" / "1000092795.jpg")
    assert (coco / "f30k" / "shard000" / "1000092795.txt").read_text() == "Two young guys.\n"
    assert len(list((coco / "f30k" / "shard000").iterdir())) == 2


def test_missing_image_stops_or_is_skipped(coco):
    (coco / "coco" / "val2014" / f"{S2}.png").unlink()
    args = ("--captions", coco / "captions.json", "--images", coco / "coco" / "val2014")
    error = fails(*args, "--out", coco / "out")
    assert "1 image file(s)" in error and f"{S2}.png" in error and "--skip-missing" in error
    assert not (coco / "out").exists()
    proc = ok(*args, "--out", coco / "out", "--skip-missing")
    assert f"{S2}.png" in proc.stderr and "missing images skipped: 1" in proc.stdout
    assert [it.stem for it in scan(coco / "out").items] == [S1, S3, S4]


def test_refuses_non_empty_out_unless_overwrite(coco):
    args = ("--captions", coco / "captions.json", "--images", coco / "coco" / "val2014", "--out", coco / "out")
    ok(*args, "--shard-size", 1)
    error = fails(*args)
    assert str(coco / "out") in error and "--overwrite" in error
    ok(*args, "--overwrite")  # replaces the four one-image shards by one
    assert sorted(p.name for p in (coco / "out").iterdir()) == ["shard000"]
    assert len(scan(coco / "out")) == 4


def test_bad_inputs_give_one_line(coco):
    images = ("--images", coco / "coco" / "val2014", "--out", coco / "out")
    assert "--karpathy" in fails("--captions", coco / "captions.json", "--split", "test", *images)
    assert "nope.json: file not found" in fails("--captions", coco / "nope.json", *images)
    assert "pass it with --karpathy" in fails("--captions", coco / "dataset_coco.json", *images)
    assert "no 'annotations' list" in fails("--captions", write_json(coco / "x.json", {"images": []}), *images)
    assert "expected a COCO instances file" in fails("--captions", coco / "captions.json",
                                                     "--instances", coco / "captions.json", *images)
    assert not (coco / "out").exists()  # a bad --instances stops before anything is written
    twice = json.loads((coco / "dataset_coco.json").read_text())
    twice["images"].append({**twice["images"][0], "filepath": "other"})
    error = fails("--karpathy", write_json(coco / "twice.json", twice), "--images", coco / "coco", "--out", coco / "o")
    assert f"stem '{S1}' appears twice" in error
    assert str(coco / "coco" / "val2014" / f"{S1}.jpg") in error and str(coco / "coco" / "other" / f"{S1}.jpg") in error


def test_crowd_regions_count_as_present_not_as_instances(coco):
    from conngeo.data.targets import probe_targets

    ok("--captions", coco / "captions.json", "--images", coco / "coco" / "val2014", "--out", coco / "out",
       "--instances", coco / "instances.json")
    targets = probe_targets(coco / "out", [S1, S2, S3, S4])
    assert targets["object:dog"] == ("class", [1, 1, 0, 1])  # S4: a crowd region of dogs, no dog instance
    assert targets["object:cat"] == ("class", [0, 1, 0, 1])
    assert targets["objects"] == ("number", [2, 4, 0, 1])  # instances only: the crowd adds none


def test_content_covariates_of_an_import(coco):
    from conngeo.data.images import scan
    from conngeo.data.targets import content_covariates, probe_targets

    ok("--captions", coco / "captions.json", "--images", coco / "coco" / "val2014", "--out", coco / "out",
       "--instances", coco / "instances.json")
    items = sorted(scan(coco / "out").items, key=lambda it: it.stem)
    got = content_covariates(coco / "out", items)
    targets = probe_targets(coco / "out", got["stem"])
    present = [sum(values[i] for name, (_, values) in targets.items() if name.startswith("object:"))
               for i in range(len(items))]
    assert got["objects"] == targets["objects"][1]  # instances, the crowd adding none
    assert got["categories"] == present             # a crowd region makes its category present
    words = [sum(len(t.split()) for t in it.references) / len(it.references) if it.references else None for it in items]
    assert got["reference_words"] == pytest.approx(words, abs=1e-4)


def test_an_image_id_used_twice_stops_naming_it(coco):
    """Two images under one id: the captions (or objects) of one would land on the other."""
    captions = json.loads((coco / "captions.json").read_text())
    captions["images"][2]["id"] = 1  # S3 under S1's id
    args = ("--images", coco / "coco" / "val2014", "--out", coco / "out")
    error = fails("--captions", write_json(coco / "dup.json", captions), *args)
    assert "dup.json: 1 image id(s) appear more than once" in error
    assert f"id 1: {S1}.jpg, {S3}.jpg" in error
    instances = json.loads((coco / "instances.json").read_text())
    instances["images"][3]["id"] = 2
    error = fails("--captions", coco / "captions.json", "--instances", write_json(coco / "dupi.json", instances), *args)
    assert "dupi.json: 1 image id(s) appear more than once" in error and f"id 2: {S2}.png, {S4}.jpg" in error
    assert not (coco / "out").exists()


def test_images_the_instances_file_misses_stop_or_are_skipped(coco):
    """An image the instances file does not list has unknown objects, not zero: an error naming it, or with
    --skip-missing-instances a listed exclusion; --limit counts the images kept."""
    instances = json.loads((coco / "instances.json").read_text())
    instances["images"] = [img for img in instances["images"] if img["id"] != 2]
    instances["annotations"] = [a for a in instances["annotations"] if a["image_id"] != 2]
    part = write_json(coco / "part.json", instances)
    args = ("--captions", coco / "captions.json", "--images", coco / "coco" / "val2014", "--instances", part)
    error = fails(*args, "--out", coco / "out")
    assert "part.json: 1 of the 4 images are not listed in it" in error and S2 in error
    assert "--skip-missing-instances" in error and not (coco / "out").exists()
    ok(*args, "--limit", 1, "--out", coco / "first")  # S1 alone: every image written is covered
    proc = ok(*args, "--skip-missing-instances", "--limit", 2, "--out", coco / "out")
    assert f"skipping {S2}: not listed in {part}" in proc.stderr
    assert "1 not in the instances file, skipped" in proc.stdout
    assert [it.stem for it in scan(coco / "out").items] == [S1, S3]
    assert (coco / "out" / "objects.csv").read_text() == f"stem,cat,dog,crowd\n{S1},0,2,\n{S3},0,0,\n"

    instances["annotations"].append({"id": 99, "image_id": 2, "category_id": 17})
    error = fails(*args[:-1], write_json(coco / "orphan.json", instances), "--out", coco / "o")
    assert "orphan.json: annotation for image_id 2 has no entry in 'images'" in error


def test_karpathy_test_split_with_limit_and_instances(coco):
    """The trial's import: the first N images of the Karpathy test split, with their objects."""
    proc = ok("--karpathy", coco / "dataset_coco.json", "--images", coco / "coco", "--split", "test", "--limit", 1,
              "--instances", coco / "instances.json", "--out", coco / "trial")
    assert "wrote 1 images in 1 shard(s)" in proc.stdout
    assert [it.stem for it in scan(coco / "trial").items] == [S1]
    assert (coco / "trial" / "objects.csv").read_text() == f"stem,cat,dog,crowd\n{S1},0,2,\n"
