"""Effective rank, top-k energy and pooling against hand-worked cases and numpy."""

import math

import numpy as np
import pytest
import torch

from conngeo.geometry import effective_rank, pool, singular_values, spectra_per_image, top_k_energy


def numpy_erank(x):
    s = np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("n", [1, 3, 17])
def test_erank_identity_is_n(n):
    assert effective_rank(torch.eye(n)).item() == pytest.approx(n, rel=1e-12)


def test_erank_rank_one_is_one():
    x = np.outer(np.arange(1, 6), [2.0, -1.0, 0.5, 3.0])  # exact zeros beyond s_1 come out ~1e-16
    assert effective_rank(x).item() == pytest.approx(1.0, abs=1e-12)


def test_erank_hand_case_and_centering():
    # rows [2, 1], [2, -1]: X^T X = diag(8, 2), s = (2 sqrt2, sqrt2), p = (2/3, 1/3)
    x = torch.tensor([[2.0, 1.0], [2.0, -1.0]])
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert effective_rank(x).item() == pytest.approx(math.exp(h), rel=1e-12)
    # centred, the rows are [0, 1], [0, -1]: rank 1
    assert effective_rank(x, center=True).item() == pytest.approx(1.0, rel=1e-12)


def test_erank_matches_numpy():
    x = np.random.default_rng(0).standard_normal((40, 12)) @ np.diag(np.geomspace(1, 1e-3, 12))
    assert effective_rank(x).item() == pytest.approx(numpy_erank(x), rel=1e-10)
    xc = x - x.mean(0)
    assert effective_rank(x, center=True).item() == pytest.approx(numpy_erank(xc), rel=1e-10)
    assert effective_rank(x.astype(np.float32)).item() == pytest.approx(numpy_erank(x), rel=1e-4)


def test_top_k_energy_hand_case():
    x = torch.diag(torch.tensor([3.0, 2.0, 1.0]))  # s^2 = 9, 4, 1
    assert top_k_energy(x, 1).item() == pytest.approx(9 / 14)
    assert top_k_energy(x, 2).item() == pytest.approx(13 / 14)
    assert top_k_energy(x, 5).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k >= 1"):
        top_k_energy(x, 0)


def test_singular_values_descending_float64():
    s = singular_values(torch.diag(torch.tensor([1.0, 3.0, 2.0])))
    assert s.dtype == torch.float64 and s.tolist() == pytest.approx([3.0, 2.0, 1.0])


def test_no_spectrum_errors():
    with pytest.raises(ValueError, match="img.pt: no spectrum: it is all zeros"):
        effective_rank(torch.zeros(4, 3), name="img.pt")
    with pytest.raises(ValueError, match="rows are equal"):
        effective_rank(torch.full((5, 3), 0.1), center=True)
    with pytest.raises(ValueError, match="rows are equal"):
        effective_rank(torch.randn(1, 8), center=True)  # a single token
    assert effective_rank(torch.randn(1, 8)).item() == pytest.approx(1.0)


def test_spectra_per_image_matches_single_matrix_functions():
    g = torch.Generator().manual_seed(1)
    mats = [torch.randn(t, 6, generator=g) for t in (1, 4, 9, 4)]
    out = spectra_per_image(mats, ks=(1, 3))
    assert sorted(out) == ["energy@1", "energy@3", "erank"]
    for i, m in enumerate(mats):
        assert out["erank"][i].item() == pytest.approx(numpy_erank(m.numpy()), rel=1e-6)
        assert out["energy@3"][i] == top_k_energy(m, 3)
        assert out["energy@1"][i] == top_k_energy(m, 1)
    bad = mats + [torch.full((3, 6), float("nan"))]
    with pytest.raises(ValueError, match=r"shard0/post: image 4: 3 of 3 vectors contain NaN or inf \(rows \[0, 1, 2\]\)"):
        spectra_per_image(bad, name="shard0/post")


# --- pooling ---------------------------------------------------------------------------------


def test_pool_methods_against_loops():
    rng = np.random.default_rng(2)
    mats = [rng.standard_normal((t, 5)).astype(np.float32) for t in (3, 1, 7)]
    np.testing.assert_allclose(pool(mats).numpy(), [[m[:, j].sum() / len(m) for j in range(5)] for m in mats], rtol=1e-6)
    np.testing.assert_array_equal(pool(mats, "max").numpy(), [[max(m[:, j]) for j in range(5)] for m in mats])
    np.testing.assert_array_equal(pool(mats, "first").numpy(), [m[0] for m in mats])
    assert pool(mats).dtype == torch.float32


def test_pool_flatten():
    mats = [torch.arange(6.0).view(3, 2) + 10 * i for i in range(4)]
    out = pool(mats, "flatten")
    assert out.shape == (4, 6) and out[1].tolist() == [10.0, 11, 12, 13, 14, 15]
    with pytest.raises(ValueError, match=r"same token count for every image, got counts \[2, 3\]"):
        pool(mats + [torch.zeros(2, 2)], "flatten")


def test_pool_dtypes():
    assert pool([torch.ones(2, 3, dtype=torch.bfloat16)]).dtype == torch.float32
    assert pool([torch.ones(2, 3, dtype=torch.float64)]).dtype == torch.float64
    assert pool([torch.ones(2, 3, dtype=torch.float64), torch.ones(2, 3)]).dtype == torch.float32


def test_pool_errors():
    with pytest.raises(ValueError, match="no images"):
        pool([])
    with pytest.raises(ValueError, match="unknown pooling"):
        pool([torch.ones(2, 2)], "median")
    with pytest.raises(ValueError, match=r"post: image 1: empty input"):
        pool([torch.ones(2, 2), torch.ones(0, 2)], name="post")
    with pytest.raises(ValueError, match=r"widths differ .*\[2, 3\]"):
        pool([torch.ones(2, 2), torch.ones(2, 3)])
    with pytest.raises(ValueError, match=r"pre: image 0: 1 of 2 vectors contain NaN or inf"):
        pool([torch.tensor([[1.0, float("inf")], [0.0, 0.0]])], name="pre")
