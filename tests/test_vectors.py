import pytest
import torch

from conngeo.data.vectors import is_complete, read_shard, read_vectors, write_shard


def shard_data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    stems = [f"s{i}" for i in range(n)]
    pre = [torch.randn(6 + i, 5, generator=g) for i in range(n)]  # varying token counts
    post = [torch.randn(3, 7, generator=g) for _ in range(n)]
    return stems, pre, post


def test_round_trip_and_bytes(tmp_path):
    stems, pre, post = shard_data()
    write_shard(tmp_path / "a", stems, pre, post)
    write_shard(tmp_path / "b", stems, pre, post)
    shard = read_shard(tmp_path / "a")
    assert shard.stems == stems
    assert all(torch.equal(x, y) for x, y in zip(shard.pre + shard.post, pre + post))
    for name in ("pre.safetensors", "post.safetensors", "index.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "index.csv").read_text().splitlines()[:2] == ["stem,pre_tokens,post_tokens", "s0,6,3"]


def test_concatenates_shards_in_order(tmp_path):
    for k in range(2):
        stems, pre, post = shard_data(3, seed=k)
        write_shard(tmp_path / f"s{k}", [f"{k}_{s}" for s in stems], pre, post)
    both = read_vectors([tmp_path / "s1", tmp_path / "s0"])
    assert both.stems[:1] == ["1_s0"] and len(both.pre) == 6


def test_incomplete_and_inconsistent_shards(tmp_path):
    stems, pre, post = shard_data()
    write_shard(tmp_path / "a", stems, pre, post)
    (tmp_path / "a" / "index.csv").write_text("stem,pre_tokens,post_tokens\ns0,6,3\n")
    with pytest.raises(ValueError, match="pre.safetensors"):
        read_shard(tmp_path / "a")
    (tmp_path / "a" / "index.csv").unlink()
    assert not is_complete(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="incomplete vector shard"):
        read_shard(tmp_path / "a")
    with pytest.raises(ValueError, match="stems"):
        write_shard(tmp_path / "c", stems[:2], pre, post)


def test_embeddings_round_trip_and_errors(tmp_path):
    from conngeo.data.vectors import read_embeddings, write_embeddings

    emb = torch.arange(12.0).reshape(4, 3)
    write_embeddings(tmp_path / "a", ["w", "x", "y", "z"], emb[:4])
    write_embeddings(tmp_path / "b", ["q"], emb[:1] * 2)
    stems, both = read_embeddings([tmp_path / "a", tmp_path / "b"])
    assert stems == ["w", "x", "y", "z", "q"] and torch.equal(both, torch.cat([emb, emb[:1] * 2]))
    (tmp_path / "b" / "index.csv").write_text("stem\nq\nr\n")
    with pytest.raises(ValueError, match="2 stems"):
        read_embeddings([tmp_path / "b"])
    with pytest.raises(FileNotFoundError, match="incomplete embeddings"):
        read_embeddings([tmp_path / "nope"])
    with pytest.raises(ValueError, match="3 stems"):
        write_embeddings(tmp_path / "c", ["a", "b", "c"], emb)
