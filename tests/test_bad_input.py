"""Bad input, case by case (GitHub issue 19, items 3 and 4). Every case has one documented outcome: a
one-line error that names the file and the fix, or a listed skip; nothing is lost silently.

    #  input                                          outcome
    1  stems with `,` `"` spaces, non-ASCII letters   every CSV the project writes (vector and reference index.csv,
                                                      caption tables and parts, split.csv, the pandas tables,
                                                      objects.csv + .txt of import_coco) reads them back unchanged;
                                                      extraction keeps them
    2  L, LA, 1, P, RGBA, CMYK, 16-bit grey images    decoded as 8-bit RGB (16-bit scaled, not clipped) and extracted
       truncated / zero-byte / text-as-.png files     on_bad_image error: one-line BadImageError naming the file and
                                                      `on_bad_image: skip`; skip: left out, listed in the shard's
                                                      fingerprint.json and the summary, the others extracted
    3  a shard folder without images                  listed in ImageFolder.empty_shards (`verify images` prints it)
       a shard folder whose every image is bad        extract and references: error naming that image folder
       one stem twice (two shards, or .png + .jpg)    scan: error naming both files
    4  NaN / inf in a vector shard                    VectorReader: ValueError naming the shard file, image and fix
    5  a shard of another model / revision            never reused nor mixed: replaced, incomplete (no index.csv)
                                                      until joined; verify names the other fingerprint
    6  data/refs/<space> missing                      geometry: error naming the folder and `dvc repro references@<space>`
    7  a params.yaml key misspelt                     KeyError naming the key and the typo
    8  cases 2, 3, 4, 6, 7 through a stage script     exit 1, stderr one line naming the file, no traceback
"""

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from conngeo.captions.parts import read_parts, write_part
from conngeo.captions.table import read_table, write_table
from conngeo.data import toyworld
from conngeo.data.images import BadImageError, decode, load_image, scan
from conngeo.data.targets import probe_targets
from conngeo.data.vectors import (
    VectorReader,
    is_complete,
    read_embeddings,
    read_index,
    write_embeddings,
    write_index,
    write_shard,
)
from conngeo.extraction import extract, verify
from conngeo.families import adapter_class
from conngeo.recon.data import read_split, write_split
from conngeo.report.tables import read_csv
from models_helpers import DiesAfter, Interrupted, toy_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"family": "qwen2.5vl", "source": "test", "revision": None, "dtype": "float32", "prompt": ""}
SIZE = 48
STEMS = ["a,b", 'say "hi"', "two words", "crème_brûlée", '"quoted",x', "naïve 日本", "007", "NA"]


@pytest.fixture(scope="module")
def adapter():
    cls = adapter_class("qwen2.5vl")
    return cls.tiny(toy_tokenizer(cls.special_tokens), SIZE, seed=0)


def picture(i: int = 0) -> Image.Image:
    return toyworld.make_image(0, "study", 0, i, SIZE)[1]


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def stage_module(name: str):
    """A module of stages/ (they import `common` from there)."""
    sys.path.insert(0, str(ROOT / "stages"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "stages"))


def stage_app(name: str):
    return stage_module(name).app


def one_line(message: str) -> str:
    assert "\n" not in message.strip() and "Traceback" not in message, message
    return message


# -- 1. stems with commas, quotes, spaces, non-ASCII letters ------------------------------------------------

def vector_index(tmp, stems):
    write_index(tmp, stems, list(range(len(stems))), [1] * len(stems))
    return [r[0] for r in read_index(tmp)]


def reference_index(tmp, stems):
    write_embeddings(tmp / "shard000", stems, torch.zeros(len(stems), 2))
    assert pd.read_csv(tmp / "shard000/index.csv", keep_default_na=False, dtype=str)["stem"].tolist() == stems
    return read_embeddings([tmp / "shard000"])[0]


def caption_table(tmp, stems):
    captions = ["a dog, a cat", 'he said "no"', "", "two\nlines", "crème", " x ", "0", "NA"][:len(stems)]
    write_table(tmp / "captions.csv", {"stem": stems, "post": captions})
    table = read_table(tmp / "captions.csv", required=("stem", "post"))
    assert table["post"] == captions
    return table["stem"]


def caption_parts(tmp, stems):
    write_part(tmp, (0, 0, len(stems)), "fp", {"stem": stems, "post": ["c"] * len(stems)})
    rows, ignored = read_parts(tmp, "fp")
    assert not ignored
    return list(rows)


def recon_split(tmp, stems):
    write_split(tmp / "split.csv", stems, ["train"] * len(stems))
    return list(read_split(tmp / "split.csv"))


def pandas_table(tmp, stems):
    """geometry, recon_eval per_image.csv: written by pandas, read by the report (conngeo.report.tables)."""
    pd.DataFrame({"stem": stems, "knor@5": np.linspace(0, 1, len(stems))}).to_csv(
        tmp / "per_image.csv", index=False, float_format="%.6g")
    return read_csv(tmp / "per_image.csv").index.tolist()


def import_coco_layout(tmp, stems):
    """scripts/import_coco.py: <out>/<shard>/<stem>.jpg + .txt and objects.csv, read back by scan and the probes."""
    spec = importlib.util.spec_from_file_location("import_coco_script", ROOT / "scripts" / "import_coco.py")
    coco = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(coco)
    (tmp / "photos").mkdir()
    entries = []
    for i, stem in enumerate(stems):
        picture(i).save(tmp / "photos" / f"{stem}.jpg")
        entries.append(coco.Entry(stem, tmp / "photos" / f"{stem}.jpg", [f"a plate, \"{stem}\"", "café"]))
    entries.sort(key=lambda e: e.stem)
    coco.write_layout(entries, tmp / "out", shard_size=3, link="copy")
    counts = {e.stem: [i % 2, 1] for i, e in enumerate(entries)}
    crowd = {entries[0].stem: ["dog"]}  # a crowd region of dogs: present, no instance counted
    coco.write_objects(tmp / "out" / "objects.csv", coco.Objects(["dog", "cat"], counts, crowd, set(stems)),
                       [e.stem for e in entries])
    items = scan(tmp / "out").items
    assert all(it.references == [f"a plate, \"{it.stem}\"", "café"] for it in items)
    got = [it.stem for it in items]
    targets = probe_targets(tmp / "out", got)
    assert targets["objects"][1] == [counts[s][0] + 1 for s in got]
    assert targets["object:dog"][1] == [int(counts[s][0] > 0 or s in crowd) for s in got]
    return got


@pytest.mark.parametrize("round_trip", [vector_index, reference_index, caption_table, caption_parts, recon_split,
                                        pandas_table, import_coco_layout], ids=lambda f: f.__name__)
def test_every_csv_reads_back_awkward_stems(round_trip, tmp_path):
    got = round_trip(tmp_path, STEMS)
    assert sorted(got) == sorted(STEMS)
    if round_trip is not import_coco_layout:  # (the layout sorts by stem)
        assert got == STEMS


def test_extraction_keeps_awkward_stems(adapter, tmp_path):
    for i, stem in enumerate(STEMS):
        (tmp_path / "images" / "shard000").mkdir(parents=True, exist_ok=True)
        picture(i).save(tmp_path / "images" / "shard000" / f"{stem}.png")
    items = scan(tmp_path / "images").items
    summary = extract(adapter, items, tmp_path / "out", SPEC, batch_size=4, save_every=4)
    assert summary["images"] == len(STEMS) and summary["skipped"] == []
    assert [r[0] for r in read_index(tmp_path / "out" / "shard000")] == [it.stem for it in items]
    assert sorted(VectorReader([tmp_path / "out" / "shard000"]).stems) == sorted(STEMS)
    assert verify(items, tmp_path / "out", SPEC) == []


# -- 2. image modes and unreadable files ----------------------------------------------------------------------

def in_mode(mode: str) -> Image.Image:
    rgb = picture()
    if mode == "I;16":  # 16-bit grey: the 8-bit grey values x 257 (how an 8-bit image is widened)
        return Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    return rgb.convert(mode)


MODES = [("L", "PNG"), ("L", "JPEG"), ("LA", "PNG"), ("1", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"),
         ("I;16", "PNG")]


@pytest.mark.parametrize("mode,fmt", MODES, ids=[f"{m}-{f}" for m, f in MODES])
def test_every_image_mode_decodes_as_rgb(mode, fmt, tmp_path):
    path = tmp_path / f"x.{fmt.lower()}"
    in_mode(mode).save(path, format=fmt)
    with Image.open(path) as stored:
        assert stored.mode == mode or (mode, stored.mode) == ("I;16", "I")
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (SIZE, SIZE)
    if mode == "I;16":  # scaled to 8 bits, not clipped at 255 (Pillow's own convert makes it nearly white)
        assert np.array_equal(np.asarray(image), np.asarray(picture().convert("L").convert("RGB")))


def truncated(fmt):
    def write(path):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(buffer, fmt)
        path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    return write


BAD = {"truncated_png.png": truncated("PNG"), "truncated_jpg.jpg": truncated("JPEG"),
       "empty.png": lambda p: p.write_bytes(b""), "text.png": lambda p: p.write_text("not an image\n")}


@pytest.mark.parametrize("name", list(BAD))
def test_an_unreadable_file_is_one_line_naming_it_and_the_fix_or_listed(name, tmp_path):
    (tmp_path / "s").mkdir()
    BAD[name](tmp_path / "s" / name)
    picture().save(tmp_path / "s" / "good.png")
    items = scan(tmp_path).items
    with pytest.raises(BadImageError) as err:
        decode(items, on_bad_image="error")
    assert str(tmp_path / "s" / name) in one_line(str(err.value)) and "on_bad_image: skip" in str(err.value)
    kept, _, skipped = decode(items, on_bad_image="skip")
    assert [it.stem for it in kept] == ["good"] and [p for p, _ in skipped] == [tmp_path / "s" / name]


@pytest.fixture
def mixed(tmp_path):
    """shard000: a picture in every mode; shard001: a good picture and every unreadable file."""
    for mode, fmt in MODES:
        (tmp_path / "images" / "shard000").mkdir(parents=True, exist_ok=True)
        in_mode(mode).save(tmp_path / "images" / "shard000" / f"{mode.replace(';', '')}_{fmt}.{fmt.lower()}", fmt)
    (tmp_path / "images" / "shard001").mkdir()
    picture(1).save(tmp_path / "images" / "shard001" / "good.png")
    for name, write in BAD.items():
        write(tmp_path / "images" / "shard001" / name)
    return scan(tmp_path / "images").items


def test_skip_lists_the_unreadable_files_and_extracts_every_mode(adapter, mixed, tmp_path):
    summary = extract(adapter, mixed, tmp_path / "out", SPEC, batch_size=4, save_every=4, on_bad_image="skip")
    bad = sorted(Path(name).stem for name in BAD)
    assert sorted(stem for stem, _ in summary["skipped"]) == bad and summary["images"] == len(MODES) + 1
    stamp = json.loads((tmp_path / "out" / "shard001" / "fingerprint.json").read_text())
    assert sorted(stem for stem, _ in stamp["skipped"]) == bad and stamp["images"] == 1
    assert [r[0] for r in read_index(tmp_path / "out" / "shard000")] == [it.stem for it in mixed if it.shard == "shard000"]
    assert [r[0] for r in read_index(tmp_path / "out" / "shard001")] == ["good"]
    assert verify(mixed, tmp_path / "out", SPEC) == []  # skipped and listed, not missing


def test_error_stops_at_the_first_unreadable_file(adapter, mixed, tmp_path):
    first = next(it for it in mixed if it.stem in {Path(n).stem for n in BAD})
    with pytest.raises(BadImageError) as err:
        extract(adapter, mixed, tmp_path / "out", SPEC, batch_size=4, save_every=4)
    assert str(first.path) in one_line(str(err.value)) and "on_bad_image: skip" in str(err.value)


# -- 3. shard folders: empty, all unreadable, one stem twice --------------------------------------------------

def test_an_empty_shard_folder_is_listed(tmp_path):
    for shard in ("shard000", "empty", "captions_only"):
        (tmp_path / shard).mkdir()
    picture().save(tmp_path / "shard000" / "x.png")
    (tmp_path / "captions_only" / "y.txt").write_text("a caption\n")
    folder = scan(tmp_path)
    assert [it.stem for it in folder.items] == ["x"]
    assert folder.empty_shards == [tmp_path / "captions_only", tmp_path / "empty"]
    result = CliRunner().invoke(stage_app("verify"), ["images", "--root", str(tmp_path)])
    assert result.exit_code == 0 and f"{tmp_path / 'empty'}: a shard folder with no" in result.output
    with pytest.raises(FileNotFoundError, match="no images"):
        scan(tmp_path, shards=["empty"])


@pytest.mark.parametrize("on_bad_image", ["error", "skip"])
def test_a_shard_of_only_unreadable_files_is_an_error_naming_its_folder(adapter, tmp_path, on_bad_image):
    """error: the first file, as always; skip: the folder (the study would lose the whole shard)."""
    images = tmp_path / "images"
    for shard in ("shard000", "shard001"):
        (images / shard).mkdir(parents=True)
    picture().save(images / "shard000" / "good.png")
    for name in ("empty.png", "text.png"):
        BAD[name](images / "shard001" / name)
    items = scan(images).items
    with pytest.raises(BadImageError if on_bad_image == "error" else ValueError) as err:
        extract(adapter, items, tmp_path / "out", SPEC, batch_size=4, save_every=4, on_bad_image=on_bad_image)
    named = images / "shard001" / "empty.png" if on_bad_image == "error" else f"{images / 'shard001'}: every image"
    assert str(named) in one_line(str(err.value))


@pytest.mark.parametrize("first,second", [("shard000/x.png", "shard001/x.png"), ("shard000/x.png", "shard000/x.jpg")])
def test_one_stem_twice_is_an_error_naming_both_files(tmp_path, first, second):
    for rel in (first, second):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        picture().save(tmp_path / rel)
    with pytest.raises(ValueError, match="two images with the stem 'x'") as err:
        scan(tmp_path)
    assert str(tmp_path / first) in one_line(str(err.value)) and str(tmp_path / second) in str(err.value)


# -- 4. NaN / inf in a vector shard ------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["pre", "post"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_vectors_are_an_error_naming_the_shard_and_image(tmp_path, value, side):
    mats = {s: [torch.ones(2, 3) for _ in range(3)] for s in ("pre", "post")}
    mats[side][1][0, 2] = value
    write_shard(tmp_path / "shard000", ["a", "b", "c"], mats["pre"], mats["post"])
    reader = VectorReader([tmp_path / "shard000"])
    assert reader.read(side, [0, 2]).shape == (2, 2, 3)  # the other images read fine
    with pytest.raises(ValueError, match="NaN or inf") as err:
        reader.read(side, [0, 1])
    message = one_line(str(err.value))
    assert str(tmp_path / "shard000" / side) in message and "image b" in message and "dvc repro extract" in message


# -- 5. a shard written by another model / revision ----------------------------------------------------------------

def test_a_shard_of_another_model_is_replaced_never_mixed(adapter, tmp_path):
    toyworld.generate(tmp_path / "images", split="study", seed=0, shards=1, images_per_shard=5, size=SIZE)
    items, out, other = scan(tmp_path / "images").items, tmp_path / "out", {**SPEC, "revision": "b" * 40}
    extract(adapter, items, out, SPEC, batch_size=2, save_every=2)
    with pytest.raises(Interrupted):  # the other revision dies after two of its three parts
        extract(DiesAfter(adapter, 2), items, out, other, batch_size=2, save_every=2)
    assert not is_complete(out / "shard000")  # the first model's vectors no longer look finished
    with pytest.raises(FileNotFoundError, match="incomplete vector shard"):
        VectorReader([out / "shard000"])
    assert any("incomplete" in p for p in verify(items, out, other))
    # resumed with another save_every: the old parts hold other images under the same numbers, never reused
    assert extract(adapter, items, out, other, batch_size=2, save_every=4)["shards"] == {"shard000": "done"}
    extract(adapter, items, tmp_path / "fresh", other, batch_size=2, save_every=4)
    assert files(out) == files(tmp_path / "fresh")
    assert verify(items, out, other) == []
    assert any("fingerprint differs" in p for p in verify(items, out, SPEC))


# -- 7. a misspelt params.yaml key ---------------------------------------------------------------------------------

def params_with(tmp_path: Path, **changes) -> Path:
    """The project's params.yaml with `changes` (section -> {key: value, or None to delete}) in `tmp_path`."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, keys in changes.items():
        for key, value in keys.items():
            if value is None:
                del params[section][key]
            else:
                params[section][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path / "params.yaml"


def test_a_misspelt_key_names_the_key_and_the_typo(tmp_path):
    load_params = stage_module("common").load_params
    params = load_params(params_with(tmp_path, recon={"epcohs": 40, "epochs": None}))
    assert params["recon"]["patience"] == 10
    with pytest.raises(KeyError) as err:
        params["recon"]["epochs"]
    assert "`recon.epochs`" in one_line(err.value.args[0]) and "`recon.epcohs`" in err.value.args[0]


# -- 8. the same through the stage scripts: one line on stderr, exit 1 ----------------------------------------------

def vectors(tmp_path: Path, model: str = "m", nan: bool = False) -> None:
    """data/vectors/<model>/shard000: 40 images of 2 x 3 tokens (one NaN with `nan`)."""
    pre = [torch.randn(2, 3, generator=torch.Generator().manual_seed(i)) for i in range(40)]
    if nan:
        pre[7][1, 1] = float("nan")
    write_shard(tmp_path / "data/vectors" / model / "shard000", [f"img{i:02d}" for i in range(40)], pre,
                [p * 2 for p in pre])


def unreadable_image_in_a_worker(tmp_path):
    (tmp_path / "images" / "shard000").mkdir(parents=True)
    BAD["text.png"](tmp_path / "images" / "shard000" / "a,b.png")
    picture().save(tmp_path / "images" / "shard000" / "b.png")
    params_with(tmp_path, data={"root": "images", "on_bad_image": "error"}, extract={"num_workers": 1})
    # the checkpoint's processor is read first (the fingerprint records it); the model is loaded on first use,
    # and the unreadable first image stops the run before
    cls = adapter_class("qwen2.5vl")
    cls.tiny(toy_tokenizer(cls.special_tokens), SIZE, seed=0).save(tmp_path / "data/zoo/qwen2_5vl")
    return "extract", ["--model", "qwen2_5vl"], "images/shard000/a,b.png"


def shard_of_unreadable_images(tmp_path):
    toyworld.generate(tmp_path / "images", split="study", seed=0, shards=2, images_per_shard=2, size=SIZE)
    for path in (tmp_path / "images" / "shard001").glob("*.png"):
        path.write_bytes(b"")
    params_with(tmp_path, data={"root": "images", "on_bad_image": "skip"},
                references={"spaces": {"attributes": {"kind": "attributes", "source": "images/attributes.csv"}}})
    return "references", ["--space", "attributes"], "images/shard001"


def nan_in_vectors(tmp_path):
    vectors(tmp_path, nan=True)
    params_with(tmp_path)
    return "geometry", ["--model", "m"], "data/vectors/m/shard000/pre.safetensors"


def missing_reference_space(tmp_path):
    vectors(tmp_path)
    params_with(tmp_path)
    return "geometry", ["--model", "m"], "data/refs/clip"


def misspelt_params_key(tmp_path):
    vectors(tmp_path)
    params_with(tmp_path, recon={"epcohs": 40, "epochs": None})
    return "recon", ["--model", "m"], "recon.epochs"


STAGE_CASES = [unreadable_image_in_a_worker, shard_of_unreadable_images, nan_in_vectors, missing_reference_space,
               misspelt_params_key]
FIXES = {"extract": "on_bad_image: skip", "references": "move the folder out", "geometry": "dvc repro",
         "recon": "recon.epcohs"}


@pytest.mark.parametrize("case", STAGE_CASES, ids=lambda f: f.__name__)
def test_a_stage_says_it_in_one_line(case, tmp_path):
    name, args, named = case(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / f"{name}.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{name}: error: ") and named in lines[0] and FIXES[name] in lines[0], lines[0]
    if name == "geometry" and named == "data/refs/clip":
        assert "dvc repro references@clip" in lines[0]
