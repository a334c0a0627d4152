"""Qwen2.5-VL and Qwen3.5 adapters on tiny random models of the real transformers classes.

Every check compares the adapter with what the model computes by itself (get_image_features, its
own generation from pixels, its own loss), not with the adapter's own functions.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.vision_utils import get_vision_window_index

from conngeo.families import adapter_class, families
from conngeo.families.qwen2_5_vl import IMAGE_PAD, raster_order
from models_helpers import IMAGE_SIZE, toy_images, toy_tokenizer

FAMILIES = ["qwen2.5vl", "qwen3.5"]
GRID, PRE_TOKENS, POST_TOKENS = (1, 6, 6), 36, 9  # 48 px, patch 8, 2x2 merge


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny(family, seed=0):
    cls = adapter_class(family)
    return cls.tiny(toy_tokenizer(cls.special_tokens), IMAGE_SIZE, seed=seed)


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request):
    return tiny(request.param)


@pytest.fixture(scope="module")
def images():
    return toy_images(3)[0]


def without_pixels(inputs):
    return {k: v for k, v in inputs.items() if k != "pixel_values"}


def supplied(post, adapter):
    return {"image": BaseModelOutputWithPooling(pooler_output=tuple(p.to(adapter.dtype) for p in post))}


def test_registered():
    known = families()
    assert known["qwen2.5vl"].__name__ == "Qwen2_5_VLAdapter"
    assert known["qwen3.5"].__name__ == "Qwen3_5Adapter"
    assert all(known[f].trains_vision_encoder for f in FAMILIES)


def test_tiny_size_and_token_counts(adapter, images):
    n_params = sum(p.numel() for p in adapter.model.parameters())
    assert 0.5e6 <= n_params <= 3e6
    bigger = images[0].resize((64, 64))
    grid = adapter.processor.image_processor(images=[images[0], bigger], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [list(GRID)] * 2  # 48 px kept, 64 px brought to the same ~48^2 area
    pre, post = adapter.encode(images)
    assert [p.shape for p in pre] == [(PRE_TOKENS, adapter.model.config.vision_config.hidden_size)] * 3
    assert [p.shape for p in post] == [(POST_TOKENS, adapter.model.config.text_config.hidden_size)] * 3
    inputs = adapter.prepare(images)
    assert (inputs["input_ids"] == adapter.model.config.image_token_id).sum(1).tolist() == [POST_TOKENS] * 3


def test_encode_matches_model_internals(adapter, images):
    pre, post = adapter.encode(images)
    inputs = adapter.prepare(images)
    with torch.no_grad():
        out = adapter.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                     return_dict=True)
    for mine, model_post in zip(post, out.pooler_output):  # the LM's own per-image E_post
        assert torch.equal(mine, model_post.float())
    # the merger's input is last_hidden_state, in the vision tower's merge-unit order
    inner = out.last_hidden_state.float()
    units = inner.view(-1, 4, inner.shape[-1])
    vision = adapter.model.model.visual
    if hasattr(vision, "window_size"):
        window_index, _ = get_vision_window_index(inputs["image_grid_thw"], 2, vision.window_size, vision.patch_size)
        assert not torch.equal(window_index, torch.arange(len(window_index)))  # windows really reorder here
        units = units[torch.argsort(window_index)]
    assert torch.equal(torch.cat(pre), units.reshape(inner.shape))


def test_pre_rows_follow_the_processors_patches(adapter, images):
    """With identity vision blocks (and no position table) E_pre row k must be patch k's embedding."""
    model = tiny(adapter.family)
    vision = model.model.model.visual
    for block in vision.blocks:
        block.forward = lambda hidden_states, **kwargs: hidden_states
    if hasattr(vision, "pos_embed"):
        torch.nn.init.zeros_(vision.pos_embed.weight)
    pre, _ = model.encode(images)
    pixels = model.prepare(images)["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(pre), vision.patch_embed(pixels), rtol=0, atol=1e-6)


def test_connect_reproduces_post(adapter, images):
    pre, post = adapter.encode(images)
    for mine, theirs in zip(adapter.connect(pre), post):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    # and per image alone, with other images' units not in the batch: a GEMM of other height may block
    # (and round) differently, so float32's own tolerance rather than the same-batch one above
    torch.testing.assert_close(adapter.connect(pre[1:2])[0], post[1])


def test_raster_order_on_a_known_image(adapter):
    """An image whose 8x8 patch at (row, col) has grey level 7 * (6 * row + col)."""
    index = np.arange(36).reshape(6, 6)
    grey = np.kron(7 * index, np.ones((8, 8))).astype(np.uint8)
    image = Image.fromarray(np.stack([grey] * 3, axis=-1))
    processor = adapter.processor.image_processor
    vision = processor(images=[image], return_tensors="pt")
    red = vision["pixel_values"][:, 0]  # first value of each patch: (t=0, channel red, y=0, x=0)
    level = torch.round((red * processor.image_std[0] + processor.image_mean[0]) * 255 / 7).long()
    grid = vision["image_grid_thw"][0]
    assert level[adapter.raster_order(grid)].tolist() == list(range(36))
    assert torch.equal(adapter.raster_order(grid), raster_order(grid, 2))
    # merge unit j holds the 2x2 patches of merged cell (j // 3, j % 3): E_post is raster already
    for j, unit in enumerate(level.view(9, 4).tolist()):
        r, c = divmod(j, 3)
        assert unit == [12 * r + 2 * c, 12 * r + 2 * c + 1, 12 * r + 6 + 2 * c, 12 * r + 6 + 2 * c + 1]
    assert adapter.raster_order(grid, merged=True).tolist() == list(range(9))
    # two frames of a 2x4 grid: each frame's two merge units interleave into rows
    assert raster_order((2, 2, 4), 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]


def test_prepare_labels_line_up(adapter, images):
    captions = ["two red apples on a blue plate", "an egg on a pink plate",
                "three green lemons and a brown cookie on a gray plate"]
    batch = adapter.prepare(images, captions)
    tok = adapter.tokenizer
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    for i, caption in enumerate(captions):
        marked = labels[i] != -100
        assert torch.equal(labels[i][marked], ids[i][marked])
        assert tok.decode(labels[i][marked][:-1]) == caption
        assert labels[i][marked][-1].item() == tok.eos_token_id
        assert marked.nonzero().max().item() == ids.shape[1] - 1  # the caption ends the row: left padding
        # <|vision_start|>, the image pads, <|vision_end|>, the caption, eos
        assert mask[i].sum().item() == 2 + POST_TOKENS + len(caption.split()) + 1
        assert not mask[i][: ids.shape[1] - mask[i].sum()].any()
    assert torch.equal(batch["mm_token_type_ids"].bool(), ids == tok.convert_tokens_to_ids(IMAGE_PAD))
    # the model shifts labels itself: its loss is next-token CE on the marked tokens
    with torch.no_grad():
        out = adapter.model(**batch)
    logits, target = out.logits[:, :-1].float(), labels[:, 1:]
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    torch.testing.assert_close(out.loss, manual)


def test_zeroed_post_changes_the_output(adapter, images):
    _, post = adapter.encode(images)
    inputs = adapter.prepare(images)
    with torch.no_grad():
        native = adapter.model(**inputs).logits[:, -1]
        same = adapter.model(**without_pixels(inputs), mm_encoder_outputs=supplied(post, adapter)).logits[:, -1]
        zeroed = adapter.model(**without_pixels(inputs),
                               mm_encoder_outputs=supplied([torch.zeros_like(p) for p in post], adapter)).logits[:, -1]
    assert torch.equal(native, same)  # the supplied E_post is what the LM reads ...
    assert (zeroed - native).abs().amax(-1).min() > 1e-2  # ... so zeroing it moves every image's logits
    assert len(set(adapter.generate(images, max_new_tokens=8))) > 1
    blind = adapter.generate(images, post=[torch.zeros_like(p) for p in post], max_new_tokens=8)
    assert len(set(blind)) == 1  # without image content the three prompts are identical


def test_save_load_round_trip(adapter, images, tmp_path):
    folder = tmp_path / "model"
    adapter.save(folder)
    loaded = type(adapter).load(str(folder))
    assert type(loaded.tokenizer) is type(adapter.tokenizer)
    caption = "three green lemons and a brown cookie on a gray plate"
    assert loaded.tokenizer(caption).input_ids == adapter.tokenizer(caption).input_ids
    for a, b in zip(loaded.encode(images)[1], adapter.encode(images)[1]):
        assert torch.equal(a, b)
    assert loaded.generate(images, max_new_tokens=8) == adapter.generate(images, max_new_tokens=8)
    assert loaded.processor.chat_template is None  # tiny models: the vision tokens alone, no prompt


def test_chat_template_prompt_expands_one_image_pad(adapter):
    """Real checkpoints: the chat template's single <|image_pad|> becomes one pad per E_post token."""
    template = ("{% for m in messages %}{{ m.role }} {% for c in m.content %}{% if c.type == 'image' %}"
                "<|vision_start|> <|image_pad|> <|vision_end|> {% else %}{{ c.text }}{% endif %}"
                "{% endfor %}{% endfor %}{% if add_generation_prompt %} assistant{% endif %}")
    tok = adapter.tokenizer
    original = adapter.processor.chat_template, adapter.prompt
    adapter.processor.chat_template, adapter.prompt = template, "a plate"
    try:
        ids = adapter.prompt_ids(POST_TOKENS)
    finally:
        adapter.processor.chat_template, adapter.prompt = original
    words = ["user", "<|vision_start|>", *[IMAGE_PAD] * POST_TOKENS, "<|vision_end|>", "a", "plate", "assistant"]
    assert ids == tok.convert_tokens_to_ids(words)


def test_mixed_image_sizes_in_one_batch(adapter, images):
    """Different grids in one batch: per-image splits, window order and left padding still line up."""
    wide = images[1].resize((64, 32))
    batch = [images[0], wide]
    pre, post = adapter.encode(batch)
    grid = adapter.prepare(batch)["image_grid_thw"]
    assert grid[0].tolist() != grid[1].tolist()
    assert [p.shape[0] for p in pre] == grid.prod(-1).tolist()
    assert [p.shape[0] for p in post] == (grid.prod(-1) // 4).tolist()
    alone_pre, alone_post = adapter.encode([wide])
    torch.testing.assert_close(pre[1], alone_pre[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(post[1], alone_post[0], rtol=1e-5, atol=1e-5)
    assert adapter.generate(batch, post=post, max_new_tokens=8) == adapter.generate(batch, max_new_tokens=8)
