"""Neighbourhood overlap, CKA and Procrustes against Python sets, numpy and scipy."""

import math

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.stats import ortho_group

from conngeo.geometry import (
    jaccard_per_image,
    knn,
    knn_jaccard,
    knor,
    knor_chance,
    knor_per_image,
    linear_cka,
    mutual_knn,
    mutual_knn_per_image,
    procrustes_residual,
)


def rand(n, d, seed):
    return np.random.default_rng(seed).standard_normal((n, d))


# --- neighbourhood overlap -------------------------------------------------------------------

# Hand case, N = 4, k = 2.
P = [[1, 2], [0, 2], [0, 1], [0, 1]]
Q = [[2, 3], [0, 3], [0, 1], [1, 2]]
# shared per image: {2}, {0}, {0,1}, {1}      -> KNOR 1/2, 1/2, 1, 1/2
# Jaccard s/(2k-s): 1/3, 1/3, 1, 1/3
# mutual in P: 0:{1,2} 1:{0,2} 2:{0,1} 3:{}  (3 is in nobody's list)
# mutual in Q: 0:{2} (3 does not list 0) 1:{3} 2:{0} (1 does not list 2) 3:{1}
# both: 0:{2} 1:{} 2:{0} 3:{}                 -> 1/2, 0, 1/2, 0


def test_hand_case():
    assert knor_per_image(P, Q).tolist() == [0.5, 0.5, 1.0, 0.5]
    assert knor(P, Q).item() == pytest.approx(0.625)
    assert jaccard_per_image(P, Q).tolist() == pytest.approx([1 / 3, 1 / 3, 1.0, 1 / 3])
    assert mutual_knn_per_image(P, Q).tolist() == [0.5, 0.0, 0.5, 0.0]
    assert mutual_knn(P, Q).item() == pytest.approx(0.25)
    assert knor_per_image(P, Q, k=1).tolist() == [0.0, 1.0, 1.0, 0.0]  # first column only


def sets_reference(p, q, k):
    """KNOR, Jaccard and mutual-kNN per image with Python sets."""
    n = len(p)
    sp, sq = [set(r[:k]) for r in p], [set(r[:k]) for r in q]
    mp = [{j for j in sp[i] if i in sp[j]} for i in range(n)]
    mq = [{j for j in sq[i] if i in sq[j]} for i in range(n)]
    kn = [len(sp[i] & sq[i]) / k for i in range(n)]
    ja = [len(sp[i] & sq[i]) / len(sp[i] | sq[i]) for i in range(n)]
    mu = [len(mp[i] & mq[i]) / k for i in range(n)]
    return kn, ja, mu


@pytest.mark.parametrize("k", [1, 4, 15])
def test_matches_python_sets(k):
    # Correlated spaces, so every level of overlap occurs.
    x = rand(120, 8, 0)
    y = x + 0.7 * rand(120, 8, 1)
    p, q = knn(x, 15), knn(y, 15)
    kn, ja, mu = sets_reference(p.tolist(), q.tolist(), k)
    assert 0 < np.mean(mu) < np.mean(kn) < 1
    np.testing.assert_allclose(knor_per_image(p, q, k).numpy(), kn)
    np.testing.assert_allclose(jaccard_per_image(p, q, k).numpy(), ja)
    np.testing.assert_allclose(mutual_knn_per_image(p, q, k).numpy(), mu)
    assert knor(p, q, k).item() == pytest.approx(np.mean(kn))
    assert knn_jaccard(p, q, k).item() == pytest.approx(np.mean(ja))


def test_identical_spaces():
    p = knn(rand(100, 5, 2), 10)
    assert knor(p, p).item() == 1.0
    assert knn_jaccard(p, p).item() == 1.0
    # mutual_knn of a space with itself is the share of neighbour relations that are mutual
    _, _, mu = sets_reference(p.tolist(), p.tolist(), 10)
    assert mutual_knn(p, p).item() == pytest.approx(np.mean(mu))
    assert mutual_knn(p, p).item() < 1


def test_rotation_scale_translation_keeps_l2_neighbours():
    x = rand(200, 12, 3)
    rot = ortho_group.rvs(12, random_state=4)
    y = 3.7 * x @ rot + rand(1, 12, 5) * 10
    assert knor(knn(x, 10), knn(y, 10)).item() == 1.0
    assert knor(knn(x, 10, metric="cosine"), knn(x @ rot * 2.0, 10, metric="cosine")).item() == 1.0


def test_independent_spaces_near_chance():
    n, k = 400, 10
    value = knor(knn(rand(n, 16, 6), k), knn(rand(n, 16, 7), k)).item()
    assert knor_chance(k, n) == 10 / 399
    assert abs(value - knor_chance(k, n)) < 0.01  # std of the mean is ~0.0025 here


def test_overlap_input_errors():
    p = knn(rand(20, 3, 8), 5)
    with pytest.raises(ValueError, match="same images"):
        knor(p, p[:10])
    with pytest.raises(ValueError, match="k=6"):
        knor(p, p, k=6)
    with pytest.raises(ValueError, match="twice"):
        knor(torch.tensor([[1, 1], [0, 2], [0, 1]]), torch.tensor([[1, 2], [0, 2], [0, 1]]))
    with pytest.raises(ValueError, match="integer"):
        knor(p.double(), p)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        knor(torch.tensor([[1, 2], [0, 2], [0, 3]]), torch.tensor([[1, 2], [0, 2], [0, 1]]))


# --- linear CKA ------------------------------------------------------------------------------


def numpy_cka(x, y):
    """Kornblith et al. 2019, eq. (1)-(3): HSIC with Gram matrices and the centring matrix H."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


@pytest.mark.parametrize("n,dx,dy", [(80, 5, 9), (30, 40, 7)])  # feature form and Gram form
def test_cka_matches_numpy(n, dx, dy):
    x = rand(n, dx, 9) + 3
    y = np.tanh(x[:, :1] * rand(1, dy, 10)) + 0.5 * rand(n, dy, 11)
    value = linear_cka(x, y).item()
    assert 0.05 < value < 0.95
    assert value == pytest.approx(numpy_cka(x, y), rel=1e-10)
    assert linear_cka(x.astype(np.float32), y.astype(np.float32)).item() == pytest.approx(value, rel=1e-5)


def test_cka_invariances():
    x, y = rand(60, 6, 12), rand(60, 4, 13)
    y[:, 0] += x[:, 0]
    base = linear_cka(x, y).item()
    x2 = 0.01 * x @ ortho_group.rvs(6, random_state=14) - 5.0
    assert linear_cka(x2, y).item() == pytest.approx(base, rel=1e-10)
    assert linear_cka(x, x2).item() == pytest.approx(1.0, rel=1e-12)
    # not invariant to a non-isotropic scaling
    assert linear_cka(x * np.arange(1, 7), y).item() != pytest.approx(base, rel=1e-3)


def test_cka_errors():
    with pytest.raises(ValueError, match="a.pt: all 10 vectors are identical"):
        linear_cka(np.ones((10, 3)), rand(10, 3, 0), names=("a.pt", "b.pt"))
    with pytest.raises(ValueError, match="same images"):
        linear_cka(rand(10, 3, 0), rand(11, 3, 0))
    x = rand(10, 3, 0)
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match="a.pt: 1 of 10 vectors contain NaN"):
        linear_cka(x, rand(10, 3, 0), names=("a.pt", "b.pt"))


# --- Procrustes ------------------------------------------------------------------------------


def scipy_procrustes(x, y):
    """Independent recipe: centre, Frobenius-normalise, zero-pad the narrower matrix to the wider
    width, solve for R with scipy's orthogonal_procrustes and measure ||X R - Y||_F^2 directly."""
    x, y = x - x.mean(0), y - y.mean(0)
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    d = max(x.shape[1], y.shape[1])
    x, y = (np.hstack([a, np.zeros((len(a), d - a.shape[1]))]) for a in (x, y))
    r, _ = orthogonal_procrustes(x, y)
    np.testing.assert_allclose(r @ r.T, np.eye(d), atol=1e-10)
    return np.linalg.norm(x @ r - y) ** 2


def test_procrustes_zero_for_similar_copy():
    x = rand(50, 8, 15)
    y = 4.0 * x @ ortho_group.rvs(8, random_state=16) + 2.0
    assert procrustes_residual(x, y).item() == pytest.approx(0.0, abs=1e-12)
    y[:, 0] *= -1  # a reflection is orthogonal too
    assert procrustes_residual(x, y).item() == pytest.approx(0.0, abs=1e-12)


def test_procrustes_zero_for_copy_embedded_in_wider_space():
    # y is a scaled, shifted, rotated copy of x (width 3) living in 5 dims: with zero padding
    # there is an orthogonal R mapping x onto it exactly, whichever side is the wider one.
    x = rand(40, 3, 20)
    y = 0.3 * np.hstack([x, np.zeros((40, 2))]) @ ortho_group.rvs(5, random_state=21) - 7.0
    assert procrustes_residual(x, y).item() == pytest.approx(0.0, abs=1e-10)
    assert procrustes_residual(y, x).item() == pytest.approx(0.0, abs=1e-10)
    assert scipy_procrustes(x, y) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("n,dx,dy", [(60, 6, 6), (60, 10, 4), (60, 3, 7), (12, 30, 20), (8, 5, 40)])
def test_procrustes_matches_scipy(n, dx, dy):
    x = rand(n, dx, 17)
    y = np.tanh(x[:, :1] + x[:, -1:]) * rand(1, dy, 18) + 0.3 * rand(n, dy, 19)
    value = procrustes_residual(x, y).item()
    assert 0.05 < value < 2
    assert value == pytest.approx(scipy_procrustes(x, y), rel=1e-9)
    # float32 input is computed in float64 too
    assert procrustes_residual(x.astype(np.float32), y).item() == pytest.approx(value, rel=1e-5)


@pytest.mark.parametrize("n,dx,dy", [(60, 6, 6), (60, 10, 4), (12, 30, 20)])
def test_procrustes_symmetric(n, dx, dy):
    x, y = rand(n, dx, 22), rand(n, dy, 23)
    y[:, 0] += 2 * x[:, 0]
    assert procrustes_residual(x, y).item() == pytest.approx(procrustes_residual(y, x).item(), rel=1e-12)


@pytest.mark.parametrize("n,dx,db,scale,exact,pca", [
    (100, 4, 4, 1.0, 0.6337812408, 0.9585914277),
    (200, 6, 6, 2.0, 1.0819580379, 1.7302432609),
])
def test_procrustes_rotated_block_no_pca_bias(n, dx, db, scale, exact, pca):
    # Y = [X, B] Q with B an unrelated block and Q orthogonal. The old recipe (each space cut to its
    # top min(d_x, d_y) principal axes before the formula) gave `pca`; the exact residual is `exact`.
    x, b = rand(n, dx, 1), scale * rand(n, db, 2)
    y = np.hstack([x, b]) @ ortho_group.rvs(dx + db, random_state=3)
    value = procrustes_residual(x, y).item()
    assert value == pytest.approx(scipy_procrustes(x, y), rel=1e-9)
    assert value == pytest.approx(exact, rel=1e-8)
    assert abs(value - pca) > 0.3


def test_procrustes_hand_case_orthogonal_block():
    # Hand-worked: if the centred block B is orthogonal to the centred X (X^T B = 0) and ||B|| = ||X||,
    # then X^T Y = [X^T X, 0] Q / (||X|| sqrt(2) ||X||), whose nuclear norm is tr(X^T X) / (sqrt(2) ||X||^2)
    # = 1 / sqrt(2), so the residual is 2 - sqrt(2).
    x = rand(30, 3, 24)
    x -= x.mean(0)
    b = rand(30, 2, 25)
    b -= b.mean(0)
    b -= x @ np.linalg.lstsq(x, b, rcond=None)[0]
    b *= np.linalg.norm(x) / np.linalg.norm(b)
    y = np.hstack([x, b]) @ ortho_group.rvs(5, random_state=26)
    assert procrustes_residual(x, y).item() == pytest.approx(2 - np.sqrt(2), rel=1e-12)
    assert scipy_procrustes(x, y) == pytest.approx(2 - np.sqrt(2), rel=1e-10)


def test_procrustes_errors():
    with pytest.raises(ValueError, match="a.pt: all 10 vectors are identical"):
        procrustes_residual(np.ones((10, 3)), rand(10, 5, 0), names=("a.pt", "b.pt"))
    with pytest.raises(ValueError, match="same images"):
        procrustes_residual(rand(10, 3, 0), rand(11, 3, 0))


def test_local_distortion_against_a_loop_and_similarity_transforms():
    from conngeo.geometry import knn
    from conngeo.geometry.overlap import local_distortion_per_image

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = torch.randn(40, 9, generator=g, dtype=torch.float64)
    nbrs = knn(x, 5)
    got = local_distortion_per_image(x, y, nbrs)
    for i in range(40):
        ratios = [math.log((y[i] - y[j]).norm().item() / (x[i] - x[j]).norm().item()) for j in nbrs[i].tolist()]
        mean = sum(ratios) / len(ratios)
        assert got[i].item() == pytest.approx(math.sqrt(sum((r - mean) ** 2 for r in ratios) / len(ratios)))
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    similar = 3.0 * x @ q + 7.0  # rotated, scaled, shifted
    assert local_distortion_per_image(x, similar, nbrs).abs().max().item() < 1e-12
    embedded = torch.cat([x @ q, torch.zeros(40, 3, dtype=torch.float64)], dim=1)  # into a wider space
    assert local_distortion_per_image(x, embedded, nbrs, k=3).abs().max().item() < 1e-12
    assert got.min().item() > 0.05 and got.mean().item() > 0.2  # an unrelated space stretches unevenly
