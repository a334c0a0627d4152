"""conngeo.captions: generation from supplied / reconstructed / perturbed E_post on tiny random models
(checked against the model's own generation from pixels), and the perturbations against hand-worked
cases (which tokens, how many, the rank of the result, nesting across levels)."""

import pytest
import torch
from PIL import Image

from conngeo.captions import (PerturbedPosts, captions_from_recon, generate_captions, low_rank, mask_order, mask_tokens,
                              masked_count, perturb, perturbation_size, read_table, relative_change,
                              removed_rank, write_table)
from conngeo.families import adapter_class
from models_helpers import IMAGE_SIZE, toy_images, toy_tokenizer

MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def toy():
    images, _ = toy_images(5)
    return images, [f"study_000_{i:05d}" for i in range(5)]


def tiny(family):
    cls = adapter_class(family)
    return cls.tiny(toy_tokenizer(cls.special_tokens), IMAGE_SIZE, seed=0)


@pytest.fixture(scope="module", params=["llava", "idefics2", "qwen2.5vl", "qwen3.5"])
def adapter(request):
    return tiny(request.param)


# -- generation --------------------------------------------------------------------------------------

def test_batched_captions_equal_native_generation(adapter, toy):
    images, _ = toy
    native = [adapter.generate([im], max_new_tokens=MAX_NEW_TOKENS)[0] for im in images]
    assert any(native)
    _, post = adapter.encode(images)
    assert generate_captions(adapter, images, post, batch_size=2, max_new_tokens=MAX_NEW_TOKENS) == native
    assert generate_captions(adapter, images, None, batch_size=3, max_new_tokens=MAX_NEW_TOKENS) == native


def test_identity_perturbation_reproduces_captions_and_strong_one_changes_them(adapter, toy):
    images, stems = toy
    native = adapter.generate(images, max_new_tokens=MAX_NEW_TOKENS)
    _, post = adapter.encode(images)
    for mode in ("mask", "lowrank"):
        same = [perturb(p, mode, 0.0, s) for p, s in zip(post, stems)]
        assert generate_captions(adapter, images, same, batch_size=2, max_new_tokens=MAX_NEW_TOKENS) == native
    zeroed = [perturb(p, "mask", 1.0, s) for p, s in zip(post, stems)]
    assert all(torch.count_nonzero(z) == 0 for z in zeroed)
    assert generate_captions(adapter, images, zeroed, max_new_tokens=MAX_NEW_TOKENS) != native


def test_recon_captions_go_through_the_connector(adapter, toy):
    images, _ = toy
    native = adapter.generate(images, max_new_tokens=MAX_NEW_TOKENS)
    pre, _ = adapter.encode(images)
    # the true E_pre as a "perfect reconstruction" must replay the model's own captions
    assert captions_from_recon(adapter, images, pre, batch_size=2, max_new_tokens=MAX_NEW_TOKENS) == native
    shifted = [p + 3.0 for p in pre]
    direct = adapter.generate(images, post=adapter.connect(shifted), max_new_tokens=MAX_NEW_TOKENS)
    assert captions_from_recon(adapter, images, shifted, batch_size=2, max_new_tokens=MAX_NEW_TOKENS) == direct


def test_images_as_paths_and_length_checks(tmp_path, toy):
    adapter = tiny("llava")
    images, _ = toy
    paths = []
    for i, im in enumerate(images[:2]):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    from_paths = generate_captions(adapter, paths, None, max_new_tokens=MAX_NEW_TOKENS)
    loaded = [Image.open(p).convert("RGB") for p in paths]
    assert from_paths == generate_captions(adapter, loaded, None, max_new_tokens=MAX_NEW_TOKENS)
    with pytest.raises(ValueError, match="pair up"):
        generate_captions(adapter, images[:2], [torch.zeros(36, 128)], max_new_tokens=2)


# -- masking -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("level,tokens,expected", [
    (0.0, 9, 0), (0.01, 9, 1), (0.05, 9, 1),   # any level > 0 masks at least one token
    (0.5, 9, 5),                                 # 4.5 rounds half up
    (0.15, 10, 2),                               # 1.5 half up, though 0.15 * 10 == 1.4999999999999998 in floats
    (0.1, 36, 4), (0.25, 36, 9), (0.5, 36, 18), (1.0, 9, 9), (0.01, 576, 6),
])
def test_masked_count_hand_worked(level, tokens, expected):
    assert masked_count(level, tokens) == expected


def test_mask_zeros_replaces_exactly_the_first_tokens_of_the_order():
    post = torch.arange(1, 31, dtype=torch.float32).reshape(10, 3)
    out = mask_tokens(post, 0.25, "img_a", seed=0)  # round(2.5) = 3 tokens
    order = mask_order("img_a", 10, seed=0)
    assert sorted(order.tolist()) == list(range(10))
    changed = (out != post).any(dim=1).nonzero().flatten().tolist()
    assert sorted(changed) == sorted(order[:3].tolist())
    assert torch.count_nonzero(out[order[:3]]) == 0
    assert torch.equal(out[order[3:]], post[order[3:]])
    assert torch.equal(post, torch.arange(1, 31, dtype=torch.float32).reshape(10, 3))  # input untouched


def test_mask_mean_fill_is_the_images_mean_token():
    post = torch.tensor([[0.0, 4.0], [2.0, 0.0], [4.0, 2.0], [6.0, 6.0]])  # mean token (3, 3)
    out = mask_tokens(post, 0.5, "img_b", seed=1, fill="mean")
    rows = mask_order("img_b", 4, seed=1)[:2]
    assert torch.equal(out[rows], torch.tensor([[3.0, 3.0], [3.0, 3.0]]))
    with pytest.raises(ValueError, match="fill"):
        mask_tokens(post, 0.5, "img_b", fill="noise")


def test_mask_is_deterministic_per_image_and_nested_across_levels():
    assert torch.equal(mask_order("img_c", 50, seed=0), mask_order("img_c", 50, seed=0))
    orders = {tuple(mask_order(stem, 50, seed).tolist()) for stem in ("img_c", "img_d") for seed in (0, 1)}
    assert len(orders) == 4  # the choice depends on both the image and the seed
    post = torch.randn(50, 8, generator=torch.Generator().manual_seed(0)) + 10  # no zero entries
    masked_sets = []
    for level in (0.01, 0.05, 0.1, 0.25, 0.5, 1.0):
        out = mask_tokens(post, level, "img_c", seed=0)
        masked_sets.append(set((out == 0).all(dim=1).nonzero().flatten().tolist()))
        assert len(masked_sets[-1]) == masked_count(level, 50)
    assert all(a < b for a, b in zip(masked_sets, masked_sets[1:]))  # strictly nested


# -- low rank ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("level,shape,expected", [
    (0.0, (9, 128), 0), (0.01, (9, 128), 1), (0.5, (9, 128), 5),  # K = 9
    (0.25, (36, 128), 9), (0.5, (36, 20), 10),                      # K = min(tokens, d)
    (1.0, (9, 128), 8),                                              # rank 1 always kept
    (0.5, (1, 128), 0),                                              # a rank-1 matrix cannot lose rank
])
def test_removed_rank_hand_worked(level, shape, expected):
    assert removed_rank(level, *shape) == expected


def test_low_rank_of_a_diagonal_matrix_drops_the_smallest_entries():
    post = torch.zeros(5, 7)
    post[range(5), range(5)] = torch.tensor([3.0, 5.0, 1.0, 4.0, 2.0])
    out = low_rank(post, 0.4)  # K = 5, removes round(2.0) = 2: the singular values 1 and 2
    expected = post.clone()
    expected[2, 2] = expected[4, 4] = 0
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_low_rank_has_the_promised_rank_and_eckart_young_error():
    post = torch.randn(9, 128, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(post.double())
    for level in (0.01, 0.05, 0.1, 0.25, 0.5, 1.0):
        out = low_rank(post, level)
        removed = removed_rank(level, 9, 128)
        assert out.dtype == post.dtype and out.shape == post.shape
        assert torch.linalg.matrix_rank(out, rtol=1e-4).item() == 9 - removed  # float32 result
        want = float((s[9 - removed:] ** 2).sum() / (s ** 2).sum())
        assert relative_change(post, out) == pytest.approx(want, rel=1e-5)


def test_identity_level_returns_the_input_exactly():
    post = torch.randn(12, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    for mode in ("mask", "lowrank"):
        out = perturb(post, mode, 0, "img_e")
        assert torch.equal(out, post) and out.dtype == post.dtype and out.data_ptr() != post.data_ptr()
        assert perturbation_size(post, mode, 0) == 0


def test_larger_levels_perturb_more_in_both_modes():
    post = torch.randn(36, 64, generator=torch.Generator().manual_seed(2))
    levels = (0.01, 0.05, 0.1, 0.25, 0.5)
    for mode in ("mask", "lowrank"):
        sizes = [perturbation_size(post, mode, lv) for lv in levels]
        changes = [relative_change(post, perturb(post, mode, lv, "img_f")) for lv in levels]
        assert sizes == sorted(sizes) and sizes[0] >= 1
        assert all(a < b for a, b in zip(changes, changes[1:])), (mode, changes)


def test_lazy_perturbed_posts_equal_eager_perturbation():
    posts = [torch.randn(9, 16, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    stems = [f"img_{i}" for i in range(5)]
    for mode in ("mask", "lowrank"):
        view = PerturbedPosts(posts, stems, mode, 0.25, seed=2, fill="mean")
        eager = [perturb(p, mode, 0.25, s, seed=2, fill="mean") for p, s in zip(posts, stems)]
        assert len(view) == 5 and view.relative_changes == [None] * 5
        got = view[0:2] + view[2:5]
        assert all(torch.equal(a, b) for a, b in zip(got, eager))
        assert torch.equal(view[-1], eager[-1])
        assert view.relative_changes == [relative_change(p, q) for p, q in zip(posts, eager)]


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        perturb(torch.ones(3, 3), "mask", 1.5, "x")
    with pytest.raises(ValueError, match="mode"):
        perturb(torch.ones(3, 3), "blur", 0.1, "x")


# -- caption tables ----------------------------------------------------------------------------------

def test_table_keeps_empty_captions_and_punctuation(tmp_path):
    columns = {"stem": ["a", "b", "c"], "post": ["", 'a "quoted", caption', "two\nlines"]}
    write_table(tmp_path / "captions.csv", columns)
    assert read_table(tmp_path / "captions.csv", required=("stem", "post")) == columns
    with pytest.raises(ValueError, match="recon"):
        read_table(tmp_path / "captions.csv", required=("recon",))
