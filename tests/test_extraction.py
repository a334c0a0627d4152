"""Extraction on a tiny random model: shards hold exactly what the adapter computes, and a run
killed mid-way resumes to byte-identical files."""

import pytest
import torch

from conngeo.data import toyworld
from conngeo.data.images import load_image, scan
from conngeo.data.vectors import read_shard
from conngeo.extraction import assign, extract, verify
from conngeo.families import adapter_class
from models_helpers import DiesAfter, Interrupted, toy_tokenizer

SPEC = {"family": "qwen2.5vl", "source": "test", "revision": None, "dtype": "float32", "prompt": ""}


@pytest.fixture(scope="module")
def adapter():
    cls = adapter_class("qwen2.5vl")
    return cls.tiny(toy_tokenizer(cls.special_tokens), 48, seed=0)


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    toyworld.generate(root, split="study", seed=0, shards=2, images_per_shard=7, size=48)
    return scan(root).items


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shards_hold_what_the_adapter_computes(adapter, items, tmp_path):
    summary = extract(adapter, items, tmp_path, SPEC, batch_size=3, save_every=4)
    assert summary["shards"] == {"shard000": "done", "shard001": "done"} and summary["computed"] == len(items)
    shard = read_shard(tmp_path / "shard001")
    assert shard.stems == [it.stem for it in items if it.shard == "shard001"]
    images = [load_image(it.path) for it in items if it.shard == "shard001"]
    pre, post = [], []
    for batch in (images[0:3], images[3:4], images[4:7]):  # the same batches: results are exact
        p, q = adapter.encode(batch)
        pre, post = pre + p, post + q
    assert all(torch.equal(a, b) for a, b in zip(shard.pre, pre))
    assert all(torch.equal(a, b) for a, b in zip(shard.post, post))
    assert not (tmp_path / "shard001" / "parts").exists()
    assert extract(adapter, items, tmp_path, SPEC, batch_size=3, save_every=4)["shards"]["shard000"] == "skipped"


def test_interrupted_run_resumes_to_identical_bytes(adapter, items, tmp_path):
    extract(adapter, items, tmp_path / "clean", SPEC, batch_size=3, save_every=4)
    with pytest.raises(Interrupted):  # chunks of 4 and 3 images; batches 3+1, then 3: dies in the 2nd chunk
        extract(DiesAfter(adapter, 2), items, tmp_path / "resumed", SPEC, batch_size=3, save_every=4)
    assert (tmp_path / "resumed" / "shard000" / "parts" / "part00000.safetensors").is_file()
    assert not (tmp_path / "resumed" / "shard000" / "index.csv").exists()  # nothing looks complete
    counting = DiesAfter(adapter, 10**6)
    summary = extract(counting, items, tmp_path / "resumed", SPEC, batch_size=3, save_every=4)
    assert summary["shards"] == {"shard000": "resumed", "shard001": "done"}
    assert 10**6 - counting.n == 1 + 3  # only the missing chunk of shard000, then shard001
    assert summary["computed"] == 3 + 7  # its 3 images and shard001's 7: the 4 of the finished part are kept
    assert files(tmp_path / "resumed") == files(tmp_path / "clean")


def test_other_model_spec_is_not_reused(adapter, items, tmp_path):
    extract(adapter, items, tmp_path, SPEC, batch_size=4, save_every=4)
    other = {**SPEC, "revision": "abc"}
    assert set(extract(adapter, items, tmp_path, other, batch_size=4, save_every=4)["shards"].values()) == {"done"}


def test_workers_split_without_overlap_and_join_to_identical_bytes(adapter, items, tmp_path):
    shares = [assign(items, 3, w, 3) for w in range(3)]  # 7 images a shard in chunks of 3: 3 chunks each
    for shard in ("shard000", "shard001"):
        chunks = [c for share in shares for c in share[shard]]
        assert sorted(chunks) == [0, 1, 2]  # every chunk exactly once
    extract(adapter, items, tmp_path / "clean", SPEC, batch_size=2, save_every=3)
    for w in range(3):
        summary = extract(adapter, items, tmp_path / "split", SPEC, batch_size=2, save_every=3, worker=w, workers=3)
        assert set(summary["shards"].values()) == {"parts"}
    assert any("partial file" in p for p in verify(items, tmp_path / "split", SPEC))
    nothing = DiesAfter(adapter, 0)  # joining computes nothing
    assert extract(nothing, items, tmp_path / "split", SPEC, batch_size=2, save_every=3)["shards"] == \
        {"shard000": "resumed", "shard001": "resumed"}
    assert verify(items, tmp_path / "split", SPEC) == []
    assert files(tmp_path / "split") == files(tmp_path / "clean")


def test_vectors_stored_in_the_asked_dtype_and_verified(adapter, items, tmp_path):
    """bf16 storage (what the real checkpoints compute in): the shard holds the adapter's values rounded to
    bf16, the reader upcasts them to float32, and verify checks the stored dtype."""
    from conngeo.data.vectors import VectorReader

    spec = {**SPEC, "store_dtype": "bfloat16"}
    extract(adapter, items, tmp_path, spec, batch_size=3, save_every=4, store_dtype=torch.bfloat16)
    reader = VectorReader([tmp_path / "shard000"])
    assert reader.dtype == {"pre": "BF16", "post": "BF16"}
    pre, _ = adapter.encode([load_image(items[0].path)])
    got = reader.read("pre", [0])
    assert got.dtype == torch.float32 and torch.equal(got[0], pre[0].bfloat16().float())
    assert verify(items, tmp_path, spec) == []
    assert any("stored as BF16, expected float32" in p for p in verify(items, tmp_path, {**spec, "store_dtype": None}))


def test_unreadable_images_stop_with_the_file_or_are_skipped_and_listed(adapter, items, tmp_path):
    import shutil
    from conngeo.data.images import BadImageError

    root = tmp_path / "world"
    shutil.copytree(items[0].path.parents[1], root)
    (root / "shard000" / items[1].path.name).write_bytes(b"not an image")
    folder = scan(root)
    with pytest.raises(BadImageError, match=items[1].path.name):
        extract(adapter, folder.items, tmp_path / "out", SPEC, batch_size=3, save_every=4)
    summary = extract(adapter, folder.items, tmp_path / "skip", SPEC, batch_size=3, save_every=4, on_bad_image="skip")
    assert [stem for stem, _ in summary["skipped"]] == [items[1].stem]
    assert items[1].stem not in read_shard(tmp_path / "skip" / "shard000").stems
    assert verify(folder.items, tmp_path / "skip", SPEC) == []  # skipped and listed, not missing


def test_vectors_of_another_image_processor_are_not_reused(adapter, items, tmp_path):
    """Where torchvision is installed transformers loads the torchvision backend's image processor, which
    resizes differently: parts and shards made with one backend are recomputed, never mixed, under the other."""
    pil = {**SPEC, "processor": {"class": "Qwen2VLImageProcessorPil", "backend": "pil"}}
    torchvision = {**SPEC, "processor": {"class": "Qwen2VLImageProcessor", "backend": "torchvision"}}
    with pytest.raises(Interrupted):  # leaves shard000's first part, made on a torchvision machine
        extract(DiesAfter(adapter, 2), items, tmp_path, torchvision, batch_size=3, save_every=4)
    assert (tmp_path / "shard000" / "parts" / "part00000.safetensors").is_file()
    summary = extract(adapter, items, tmp_path, pil, batch_size=3, save_every=4)
    assert summary["computed"] == len(items) and summary["shards"] == {"shard000": "done", "shard001": "done"}
    assert verify(items, tmp_path, pil) == []
    assert any("fingerprint differs" in p for p in verify(items, tmp_path, torchvision))
    assert set(extract(adapter, items, tmp_path, torchvision, batch_size=3, save_every=4)["shards"].values()) == {"done"}


def test_processor_info_is_what_load_gives(tmp_path):
    """Adapter.processor_info reads the processor alone, and names the class and backend that loading gives."""
    from conngeo.families.base import image_processor_info

    cls = adapter_class("llava")
    cls.tiny(toy_tokenizer(cls.special_tokens), 48, seed=0).save(tmp_path / "llava")
    loaded = cls.load(tmp_path / "llava")
    info = cls.processor_info(tmp_path / "llava")
    assert info == image_processor_info(loaded.processor) == {"class": type(loaded.processor.image_processor).__name__,
                                                               "backend": loaded.processor.image_processor.backend}
    assert info["backend"] in ("pil", "torchvision")
