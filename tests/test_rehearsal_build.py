"""The real-checkpoint path, rehearsed: rehearsal checkpoints (conngeo.models.rehearsal: the real
architectures at full width with random weights and one layer per tower, the real files' config /
processor / generation values and chat templates, laid out as `hf download --local-dir` leaves them)
load and run through the study's own code: load_adapter, load_reference, BERTScore.

The checkpoints are built once per test session (conftest.rehearsal_checkpoints) and each model is
loaded, tested and dropped before the next: a one-layer LLaVA at full width is still ~0.25 B parameters.
"""

import gc
import json
import os

import bert_score
import pytest
import torch
from PIL import Image
from transformers.utils.chat_template_utils import render_jinja_template

from conngeo.models import MissingCheckpointError, load_adapter
from conngeo.models.base import SAMPLING_KEYS, downloaded_revision
from conngeo.models.references import load_reference
from conngeo.models.rehearsal import build_checkpoint, build_photos, real_checkpoints
from conngeo.scoring import BERTScore
from conftest import REHEARSAL_PROMPT as PROMPT

CHECKPOINTS = real_checkpoints()
# per VLM: image_size, E_pre and E_post shape of every image, the image placeholder the template writes
VLMS = {
    "llava": (336, (576, 1024), (576, 4096), "<image>"),
    "idefics2": (336, (576, 1152), (64, 4096), "<image>"),
    "qwen2_5vl": (336, (576, 1280), (144, 3584), "<|image_pad|>"),
    "qwen3_5": (384, (576, 1024), (144, 2560), "<|image_pad|>"),
}
# the real chat format of one user turn [image, PROMPT] with the generation prompt, written out by hand
RENDERED = {
    "llava": f"USER: <image>\n{PROMPT} ASSISTANT:",
    "idefics2": f"User:<image>{PROMPT}<end_of_utterance>\nAssistant:",
    "qwen2_5vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                 f"<|vision_start|><|image_pad|><|vision_end|>{PROMPT}<|im_end|>\n<|im_start|>assistant\n",
    "qwen3_5": f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{PROMPT}<|im_end|>\n"
               "<|im_start|>assistant\n<think>\n\n</think>\n\n",
}
STOP = {"llava": "</s>", "idefics2": "<end_of_utterance>", "qwen2_5vl": "<|im_end|>", "qwen3_5": "<|im_end|>"}


def render(template: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    rendered, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=True,
                                        enable_thinking=False)
    return rendered[0]


def squeeze(text: str) -> str:
    return "".join(text.split())  # the word-level tokenizer keeps no whitespace


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Image.Image]:
    """640x480, 480x640, 500x375, 612x612, 2048x1536 JPEGs."""
    return [Image.open(p).convert("RGB") for p in build_photos(tmp_path_factory.mktemp("photos"))]


@pytest.fixture(scope="module", params=list(VLMS))
def vlm(request, rehearsal_checkpoints, photos):
    """(name, fixture entry, folder, adapter, (E_pre, E_post) of the photos) for one VLM at a time."""
    name = request.param
    entry, size = CHECKPOINTS[name], VLMS[name][0]
    folder = rehearsal_checkpoints[name]
    adapter = load_adapter(entry["family"], folder, revision=entry["revision"], dtype="bfloat16", prompt=PROMPT,
                           image_size=size, hub=entry["hub"])
    yield name, entry, folder, adapter, adapter.encode(photos)
    del adapter
    gc.collect()


def test_folder_is_laid_out_as_hf_download_leaves_it(vlm):
    name, entry, folder, adapter, _ = vlm
    files = {p.name for p in folder.iterdir() if p.is_file()}
    expected = {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
                "tokenizer_config.json", entry["chat_template_file"]}
    expected |= {"generation_config.json"} if entry["generation_config"] else set()
    expected |= {"processor_config.json"} if entry["processor"] else set()
    assert files == expected
    assert downloaded_revision(folder) == entry["revision"]
    assert all((folder / ".cache/huggingface/download" / f"{f}.metadata").is_file() for f in files)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == entry["config"]["model_type"]  # the real file's format, not a re-serialisation
    assert ("text_config" in config) == ("text_config" in entry["config"])  # Qwen2.5-VL's stays flat


def test_every_photo_gives_the_real_token_shapes(vlm, photos):
    name, _, _, _, (pre, post) = vlm
    _, pre_shape, post_shape, _ = VLMS[name]
    assert len(pre) == len(post) == len(photos)
    assert {tuple(p.shape) for p in pre} == {pre_shape}
    assert {tuple(p.shape) for p in post} == {post_shape}
    assert all(torch.isfinite(p).all() for p in pre + post)
    assert not torch.equal(post[0], post[1])  # different photos, different E_post


def test_prompt_is_the_real_chat_format(vlm, photos):
    name, entry, _, adapter, (_, post) = vlm
    placeholder, n_image = VLMS[name][3], post[0].shape[0]
    assert render(entry["chat_template"]) == RENDERED[name]
    if hasattr(adapter, "prompt_text"):  # LLaVA, Idefics2: the text their processor expands
        assert adapter.prompt_text() == RENDERED[name]
    expanded = {"llava": "<image>" * n_image,
                "idefics2": "<fake_token_around_image>" + "<image>" * n_image + "<fake_token_around_image>",
                }.get(name, placeholder * n_image)
    expected = RENDERED[name].replace(placeholder, expanded)
    expected = (entry["tokenizer"].get("template") or "$A").replace("$A", expected)  # e.g. Llama's <s>
    ids = adapter.prepare([photos[0]])["input_ids"][0]
    tok = adapter.tokenizer
    assert squeeze(tok.decode(ids)) == squeeze(expected)
    assert (ids == tok.convert_tokens_to_ids(placeholder)).sum() == n_image
    assert tok.convert_tokens_to_ids("<unk>") not in ids.tolist()  # every word of the prompt is in the vocabulary


def test_generation_from_e_post_replays_generation_from_pixels(vlm, photos):
    name, _, _, adapter, (_, post) = vlm
    # two photos (landscape, portrait) keep the test fast: the prompt is ~600 tokens for LLaVA
    native = adapter.generate(photos[:2], max_new_tokens=3)
    replay = adapter.generate(photos[:2], post=post[:2], max_new_tokens=3)
    assert len(native) == 2 and native == replay


def test_generation_settings_name_what_the_checkpoint_suggested(vlm):
    name, entry, _, adapter, _ = vlm
    settings = adapter.generation_settings(3)
    suggested = {k for k in SAMPLING_KEYS if k in (entry["generation_config"] or {})}
    assert set(settings["ignored_from_checkpoint"]) == suggested
    if name == "qwen2_5vl":
        assert settings["ignored_from_checkpoint"]["repetition_penalty"] == 1.05
    if name == "idefics2":  # remapped to the rehearsal's ids of the same tokens
        tok = adapter.tokenizer
        assert settings["ignored_from_checkpoint"]["bad_words_ids"] == [
            [tok.convert_tokens_to_ids("<fake_token_around_image>")], [tok.convert_tokens_to_ids("<image>")]]
    assert STOP[name] in settings["stop_tokens"]
    assert settings["do_sample"] is False and settings["repetition_penalty"] == 1.0


def test_a_wrong_revision_is_refused(vlm):
    name, entry, folder, _, _ = vlm
    with pytest.raises(ValueError, match="downloaded at revision"):
        load_adapter(entry["family"], folder, revision="0" * 40, hub=entry["hub"])


@pytest.mark.parametrize("name", list(VLMS))
def test_a_missing_folder_says_how_to_download_it(name, tmp_path):
    entry, folder = CHECKPOINTS[name], tmp_path / name
    with pytest.raises(MissingCheckpointError) as err:
        load_adapter(entry["family"], folder, revision=entry["revision"], hub=entry["hub"])
    assert f"hf download {entry['hub']} --revision {entry['revision']} --local-dir {folder}" in str(err.value)


@pytest.mark.parametrize("kind", ["clip", "dino"])
def test_reference_embeds_photos(kind, photos, tmp_path):
    entry, texts = CHECKPOINTS[kind], ["a photo of a dog", "A red plate with two apples."]
    folder = build_checkpoint(entry, tmp_path / kind, layers=1, words=texts, dtype="float32")
    reference = load_reference(kind, folder, revision=entry["revision"], dtype="float32", hub=entry["hub"])
    assert tuple(reference.pixel_values(photos).shape) == (5, 3, 224, 224)  # resize + 224 crop
    vectors = reference.embed(photos)
    assert tuple(vectors.shape) == (5, 768) and torch.isfinite(vectors).all()
    if kind == "clip":
        tok = reference.tokenizer
        ids = tok(texts[1]).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id == len(tok) - 1  # eos: the highest id
        text_vectors = reference.embed_text(texts)
        assert tuple(text_vectors.shape) == (2, 768) and torch.isfinite(text_vectors).all()


def test_bertscore_on_the_rehearsal_equals_bert_score(tmp_path):
    entry = CHECKPOINTS["roberta-large"]
    cands = ["a dog on a plate", "two red apples", "a cat"]
    refs = [["a dog sitting on a white plate", "the dog"], ["two apples that are red"],
            ["a small cat", "cat on a mat", "a kitten"]]
    folder = build_checkpoint(entry, tmp_path / "roberta", layers=1, words=cands + [r for g in refs for r in g],
                              dtype="float32")
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 17  # bert-score reads layer 17
    scores = BERTScore("roberta-large", source=folder, num_layers=17, rescale_with_baseline=True).score(cands, refs)
    baseline = os.path.join(os.path.dirname(bert_score.__file__), "rescale_baseline", "en", "roberta-large.tsv")
    p, r, f = bert_score.score(cands, refs, model_type=str(folder), num_layers=17, lang="en",
                               rescale_with_baseline=True, baseline_path=baseline)
    for key, direct in zip(("P", "R", "F1"), (p, r, f)):
        assert torch.isfinite(scores[key]).all()
        torch.testing.assert_close(scores[key], direct.double(), rtol=1e-6, atol=1e-6)  # float32 batches differ
