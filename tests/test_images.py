import pytest
from PIL import Image

from conngeo.data.images import BadImageError, check_images, decode, scan


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


def test_listing_opens_no_image_and_decoding_names_the_file_and_fix(folder, monkeypatch):
    bad = folder / "b_shard" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("scan opened an image"))
    ds = scan(folder)
    monkeypatch.undo()
    assert "broken" in [i.stem for i in ds.items]
    with pytest.raises(BadImageError) as err:
        decode(ds.items)
    assert str(bad) in str(err.value) and "on_bad_image: skip" in str(err.value)
    assert [p for p, _ in check_images(ds)] == [bad]


def test_corrupt_image_is_listed_when_skipping(folder):
    bad = folder / "b_shard" / "broken.png"
    bad.write_bytes(b"garbage")
    kept, images, skipped = decode(scan(folder).items, on_bad_image="skip")
    assert [p for p, _ in skipped] == [bad]
    assert "broken" not in [i.stem for i in kept] and len(kept) == len(images) == 5


def test_the_same_stem_in_two_shards_is_an_error_naming_both(folder):
    write_image(folder / "b_shard" / "c.png")
    with pytest.raises(ValueError, match="two images with the stem 'c'") as err:
        scan(folder)
    assert str(folder / "a_shard" / "c.png") in str(err.value) and str(folder / "b_shard" / "c.png") in str(err.value)


def test_bad_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="image root not found"):
        scan(tmp_path / "missing")
    (tmp_path / "empty" / "s").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        scan(tmp_path / "empty")
    with pytest.raises(ValueError, match="on_bad_image"):
        decode([], on_bad_image="ignore")
