"""Exact kNN against independent computations: sklearn brute force and plain Python loops."""

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from conngeo.geometry import block_rows, clip_k, knn


def brute_knn(x: np.ndarray, k: int) -> list[list[int]]:
    """Exact neighbours by Python loops in float64: sort by (distance, index), self excluded."""
    x = np.asarray(x, dtype=np.float64)
    out = []
    for i in range(len(x)):
        d = [(float(((x[i] - x[j]) ** 2).sum()), j) for j in range(len(x)) if j != i]
        out.append([j for _, j in sorted(d)[:k]])
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_l2_matches_sklearn_brute(dtype):
    x = np.random.default_rng(0).standard_normal((300, 24)).astype(dtype)
    dist, idx = knn(x, 12, return_distances=True)
    ref_dist, ref_idx = NearestNeighbors(n_neighbors=12, algorithm="brute").fit(x).kneighbors()
    assert idx.dtype == torch.long and idx.shape == (300, 12)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_allclose(dist.numpy(), ref_dist, rtol=1e-5, atol=1e-5)


def test_cosine_matches_sklearn_brute():
    x = np.random.default_rng(1).standard_normal((250, 16))
    dist, idx = knn(torch.from_numpy(x), 9, metric="cosine", return_distances=True)
    ref_dist, ref_idx = NearestNeighbors(n_neighbors=9, algorithm="brute", metric="cosine").fit(x).kneighbors()
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_allclose(dist.numpy(), ref_dist, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_block_bytes", [1, 7 * 60 * 8, 2**30])
def test_ties_break_to_smaller_index_like_brute_force(dtype, max_block_bytes):
    # Points on a small integer grid with repeats: many exactly equal distances, including at the
    # k-th place and exact duplicates (distance 0). The order must be by (distance, index).
    x = torch.from_numpy(np.random.default_rng(2).integers(0, 3, size=(60, 3))).to(dtype) + 10
    assert knn(x, 7, max_block_bytes=max_block_bytes).tolist() == brute_knn(x.numpy(), 7)


def test_tie_hand_case():
    # Point 0 at the origin has four neighbours at distance 1 (indices 1..4) and one further away.
    x = torch.tensor([[0.0, 0], [1, 0], [0, 1], [-1, 0], [0, -1], [2, 2]])
    dist, idx = knn(x, 3, return_distances=True)
    assert idx[0].tolist() == [1, 2, 3]
    assert dist[0].tolist() == [1.0, 1.0, 1.0]
    assert idx[5].tolist() == [1, 2, 0]  # 1 and 2 both at sqrt(5): smaller index first


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocked_identical_to_unblocked(dtype):
    x = torch.randn(301, 20, generator=torch.Generator().manual_seed(3), dtype=dtype)
    whole_d, whole_i = knn(x, 15, return_distances=True, max_block_bytes=2**30)  # one block
    for budget in [1, 301 * 8 * 5, 301 * 8 * 64, 301 * 8 * 300]:  # 1 row, 5.., 64.., 300.. rows
        d, i = knn(x, 15, return_distances=True, max_block_bytes=budget)
        assert torch.equal(i, whole_i), budget
        torch.testing.assert_close(d, whole_d)
    assert torch.equal(knn(x, 15, metric="cosine", max_block_bytes=1), knn(x, 15, metric="cosine"))


def test_block_rows_respects_budget():
    assert block_rows(1000, 4, 1000 * 4 * 37) == 37
    assert block_rows(1000, 4, 1000 * 4 * 37 + 3999) == 37  # rounds down, never over budget
    assert block_rows(1000, 8, 10) == 1  # at least one row
    assert block_rows(1000, 4, 2**40) == 1000  # never more rows than points


def test_far_from_origin_float32_stays_exact():
    # Offset 1e4 in float32: without moving the data near the origin first, |a|^2 ~ 1e9 and
    # |a|^2 + |b|^2 - 2a.b would lose the O(1) distances to rounding.
    x = (np.random.default_rng(4).standard_normal((200, 16)) + 1e4).astype(np.float32)
    ref = NearestNeighbors(n_neighbors=5, algorithm="brute").fit(x.astype(np.float64)).kneighbors()[1]
    np.testing.assert_array_equal(knn(x, 5).numpy(), ref)


def test_k_equal_n_minus_1_and_prefix_property():
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    full = knn(x, 29)
    assert (full.sort(dim=1).values == torch.tensor([[j for j in range(30) if j != i] for i in range(30)])).all()
    assert torch.equal(knn(x, 6), full[:, :6])  # N(i, 6) is the first 6 columns of N(i, 29)


@pytest.mark.parametrize("k", [0, 10, 11])
def test_k_out_of_range_errors(k):
    with pytest.raises(ValueError, match="clip_k"):
        knn(torch.randn(10, 3), k)


def test_clip_k():
    assert clip_k([10, 100, 1000], 200) == [10, 100, 199]
    assert clip_k([5, 3, 5], 50) == [3, 5]
    with pytest.raises(ValueError):
        clip_k([5], 1)
    with pytest.raises(ValueError):
        clip_k([0, 5], 100)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_error_names_the_file(bad):
    x = torch.randn(20, 4)
    x[7, 2] = bad
    with pytest.raises(ValueError, match=r"data/vectors/m/s0/pre\.safetensors.*rows \[7\].*Re-extract"):
        knn(x, 3, name="data/vectors/m/s0/pre.safetensors")


def test_empty_and_malformed_inputs():
    with pytest.raises(ValueError, match="pooled.safetensors: empty input"):
        knn(torch.empty(0, 8), 1, name="pooled.safetensors")
    with pytest.raises(ValueError, match="empty input"):
        knn(np.empty((5, 0)), 1)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        knn(torch.randn(10), 1)
    with pytest.raises(ValueError, match="unknown metric"):
        knn(torch.randn(10, 2), 1, metric="manhattan")
    with pytest.raises(TypeError):
        knn([[0.0, 1.0], [1.0, 0.0]], 1)


def test_cosine_zero_vector_errors():
    x = torch.randn(10, 3)
    x[4] = 0
    with pytest.raises(ValueError, match=r"v\.pt: cosine .*zero vectors \(rows \[4\]\)"):
        knn(x, 2, metric="cosine", name="v.pt")
    knn(x, 2)  # fine under L2


def test_tensor_that_requires_grad_is_measured_not_differentiated():
    x = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    assert torch.equal(knn(x, 4), knn(x.detach().numpy(), 4))
