import pytest
from PIL import Image

from conngeo.data.images import BadImageError, scan


def write_image(path, colour=(200, 10, 10), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path, format=fmt)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    for shard, stems in (("b_shard", ["z1", "a2"]), ("a_shard", ["m", "c"])):
        for stem in stems:
            write_image(root / shard / f"{stem}.png")
            (root / shard / f"{stem}.txt").write_text(f"caption of {stem}\n")
    write_image(root / "a_shard" / "d.jpg", fmt="JPEG")  # a jpg without caption
    return root


def test_sorted_shards_and_stems(folder):
    ds = scan(folder)
    assert [(i.shard, i.stem) for i in ds.items] == [
        ("a_shard", "c"), ("a_shard", "d"), ("a_shard", "m"), ("b_shard", "a2"), ("b_shard", "z1")]
    assert ds.items[0].caption == "caption of c"
    assert ds.shards == ["a_shard", "b_shard"]


def test_missing_caption_is_listed(folder):
    ds = scan(folder)
    assert ds.missing_captions == [folder / "a_shard" / "d.txt"]
    assert [i.caption for i in ds.items if i.stem == "d"] == [None]


def test_shard_selection(folder):
    assert [i.stem for i in scan(folder, shards=["b_shard"]).items] == ["a2", "z1"]
    with pytest.raises(FileNotFoundError, match="nope"):
        scan(folder, shards=["nope"])


def test_corrupt_image_error_names_file_and_fix(folder):
    bad = folder / "b_shard" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(BadImageError) as err:
        scan(folder)
    assert str(bad) in str(err.value) and "on_bad_image: skip" in str(err.value)


def test_corrupt_image_is_listed_when_skipping(folder):
    bad = folder / "b_shard" / "broken.png"
    bad.write_bytes(b"garbage")
    ds = scan(folder, on_bad_image="skip")
    assert [p for p, _ in ds.skipped] == [bad]
    assert "broken" not in [i.stem for i in ds.items]
    assert len(ds.items) == 5


def test_bad_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="image root not found"):
        scan(tmp_path / "missing")
    (tmp_path / "empty" / "s").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no readable images"):
        scan(tmp_path / "empty")
    with pytest.raises(ValueError, match="on_bad_image"):
        scan(tmp_path / "empty", on_bad_image="ignore")
