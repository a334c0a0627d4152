import csv
import hashlib

import numpy as np
import pytest
from PIL import Image

from conngeo.data import toyworld


def digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def make(root, seed=0, split="study", shards=2, per_shard=12, size=32):
    toyworld.generate(root, split=split, seed=seed, shards=shards, images_per_shard=per_shard, size=size)
    return root


def test_same_seed_gives_byte_identical_files(tmp_path):
    a, b = make(tmp_path / "a"), make(tmp_path / "b")
    assert digest(a) == digest(b)
    assert len(digest(a)) == 2 * 12 * 2 + 2  # png + txt per image, attributes.csv, vocab.txt


def test_other_seed_and_split_give_other_images(tmp_path):
    a = digest(make(tmp_path / "a"))
    b = digest(make(tmp_path / "b", seed=1))
    t = digest(make(tmp_path / "t", split="train"))
    pngs = lambda d: {v for k, v in d.items() if k.endswith(".png")}  # noqa: E731
    assert not pngs(a) & pngs(b)
    assert not pngs(a) & pngs(t)  # the zoo never trains on a study image


def test_captions_agree_with_attributes(tmp_path):
    root = make(tmp_path / "w", per_shard=40)
    rows = list(csv.DictReader(open(root / "attributes.csv")))
    assert len(rows) == 80
    vocab = set((root / "vocab.txt").read_text().split())
    for row in rows:
        text = (root / row["shard"] / f"{row['stem']}.txt").read_text().strip()
        assert text == row["caption"]
        assert set(text.split()) <= vocab
        parsed = toyworld.parse_caption(text)
        expected = [(row["kind1"], row["colour1"], int(row["count1"]))]
        if row["kind2"]:
            expected.append((row["kind2"], row["colour2"], int(row["count2"])))
        assert parsed == {"foods": expected, "plate": row["plate_colour"]}
        for kind, colour, count in expected:
            assert colour in toyworld.FOODS[kind][2] and 1 <= count <= 3


def test_content_covariates_from_the_captions(tmp_path):
    """What each toy image shows, read back from its own caption (toyworld.parse_caption)."""
    from conngeo.data.images import scan
    from conngeo.data.targets import content_covariates

    root = make(tmp_path / "w", per_shard=30)
    items = scan(root).items
    got = content_covariates(root, items)
    assert got["stem"] == [it.stem for it in items]
    for i, it in enumerate(items):
        parsed = toyworld.parse_caption(it.references[0])
        assert got["food_count"][i] == sum(count for _, _, count in parsed["foods"])
        assert got["kinds"][i] == len(parsed["foods"]) and got["plate"][i] == parsed["plate"]
        assert got["reference_words"][i] == len(it.references[0].split())
    assert set(got["food_count"]) <= set(range(1, 7)) and len(set(got["food_count"])) > 3


def test_hand_written_caption():
    scene = toyworld.Scene([("apple", "red", 2), ("banana", "yellow", 1)], "blue", 0.5, 0.5, 0.4, 1.0)
    assert toyworld.caption(scene) == "two red apples and a yellow banana on a blue plate"
    scene = toyworld.Scene([("egg", "white", 1)], "pink", 0.5, 0.5, 0.4, 1.0)
    assert toyworld.caption(scene) == "a white egg on a pink plate"
    scene = toyworld.Scene([("carrot", "orange", 1)], "gray", 0.5, 0.5, 0.4, 1.0)
    assert toyworld.caption(scene) == "an orange carrot on a gray plate"
    with pytest.raises(ValueError):
        toyworld.parse_caption("two red apples")


def test_images_have_variety_and_size(tmp_path):
    root = make(tmp_path / "w", shards=1, per_shard=30, size=48)
    scenes = set()
    for png in sorted(root.rglob("*.png")):
        img = np.asarray(Image.open(png))
        assert img.shape == (48, 48, 3)
        assert img.reshape(-1, 3).std(0).max() > 10  # never constant-coloured
    for row in csv.DictReader(open(root / "attributes.csv")):
        scenes.add((row["kind1"], row["kind2"]))
        assert 0.4 < float(row["plate_half_side"]) < 0.5
    assert len(scenes) > 10  # many kinds and pairs appear


def test_caption_truth_hand_cases():
    ref = "two red apples and a yellow banana on a blue plate"
    assert all(toyworld.caption_truth(ref, ref).values())
    wrong_count = toyworld.caption_truth("three red apples and a yellow banana on a blue plate", ref)
    assert wrong_count == {"parses": True, "kinds": True, "counts": False, "colours": True, "exact": False}
    wrong_plate = toyworld.caption_truth("two red apples and a yellow banana on a pink plate", ref)
    assert wrong_plate["colours"] is False and wrong_plate["counts"] is True
    missing_kind = toyworld.caption_truth("two red apples on a blue plate", ref)
    assert not missing_kind["kinds"] and not missing_kind["counts"] and not missing_kind["colours"]
    assert not any(toyworld.caption_truth("apples apples", ref).values())
    assert not any(toyworld.caption_truth("", ref).values())
