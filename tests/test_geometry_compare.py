"""compare_spaces / image_spectra / dataset_spectra: the geometry stage's numbers, against direct per-pair computations."""

import torch

from conngeo.geometry import knor_chance
from conngeo.geometry.compare import compare_spaces, dataset_spectra, image_spectra


def brute_knor(x, y, k):
    """Python-set KNOR on full distance matrices (independent of the blocked kNN)."""
    def nbrs(z):
        d = torch.cdist(z.double(), z.double())
        d.fill_diagonal_(float("inf"))
        return [set(row.argsort()[:k].tolist()) for row in d]
    a, b = nbrs(x), nbrs(y)
    return [len(p & q) / k for p, q in zip(a, b)]


def test_compare_spaces_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(60, 8, generator=g)
    post = pre @ torch.randn(8, 5, generator=g) + 0.3 * torch.randn(60, 5, generator=g)
    ref = torch.randn(60, 4, generator=g)
    per_image, summary = compare_spaces({"pre": pre, "post": post, "ref": ref},
                                        [("pre", "post"), ("post", "ref")], ks=[5, 100])
    assert summary["ks"] == [5, 59]  # clipped to N-1
    for k in (5, 59):
        expected = brute_knor(pre, post, k)
        assert torch.allclose(per_image[f"knor_pre_post@{k}"], torch.tensor(expected, dtype=torch.float64))
        assert abs(summary["pairs"]["pre_post"][f"knor@{k}"] - sum(expected) / 60) < 1e-12
        assert summary["pairs"]["post_ref"][f"chance@{k}"] == knor_chance(k, 60)
    assert summary["pairs"]["pre_post"]["knor@59"] == 1.0  # everyone is everyone's neighbour
    assert summary["pairs"]["pre_post"]["knor@5"] > summary["pairs"]["post_ref"]["knor@5"]
    assert 0 < summary["pairs"]["pre_post"]["cka"] <= 1


def test_spectra_hand_case():
    eye = [torch.eye(4), torch.eye(4)]
    rank1 = [torch.ones(3, 4), 2 * torch.ones(5, 4)]
    per_image = image_spectra({"pre": eye, "post": rank1}, top_k=1)
    summary = dataset_spectra({"pre": torch.eye(4), "post": torch.ones(4, 4)}, top_k=1)
    assert torch.allclose(per_image["erank_pre"], torch.tensor([4.0, 4.0], dtype=torch.float64))
    assert torch.allclose(per_image["erank_post"], torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert torch.allclose(per_image["energy@1_pre"], torch.tensor([0.25, 0.25], dtype=torch.float64))
    assert abs(summary["erank_pre_dataset"] - 4) < 1e-9 and abs(summary["energy@1_post_dataset"] - 1) < 1e-9
