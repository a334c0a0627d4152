"""A checkpoint without a hub revision is named by the digest of its files (conngeo.resume), so that a
folder retrained in place is never taken for the old one: its finished vectors are extracted again, and a
connector variant trained on the old base refuses the new one."""

import hashlib
import os
import shutil
import sys

import pytest
import yaml
from safetensors.torch import load_file

from conftest import Stages, tiny_project
from conngeo.resume import folder_digest
from conngeo.families import adapter_class
from conngeo.families.variant import ConnectorVariant
from models_helpers import toy_tokenizer


def test_digest_of_a_hand_worked_folder(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "w.bin").write_bytes(b"x")
    (tmp_path / "a" / "sub" / "c.json").write_bytes(b"{}")
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    want = sha(f"sub/c.json\0{sha(b'{}')}\nw.bin\0{sha(b'x')}\n".encode())[:16]
    assert folder_digest(tmp_path / "a") == want


def test_digest_follows_names_and_contents_not_place_or_time(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.bin").write_bytes(b"weights")
    for copy in ("same", "edited", "renamed"):
        shutil.copytree(tmp_path / "a", tmp_path / copy)
    os.utime(tmp_path / "same" / "w.bin", (0, 0))
    (tmp_path / "edited" / "w.bin").write_bytes(b"weighs")
    (tmp_path / "renamed" / "w.bin").rename(tmp_path / "renamed" / "v.bin")
    digest = {name: folder_digest(tmp_path / name) for name in ("a", "same", "edited", "renamed")}
    assert digest["a"] == digest["same"]
    assert len(set(digest.values())) == 3
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        folder_digest(tmp_path / "missing")


def retrain_in_place(folder, family="llava", seed=1):
    cls = adapter_class(family)
    shutil.rmtree(folder)
    cls.tiny(toy_tokenizer(cls.special_tokens), 48, seed=seed).save(folder)


def test_a_checkpoint_retrained_in_place_is_extracted_again(tmp_path):
    params = tiny_project(tmp_path, "llava", "llava", images_per_shard=4, batch_size=4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    stages = Stages(tmp_path)
    try:
        assert "8 encoded now" in stages("extract", "--model", "llava")
        before = load_file(tmp_path / "data/vectors/llava/shard000/post.safetensors")["vectors"]
        assert "0 encoded now" in stages("extract", "--model", "llava")  # the same checkpoint: kept
        retrain_in_place(tmp_path / "models" / "llava")
        assert "8 encoded now" in stages("extract", "--model", "llava")
        after = load_file(tmp_path / "data/vectors/llava/shard000/post.safetensors")["vectors"]
        assert not before.equal(after)
        stages("verify", "vectors", "--model", "llava")
    finally:
        sys.path.remove(str(tmp_path / "stages"))


def test_a_variant_refuses_a_base_retrained_since(tmp_path):
    base_folder = tmp_path / "llava"
    cls = adapter_class("llava")
    cls.tiny(toy_tokenizer(cls.special_tokens), 48, seed=0).save(base_folder)
    base = cls.load(base_folder)
    ConnectorVariant.from_base(base, "linear", base_source=str(base_folder)).save(tmp_path / "linear")
    ConnectorVariant.load(tmp_path / "linear")  # the base it was trained on
    retrain_in_place(base_folder)
    with pytest.raises(ValueError, match=r"has changed since.*dvc repro train_connector@linear"):
        ConnectorVariant.load(tmp_path / "linear")
