"""The real-checkpoint path, rehearsed: rehearsal checkpoints (conngeo.rehearsal: the real
architectures at full width with random weights and one layer per tower, the real files' config /
processor / generation values and chat templates, laid out as `hf download --local-dir` leaves them)
load and run through the study's own code: load_adapter, load_reference, BERTScore.

The checkpoints are built once per test session (conftest.rehearsal_checkpoints) and each model is
loaded, tested and dropped before the next: a one-layer LLaVA at full width is still ~0.25 B parameters.
"""

import gc
import json
import os
import shutil

import bert_score
import pytest
from bert_score.utils import sent_encode
import torch
from PIL import Image
from transformers.utils.chat_template_utils import render_jinja_template

from conngeo.families import MissingCheckpointError, load_adapter
from conngeo.families.base import SAMPLING_KEYS, downloaded_revision, same_generation
from conngeo.references import load_reference
from conngeo.rehearsal import build_checkpoint, build_photos, real_checkpoints
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
BOS = {"llava": "<s>", "idefics2": "<s>"}  # what the real tokenizer puts before a text (Llama's add_bos_token)
# the class transformers 5 loads each real folder's tokenizer with (llava's tokenizer_config names LlamaTokenizer,
# but llava is among the model types whose hub class transformers overrides; Qwen3.5's names Qwen2Tokenizer)
TOKENIZER_CLASS = {"llava": "TokenizersBackend", "idefics2": "LlamaTokenizer", "qwen2_5vl": "Qwen2Tokenizer",
                   "qwen3_5": "Qwen3_5Tokenizer", "clip": "CLIPTokenizer", "roberta-large": "RobertaTokenizer"}


def render(template: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    rendered, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=True,
                                        enable_thinking=False)
    return rendered[0]


def squeeze(text: str) -> str:
    return "".join(text.split())  # the SentencePiece normalizer puts a "▁" (a space) after every added token


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
    adapter = load_adapter(entry["family"], folder, revision=entry["revision"], dtype="float32", prompt=PROMPT,
                           image_size=size, hub=entry["hub"])
    yield name, entry, folder, adapter, adapter.encode(photos)
    del adapter
    gc.collect()


def test_folder_is_laid_out_as_hf_download_leaves_it(vlm):
    name, entry, folder, adapter, _ = vlm
    files = {p.name for p in folder.iterdir() if p.is_file()}
    expected = {"config.json", "model.safetensors", "preprocessor_config.json", entry["chat_template_file"],
                *entry["tokenizer"]["files"]}
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
    ids = adapter.prepare([photos[0]])["input_ids"][0]
    tok = adapter.tokenizer
    assert type(tok).__name__ == TOKENIZER_CLASS[name]  # the real folder's loading branch
    assert squeeze(tok.decode(ids)) == squeeze(BOS.get(name, "") + expected)
    assert (ids == tok.convert_tokens_to_ids(placeholder)).sum() == n_image
    assert tok.unk_token_id is None or tok.unk_token_id not in ids.tolist()
    if name == "llava":  # as llava-hf's real ids 29871 32000 29871 13 around "<image>\n": "▁" <image> "▁" <0x0A>
        at = ids.tolist().index(tok.convert_tokens_to_ids(placeholder))
        assert tok.convert_ids_to_tokens(ids[at - 1:at + n_image + 2].tolist()) == [
            "▁", *[placeholder] * n_image, "▁", "<0x0A>"]


def test_generation_from_e_post_replays_generation_from_pixels(vlm, photos):
    name, _, _, adapter, (_, post) = vlm
    # two photos (landscape, portrait) keep the test fast: the prompt is ~600 tokens for LLaVA
    native = adapter.generate_ids(photos[:2], max_new_tokens=3, with_logits=True)
    assert same_generation(adapter.generate_ids(photos[:2], post=post[:2], max_new_tokens=3, with_logits=True), native)
    rng = torch.Generator().manual_seed(0)  # the same E_post rows, reordered within each image: caught
    shuffled = [p[torch.randperm(p.shape[0], generator=rng)] for p in post[:2]]
    assert not same_generation(adapter.generate_ids(photos[:2], post=shuffled, max_new_tokens=3, with_logits=True),
                               native)


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
        assert type(tok).__name__ == TOKENIZER_CLASS[kind] and tok.model_max_length == 77
        ids = tok(texts[1]).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id == len(tok) - 1  # eos: the highest id
        text_vectors = reference.embed_text(texts)
        assert tuple(text_vectors.shape) == (2, 768) and torch.isfinite(text_vectors).all()


def test_bertscore_on_the_rehearsal_equals_bert_score(tmp_path):
    """The roberta-large folder as the hub has it (no tokenizer_config.json) scores without error, with RoBERTa's
    leading space and 512 positions; bert_score.score gives the same numbers on a copy whose tokenizer_config.json
    states those two (it cannot read the hub's layout: bert_score#205)."""
    entry = CHECKPOINTS["roberta-large"]
    cands = ["a dog on a plate", "two red apples", "A cat"]
    refs = [["a dog sitting on a white plate", "the dog"], ["two apples that are red"],
            ["a small cat", "cat on a mat", "a kitten"]]
    folder = build_checkpoint(entry, tmp_path / "roberta", layers=1, words=cands + [r for g in refs for r in g],
                              dtype="float32")
    assert not (folder / "tokenizer_config.json").exists()
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 17  # bert-score reads layer 17
    scorer = BERTScore("roberta-large", source=folder, num_layers=17, rescale_with_baseline=True)
    tok = scorer.scorer._tokenizer
    assert type(tok).__name__ == TOKENIZER_CLASS["roberta-large"] and tok.model_max_length == 512
    assert tok.convert_ids_to_tokens(sent_encode(tok, "A cat")) == ["<s>", "ĠA", "Ġcat", "</s>"]
    scores = scorer.score(cands, refs)
    stated = shutil.copytree(folder, tmp_path / "stated")
    (stated / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512, "add_prefix_space": True}))
    baseline = os.path.join(os.path.dirname(bert_score.__file__), "rescale_baseline", "en", "roberta-large.tsv")
    p, r, f = bert_score.score(cands, refs, model_type=str(stated), num_layers=17, lang="en",
                               rescale_with_baseline=True, baseline_path=baseline)
    for key, direct in zip(("P", "R", "F1"), (p, r, f)):
        assert torch.isfinite(scores[key]).all()
        torch.testing.assert_close(scores[key], direct.double(), rtol=1e-6, atol=1e-6)  # float32 batches differ
