"""LLaVA adapter on a tiny random LlavaForConditionalGeneration: the hook's E_pre/E_post against
what the model computes itself, replay of generation from E_post, training labels, save/load."""

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from conngeo.families import adapter_class
from conngeo.families.llava import IMAGE, LlavaAdapter
from models_helpers import IMAGE_SIZE, toy_images, toy_tokenizer


@pytest.fixture(scope="module")
def adapter():
    return LlavaAdapter.tiny(toy_tokenizer(LlavaAdapter.special_tokens), IMAGE_SIZE, seed=0)


@pytest.fixture(scope="module")
def toy():
    return toy_images(3)


def pixels(adapter, images):
    return adapter.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


def first_step_logits(adapter, images, post):
    """Next-token logits after the prompt, the image placeholders filled with `post`."""
    inputs = adapter.prepare(images)
    inputs.pop("pixel_values")
    outputs = {"image": BaseModelOutputWithPooling(pooler_output=tuple(post))}
    with torch.no_grad():
        return adapter.model(**inputs, mm_encoder_outputs=outputs).logits[:, -1]


def test_registered_and_tiny(adapter):
    assert adapter_class("llava") is LlavaAdapter
    n = sum(p.numel() for p in adapter.model.parameters())
    assert 0.5e6 < n < 3e6
    assert adapter.connector() is adapter.model.model.multi_modal_projector


def test_encode_matches_model_internals(adapter, toy):
    images, _ = toy
    pre, post = adapter.encode(images)
    assert len(pre) == len(post) == 3
    assert pre[0].shape == (36, 128) and post[0].shape == (36, 128)  # 48 px / patch 8 = 6x6, CLS dropped
    with torch.no_grad():
        x = pixels(adapter, images)
        hidden = adapter.model.model.vision_tower(x, output_hidden_states=True).hidden_states[-2][:, 1:]
        features = adapter.model.model.get_image_features(pixel_values=x).pooler_output
    torch.testing.assert_close(torch.stack(pre), hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.stack(post), torch.stack(list(features)), rtol=0, atol=1e-6)


def test_connect_reproduces_post(adapter, toy):
    pre, post = adapter.encode(toy[0])
    for got, want in zip(adapter.connect(pre), post):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    one = adapter.connect(pre[:1] + [pre[1][:10]])  # different token counts go one by one
    torch.testing.assert_close(one[1], post[1][:10], rtol=0, atol=1e-6)


def test_prepare_labels_cover_caption_and_eos(adapter, toy):
    images, captions = toy
    captions = [captions[0], "a red apple on a blue plate", "two eggs"]
    batch = adapter.prepare(images, captions)
    tok = adapter.tokenizer
    image_id = tok.convert_tokens_to_ids(IMAGE)
    for ids, mask, labels, caption in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], captions):
        answer = tok(caption, add_special_tokens=False).input_ids + [tok.eos_token_id]
        marked = labels != -100
        assert marked.sum() == len(answer)
        assert labels[marked].tolist() == answer == ids[-len(answer):].tolist()
        assert marked[-len(answer):].all()  # the caption ends the row: left padding
        assert (ids[mask.bool()] == image_id).sum() == 36
        assert mask.tolist() == sorted(mask.tolist())  # zeros (padding) only on the left
    assert (batch["attention_mask"] == 0).any()  # captions of different lengths were padded


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


def test_prompt_goes_through_the_chat_template(toy):
    tok = toy_tokenizer(LlavaAdapter.special_tokens)
    adapter = LlavaAdapter.tiny(tok, IMAGE_SIZE)
    ids = adapter.prepare(toy[0])["input_ids"][0].tolist()
    assert ids == [tok.convert_tokens_to_ids(IMAGE)] * 36  # the tiny zoo: no template, no prompt
    with pytest.raises(ValueError, match="chat template"):  # never a silent fall-back to a template-less prompt
        LlavaAdapter(adapter.model, adapter.processor, prompt="plate")
    adapter.processor.chat_template = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                                       "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
                                       "{% endfor %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}")
    adapter = LlavaAdapter(adapter.model, adapter.processor, prompt="plate")
    assert adapter.prompt_text() == "USER: <image>\nplate ASSISTANT:"


def test_vision_encoder_is_copied_in(toy):
    images, _ = toy
    torch.manual_seed(1)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                            num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=12)).eval()
    adapter = LlavaAdapter.tiny(toy_tokenizer(LlavaAdapter.special_tokens), IMAGE_SIZE, vision_encoder=clip)
    pre, _ = adapter.encode(images)
    with torch.no_grad():
        want = clip(pixels(adapter, images), output_hidden_states=True).hidden_states[-2][:, 1:]
    assert pre[0].shape == (16, 64)
    torch.testing.assert_close(torch.stack(pre), want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="48 px"):
        LlavaAdapter.tiny(toy_tokenizer(LlavaAdapter.special_tokens), 32, vision_encoder=clip)
