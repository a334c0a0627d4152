"""Idefics2 adapter on a tiny random Idefics2ForConditionalGeneration: the hook's E_pre/E_post
against what the model computes itself (also for padded images), replay of generation from E_post,
training labels, the SigLIP encoder copy, save/load."""

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from conngeo.families import adapter_class, load_adapter
from conngeo.families.idefics2 import FAKE_IMAGE, IMAGE, Idefics2Adapter
from models_helpers import IMAGE_SIZE, toy_images, toy_tokenizer

LATENTS = 16


@pytest.fixture(scope="module")
def adapter():
    return Idefics2Adapter.tiny(toy_tokenizer(Idefics2Adapter.special_tokens), IMAGE_SIZE, seed=0, latents=LATENTS)


@pytest.fixture(scope="module")
def toy():
    return toy_images(3)


def vision_inputs(adapter, images):
    return adapter.processor.image_processor(images=[[im] for im in images], return_tensors="pt")


def first_step_logits(adapter, images, post):
    """Next-token logits after the prompt, the image placeholders filled with `post`."""
    inputs = adapter.prepare(images)
    for key in adapter.pixel_keys:
        inputs.pop(key)
    outputs = {"image": BaseModelOutputWithPooling(pooler_output=tuple(post))}
    with torch.no_grad():
        return adapter.model(**inputs, mm_encoder_outputs=outputs).logits[:, -1]


def test_registered_and_tiny(adapter):
    assert adapter_class("idefics2") is Idefics2Adapter
    n = sum(p.numel() for p in adapter.model.parameters())
    assert 0.5e6 < n < 3e6
    assert adapter.connector() is adapter.model.model.connector


def test_encode_matches_model_internals(adapter, toy):
    images, _ = toy
    pre, post = adapter.encode(images)
    assert len(pre) == len(post) == 3
    assert pre[0].shape == (36, 128) and post[0].shape == (LATENTS, 128)
    vision = vision_inputs(adapter, images)
    with torch.no_grad():
        hidden = adapter.model.model.vision_model(vision["pixel_values"][:, 0]).last_hidden_state
        features = adapter.model.model.get_image_features(vision["pixel_values"],
                                                          vision["pixel_attention_mask"]).pooler_output
    torch.testing.assert_close(torch.stack(pre), hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.stack(post), torch.stack(list(features)), rtol=0, atol=1e-6)


def test_latents_are_not_all_the_same_query(adapter, toy):
    _, post = adapter.encode(toy[0])
    assert torch.linalg.matrix_rank(post[0]) > LATENTS // 2  # ones-initialised latents would give rank 1


def test_padded_images_keep_only_their_own_patches(toy):
    """A wide image next to a square one is padded by the processor: E_pre holds its real patches
    only, equals the tower run on the image alone, and connect(E_pre) == E_post."""
    adapter = Idefics2Adapter.tiny(toy_tokenizer(Idefics2Adapter.special_tokens), IMAGE_SIZE, latents=LATENTS)
    adapter.processor.image_processor.size = {"shortest_edge": 16, "longest_edge": IMAGE_SIZE}
    square, _ = toy
    wide = square[1].resize((IMAGE_SIZE, IMAGE_SIZE // 2))
    pre, post = adapter.encode([square[0], wide])
    assert pre[0].shape[0] == 36 and pre[1].shape[0] == 18  # 6x6 and 3x6 patches
    alone = vision_inputs(adapter, [wide])
    assert alone["pixel_values"].shape[-2:] == (IMAGE_SIZE // 2, IMAGE_SIZE)
    with torch.no_grad():
        want = adapter.model.model.vision_model(alone["pixel_values"][:, 0]).last_hidden_state[0]
    torch.testing.assert_close(pre[1], want, rtol=0, atol=1e-5)
    for got, expected in zip(adapter.connect(pre), post):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert adapter.generate([square[0], wide], post=post, max_new_tokens=6) == \
        adapter.generate([square[0], wide], max_new_tokens=6)


def test_prepare_labels_cover_caption_and_eos(adapter, toy):
    images, captions = toy
    captions = [captions[0], "a red apple on a blue plate", "two eggs"]
    batch = adapter.prepare(images, captions)
    assert batch["pixel_values"].shape == (3, 1, 3, IMAGE_SIZE, IMAGE_SIZE)
    tok = adapter.tokenizer
    image_id, fake_id = tok.convert_tokens_to_ids(IMAGE), tok.convert_tokens_to_ids(FAKE_IMAGE)
    for ids, mask, labels, caption in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], captions):
        answer = tok(caption, add_special_tokens=False).input_ids + [tok.eos_token_id]
        marked = labels != -100
        assert marked.sum() == len(answer)
        assert labels[marked].tolist() == answer == ids[-len(answer):].tolist()
        assert marked[-len(answer):].all()  # the caption ends the row: left padding
        prompt = ids[mask.bool()][:-len(answer)].tolist()
        assert prompt == [fake_id] + [image_id] * LATENTS + [fake_id]
        assert mask.tolist() == sorted(mask.tolist())  # zeros (padding) only on the left
    assert (batch["attention_mask"] == 0).any()


def test_padding_leaves_each_rows_loss_unchanged(adapter, toy):
    images, captions = toy
    captions = [captions[0], "a red apple", "three white eggs and a lemon on a pink plate"]

    def row_losses(batch):
        with torch.no_grad():
            logits = adapter.model(**batch).logits
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")
        return loss.sum(1) / (batch["labels"][:, 1:] != -100).sum(1)

    together = row_losses(adapter.prepare(images, captions))
    alone = torch.cat([row_losses(adapter.prepare([im], [c])) for im, c in zip(images, captions)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_siglip_encoder_is_copied_exactly(toy):
    images, _ = toy
    torch.manual_seed(1)
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                                  num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=12)).eval()
    adapter = Idefics2Adapter.tiny(toy_tokenizer(Idefics2Adapter.special_tokens), IMAGE_SIZE, vision_encoder=siglip)
    pre, _ = adapter.encode(images)
    with torch.no_grad():
        want = siglip(vision_inputs(adapter, images)["pixel_values"][:, 0]).last_hidden_state
    assert pre[0].shape == (16, 64)
    torch.testing.assert_close(torch.stack(pre), want, rtol=0, atol=1e-5)
    again = Idefics2Adapter.tiny(toy_tokenizer(Idefics2Adapter.special_tokens), IMAGE_SIZE,
                                 vision_encoder=adapter.vision_encoder(), seed=3)  # an Idefics2 tower is taken as is
    torch.testing.assert_close(torch.stack(again.encode(images)[0]), want, rtol=0, atol=1e-5)


def test_clip_encoder_is_refused():
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8))
    with pytest.raises(TypeError, match="SiglipVisionModel"):
        Idefics2Adapter.tiny(toy_tokenizer(Idefics2Adapter.special_tokens), IMAGE_SIZE, vision_encoder=clip)


def test_save_load_round_trip(adapter, toy, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    images, _ = toy
    adapter.save(tmp_path / "idefics2")
    loaded = load_adapter("idefics2", str(tmp_path / "idefics2"))
    assert isinstance(loaded, Idefics2Adapter)
    assert loaded.tokenizer.convert_tokens_to_ids(IMAGE) in loaded.tokenizer.all_special_ids
    for got, want in zip(loaded.encode(images)[1], adapter.encode(images)[1]):
        assert torch.equal(got, want)
    assert loaded.generate(images, max_new_tokens=8) == adapter.generate(images, max_new_tokens=8)
