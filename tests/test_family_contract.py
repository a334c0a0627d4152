"""The adapter contract, once over every registered family (conngeo.families.families()), on tiny random
models of the real transformers classes. What a stage relies on, whatever the family:

- the hook's E_post is what the model itself computes (its own get_image_features);
- connect(E_pre) reproduces E_post, so E_pre is the connector's input;
- generation from the unmodified E_post replays native generation token for token and logit for logit,
  the replay check catches E_post permuted within an image, and a zeroed E_post changes what the
  language model reads;
- token_layout describes the stored tokens (a correspondence into E_post, a raster permutation);
- save / load round trip offline; a missing checkpoint names the command that provides it.

Each family's own file keeps only its quirks (which hidden state E_pre is, token order, padding,
labels, frozen encoders).
"""

import inspect

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from conngeo.families import MissingCheckpointError, adapter_class, families, load_adapter
from conngeo.families.base import same_generation
from models_helpers import IMAGE_SIZE, toy_images, toy_tokenizer

FAMILIES = sorted(f for f in families() if f != "variant")  # a variant needs a base: tests/test_connectors.py


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request):
    cls = adapter_class(request.param)
    return cls.tiny(toy_tokenizer(cls.special_tokens), IMAGE_SIZE, seed=0)


@pytest.fixture(scope="module")
def images():
    return toy_images(3)[0]


def test_every_family_is_registered_under_its_name():
    assert {"llava", "idefics2", "qwen2.5vl", "qwen3.5"} <= set(FAMILIES)
    for name in FAMILIES:
        assert adapter_class(name).family == name


def test_hook_gives_what_the_model_computes(adapter, images):
    pre, post = adapter.encode(images)
    assert len(pre) == len(post) == len(images)
    inputs = adapter.prepare(images)
    wanted = inspect.signature(adapter.model.model.get_image_features).parameters
    with torch.no_grad():
        features = adapter.model.model.get_image_features(**{k: v for k, v in inputs.items() if k in wanted},
                                                          return_dict=True).pooler_output
    for mine, theirs in zip(post, features):
        torch.testing.assert_close(mine, theirs.to(mine.dtype), rtol=0, atol=1e-6)


def test_connect_reproduces_post(adapter, images):
    pre, post = adapter.encode(images)
    for got, want in zip(adapter.connect(pre), post):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_generation_from_unmodified_post_replays_native(adapter, images):
    _, post = adapter.encode(images)
    native = adapter.generate_ids(images, max_new_tokens=8, with_logits=True)
    assert (native.ids != adapter.tokenizer.pad_token_id).any()
    assert same_generation(adapter.generate_ids(images, post=post, max_new_tokens=8, with_logits=True), native)
    assert adapter.generate(images, post=post, max_new_tokens=8) == adapter.generate(images, max_new_tokens=8)
    # the model's own generate, from pixels and from the supplied E_post: the same token ids
    inputs = adapter.prepare(images)
    with torch.no_grad():
        ids = adapter.model.generate(**inputs, max_new_tokens=8, do_sample=False)
        for key in adapter.pixel_keys:
            inputs.pop(key, None)
        supplied = {"image": BaseModelOutputWithPooling(pooler_output=tuple(p.to(adapter.dtype) for p in post))}
        replay = adapter.model.generate(**inputs, max_new_tokens=8, do_sample=False, mm_encoder_outputs=supplied)
    assert torch.equal(ids, replay)


def test_replay_check_catches_e_post_permuted_within_an_image(adapter, images):
    """The replay check (ids and first-step logits) fails for E_post whose tokens are only reordered inside
    each image: the same vectors, the same words to decode into, at other positions."""
    _, post = adapter.encode(images)
    native = adapter.generate_ids(images, max_new_tokens=8, with_logits=True)
    rng = torch.Generator().manual_seed(0)
    shuffled = [p[torch.randperm(p.shape[0], generator=rng)] for p in post]
    permuted = adapter.generate_ids(images, post=shuffled, max_new_tokens=8, with_logits=True)
    assert not same_generation(permuted, native)
    assert not torch.equal(permuted.first_logits, native.first_logits)  # whatever the ids do


def test_zeroed_post_changes_what_the_lm_reads(adapter, images):
    _, post = adapter.encode(images)
    inputs = adapter.prepare(images)
    for key in adapter.pixel_keys:
        inputs.pop(key, None)

    def last_logits(features):
        supplied = {"image": BaseModelOutputWithPooling(pooler_output=tuple(p.to(adapter.dtype) for p in features))}
        with torch.no_grad():
            return adapter.model(**inputs, mm_encoder_outputs=supplied).logits[:, -1]

    moved = (last_logits(post) - last_logits([torch.zeros_like(p) for p in post])).abs().amax(-1)
    assert moved.min() > 1e-2  # every image's next-token logits


def test_token_layout_describes_the_stored_tokens(adapter, images):
    pre, post = adapter.encode(images)
    n_pre, n_post = pre[0].shape[0], post[0].shape[0]
    layout = adapter.token_layout(n_pre, n_post)
    assert layout["connector"] == adapter.connector_kind != "connector"  # each family names its kind
    if layout["pre_to_post"] is not None:
        assert len(layout["pre_to_post"]) == n_pre and set(layout["pre_to_post"]) == set(range(n_post))
    if layout["pre_raster"] is not None:
        assert sorted(layout["pre_raster"]) == list(range(n_pre))


def test_save_load_round_trip(adapter, images, tmp_path):
    adapter.save(tmp_path / "model")
    loaded = load_adapter(adapter.family, str(tmp_path / "model"))
    assert type(loaded) is type(adapter)
    for got, want in zip(loaded.encode(images)[1], adapter.encode(images)[1]):
        assert torch.equal(got, want)
    assert loaded.generate(images, max_new_tokens=8) == adapter.generate(images, max_new_tokens=8)


def test_in_bf16_generation_from_the_stored_post_replays_native(adapter, images, tmp_path):
    """The real checkpoints compute in bf16 (profiles/real.yaml), the rehearsal in float32 (bf16 is two orders
    of magnitude slower on a CPU without it): loaded in bf16, E_post is bf16, stored through safetensors and
    read back as float32 it holds the same values, and generation from it replays native bf16 generation."""
    from safetensors.torch import load_file, save_file

    adapter.save(tmp_path / "model")
    bf16 = load_adapter(adapter.family, str(tmp_path / "model"), dtype="bfloat16")
    _, post = bf16.encode(images)
    assert {p.dtype for p in post} == {torch.bfloat16}
    save_file({str(i): p.contiguous() for i, p in enumerate(post)}, tmp_path / "post.safetensors")
    stored = load_file(tmp_path / "post.safetensors")
    stored = [stored[str(i)].float() for i in range(len(post))]  # as conngeo.data.vectors reads them
    assert all(torch.equal(s.bfloat16(), p) for s, p in zip(stored, post))
    native = bf16.generate_ids(images, max_new_tokens=8, with_logits=True)
    assert same_generation(bf16.generate_ids(images, post=stored, max_new_tokens=8, with_logits=True), native)


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_checkpoint_says_how_to_get_it(family, tmp_path):
    cls = adapter_class(family)
    with pytest.raises(MissingCheckpointError, match="dvc repro"):
        cls.load(str(tmp_path / "absent"))
    with pytest.raises(MissingCheckpointError, match=f"hf download conngeo-test/absent --revision {'a' * 40} "
                                                     f"--local-dir {tmp_path / 'real'}"):
        cls.load(tmp_path / "real", revision="a" * 40, hub="conngeo-test/absent")
