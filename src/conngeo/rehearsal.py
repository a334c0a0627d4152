"""Rehearsal checkpoints: the real checkpoints' architectures and files, with random weights.

No machine of this project can download weights, so the real-checkpoint path of the study is proven
on folders laid out as `hf download <hub> --revision <rev> --local-dir <folder>` leaves them, built
from the real files' values in tests/fixtures/real_checkpoints.yaml, and loaded through the study's
normal code (Adapter.load, load_reference, BERTScore).

Real in a rehearsal checkpoint:
  - config.json as the hub file has it, format included (Qwen2.5-VL's flat file, CLIP's legacy text ids,
    class defaults left to the config class), so transformers parses what it parses for the real file;
  - the model class the config names (LlavaForConditionalGeneration, ..., CLIPModel, Dinov2Model,
    RobertaForMaskedLM) at full width: hidden and intermediate sizes, heads, patch / image / merge sizes,
    latents; model.safetensors with save_pretrained's weight names (the hub checkpoints' layout);
  - preprocessor_config.json, processor_config.json where the checkpoint has one, the chat template in
    the file the checkpoint keeps it in, generation_config.json (none where the checkpoint has none);
  - the tokenizer: the files the hub folder has, in its formats (tokenizer.json, vocab.json + merges.txt,
    tokenizer_config.json, special_tokens_map.json, added_tokens.json; RoBERTa's without a tokenizer_config),
    so transformers loads each with the class it loads the real one with (TokenizersBackend for LLaVA,
    LlamaTokenizer, Qwen2Tokenizer, Qwen3_5Tokenizer, CLIPTokenizer, RobertaTokenizer); tokenizer.json has
    the real pipeline (Llama's SentencePiece BPE with byte fallback, Qwen's, CLIP's and GPT-2's byte-level
    BPE); the special tokens keep their strings, roles, flags and real order;
  - .cache/huggingface/download/<file>.metadata (revision, etag, time), written by huggingface_hub's own
    writer, so conngeo.families.base.downloaded_revision(folder) reads the pinned revision.
Not real:
  - the weights: random (seeded; Idefics2's perceiver latents drawn normal(0, 1), as the class inits them
    to ones, which would make E_post rank 1);
  - the depth: `layers` per tower (text, vision, perceiver), None for the real depths (on a GPU);
  - the vocabulary: a BPE trained on `words` and the chat template's words (the real one cannot be
    downloaded), so ids differ: every token id of config and generation_config is remapped to the new id
    of the same token string, and vocab_size is the small vocabulary's size. Llama's tokenizer.model
    (SentencePiece) is not written: transformers 5 reads tokenizer.json wherever both are present.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import transformers
import yaml
from huggingface_hub._local_folder import write_download_metadata
from PIL import Image, ImageDraw
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from .data.vectors import resolve_dtype

FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "real_checkpoints.yaml"
DEPTH_KEYS = ("num_hidden_layers", "depth", "resampler_depth")
SUB_CONFIGS = ("text_config", "vision_config", "perceiver_config")
LOW_IDS = 1000  # special tokens below this id open the vocabulary (Llama's <unk> <s> </s>), the rest close it


def real_checkpoints(path=None) -> dict:
    """The fixture: checkpoint name -> entry (hub, revision, config, preprocessor, ...)."""
    with open(path or FIXTURE) as f:
        return yaml.safe_load(f)


def build_photos(folder, sizes=((640, 480), (480, 640), (500, 375), (612, 612), (2048, 1536)), seed=0) -> list[Path]:
    """Deterministic JPEG "photographs" of the given (width, height): a colour gradient and random shapes."""
    folder, rng, paths = Path(folder), np.random.default_rng(seed), []
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        a, b = rng.uniform(0, 255, (2, 3))
        t = np.linspace(0, 1, w)[None, :, None] * 0.6 + np.linspace(0, 1, h)[:, None, None] * 0.4
        image = Image.fromarray((a + (b - a) * t).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x0, x1 = sorted(rng.integers(0, w, 2))
            y0, y1 = sorted(rng.integers(0, h, 2))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        paths.append(folder / f"photo{i}_{w}x{h}.jpg")
        image.save(paths[-1], quality=90)
    return paths


# -- tokenizer ------------------------------------------------------------------------------------

def template_text(entry: dict) -> str:
    """The chat template rendered for one user turn [image, empty text] with the generation prompt."""
    if not entry.get("chat_template"):
        return ""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ""}]}]
    rendered, _ = render_jinja_template([messages], chat_template=entry["chat_template"], add_generation_prompt=True,
                                        enable_thinking=False)
    return rendered[0]


def sentencepiece_pipeline() -> Tokenizer:
    """The tokenizer.json pipeline of a Llama-family SentencePiece BPE as transformers' LlamaConverter wrote
    it when llava-hf and Idefics2 were converted (transformers 4.36-4.39): the normalizer prepends "▁" and
    turns spaces into "▁" (so every text piece between two added tokens starts with "▁"), no
    pre-tokenizer, BPE with byte fallback (<0x0A> for a newline) and fused unknowns."""
    core = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    return core


def pipeline(name: str) -> Tokenizer:
    """An empty tokenizer with the pipeline (normalizer, pre-tokenizer, decoder, BPE settings) of the real
    tokenizer.json: "sentencepiece" (above), else the one the named transformers class builds."""
    if name == "sentencepiece":
        return sentencepiece_pipeline()
    return Tokenizer.from_str(getattr(transformers, name)().backend_tokenizer.to_str())


def train_bpe(core: Tokenizer, texts: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(tokens, merges) of a BPE trained on `texts` through `core`'s normalizer and pre-tokenizer, in the
    trainer's order: the alphabet, then one token per merge. Byte-level pipelines start from all 256
    byte symbols (every text is then encodable); a SentencePiece one is trained word by word (its pieces
    never span a "▁"), and its newlines are left to byte fallback, as Llama's vocabulary does."""
    config = json.loads(core.to_str())
    trainer_core = Tokenizer.from_str(core.to_str())
    byte_level = "ByteLevel" in json.dumps(config["pre_tokenizer"])
    if config["model"]["byte_fallback"]:
        trainer_core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=True)
        texts = [t.replace("\n", " ") for t in texts]
    end = config["model"]["end_of_word_suffix"]
    suffix = {"end_of_word_suffix": end} if end else {}
    trainer = trainers.BpeTrainer(vocab_size=1 << 20, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [], **suffix)
    trainer_core.train_from_iterator(texts, trainer)
    trained = json.loads(trainer_core.to_str())["model"]
    tokens = sorted(trained["vocab"], key=trained["vocab"].get)
    if end:  # CLIP's vocabulary has every byte symbol also as a word's end
        tokens += [c + end for c in pre_tokenizers.ByteLevel.alphabet() if c + end not in trained["vocab"]]
    return tokens, [tuple(m) for m in trained["merges"]]


def tokenizer_layout(entry: dict, words=()) -> tuple[Tokenizer, dict[str, int], list[str]]:
    """The rehearsal tokenizer of `entry`: the real pipeline (tokenizer.pipeline) with a BPE trained on the
    words of `words` (any texts: prompt, captions, ...) and of the chat template. Returns the tokenizers
    object (as tokenizer.json holds it), the model vocabulary (token -> id, as vocab.json holds it) and
    the added tokens in id order.

    Ids keep the real order: special tokens below LOW_IDS open the vocabulary (Llama's <unk> <s> </s>,
    RoBERTa's <s> <pad> </s> <unk>), then Llama's 256 byte tokens <0x00>..<0xFF>, the trained tokens,
    and the other special tokens close it (CLIP's <|endoftext|> stays the highest id: its legacy pooling
    takes the highest id of a text). Special tokens at or above tokenizer.added_from are added tokens
    after the model vocabulary, as in the real file (Llama's <image> <pad>, Qwen's), the others belong
    to it (RoBERTa's <mask>, CLIP's two)."""
    spec, specials = entry["tokenizer"], entry["special_tokens"]
    ordered = sorted(specials, key=specials.get)
    added_from = spec.get("added_from", float("inf"))
    text = " ".join([*words, template_text(entry)])
    for token in ordered:
        text = text.replace(token, " ")
    core = pipeline(spec["pipeline"])
    trained, merges = train_bpe(core, [text])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)] if json.loads(core.to_str())["model"]["byte_fallback"] else []
    vocab = [t for t in ordered if specials[t] < LOW_IDS] + byte_tokens + trained
    vocab += [t for t in ordered if LOW_IDS <= specials[t] < added_from]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    added = [t for t in ordered if specials[t] >= added_from]
    config = json.loads(core.to_str())
    config["model"].update(vocab=vocab, merges=[list(m) for m in merges])
    core = Tokenizer.from_str(json.dumps(config))
    plain = set(spec.get("not_special", []))
    core.add_tokens([AddedToken(t, special=t not in plain, normalized=False) for t in added])
    core.add_special_tokens([AddedToken(t, special=t not in plain, normalized=False)
                             for t in ordered if t not in added])
    core.post_processor = post_processor(spec, core)
    return core, vocab, added


def post_processor(spec: dict, core: Tokenizer):
    """What the real tokenizer.json adds around a text: Llama's <s> first (add_bos_token), RoBERTa's
    <s> ... </s> and CLIP's <|startoftext|> ... <|endoftext|>; byte-level Qwen adds nothing."""
    config, name = spec.get("config") or {}, spec["pipeline"]
    if name == "sentencepiece":
        bos = config["bos_token"]
        return processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                             special_tokens=[(bos, core.token_to_id(bos))])
    if name == "RobertaTokenizer":
        return processors.RobertaProcessing(("</s>", core.token_to_id("</s>")), ("<s>", core.token_to_id("<s>")))
    if name == "CLIPTokenizer":
        eos, bos = "<|endoftext|>", "<|startoftext|>"
        return processors.RobertaProcessing((eos, core.token_to_id(eos)), (bos, core.token_to_id(bos)),
                                            trim_offsets=False, add_prefix_space=False)
    return processors.ByteLevel(trim_offsets=False)


def write_tokenizer(entry: dict, folder: Path, words=()) -> dict[str, int]:
    """The tokenizer files the real folder has (tokenizer.files), in its formats, from `tokenizer_layout`:
    tokenizer.json, vocab.json + merges.txt (GPT-2 byte-level BPE), tokenizer_config.json (tokenizer.config,
    its added_tokens_decoder from special_tokens at the rehearsal's ids), special_tokens_map.json,
    added_tokens.json. Returns every token's id (token -> id, added tokens included)."""
    spec = entry["tokenizer"]
    core, vocab, added = tokenizer_layout(entry, words)
    ids = core.get_vocab(with_added_tokens=True)
    plain = set(spec.get("not_special", []))
    files = set(spec["files"])
    core.save(str(folder / "tokenizer.json"))
    if "vocab.json" in files:
        _write_json(folder / "vocab.json", vocab)
        merges = json.loads(core.to_str())["model"]["merges"]
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    if "tokenizer_config.json" in files:
        config = dict(spec["config"])
        if config.get("added_tokens_decoder") == "special_tokens":
            config["added_tokens_decoder"] = {
                str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                              "single_word": False, "special": t not in plain}
                for t in sorted(entry["special_tokens"], key=ids.get)}
        _write_json(folder / "tokenizer_config.json", config)
    if "special_tokens_map.json" in files:
        _write_json(folder / "special_tokens_map.json", spec["special_tokens_map"])
    if "added_tokens.json" in files:
        _write_json(folder / "added_tokens.json", {t: ids[t] for t in added})
    return ids


# -- config ---------------------------------------------------------------------------------------

def _resolved(config: dict):
    """The config object transformers makes of `config` (a copy: some classes edit sub-config dicts)."""
    config = copy.deepcopy(config)
    return AutoConfig.for_model(config.pop("model_type"), **config)


def capped_config(config: dict, layers: int | None, min_layers=0) -> dict:
    """`config` with every tower at most `layers` deep (None: unchanged). min_layers: a floor for all
    towers (int) or per sub-config ({"vision_config": 2}; "" is the top level). Qwen2.5-VL's
    fullatt_block_indexes keep the blocks below the cap (else the last block), Qwen3.5's layer_types
    the real pattern cut to the cap with at least its last layer full attention."""
    out = copy.deepcopy(config)
    if layers is None:
        return out
    resolved = _resolved(out)
    for key in ("", *SUB_CONFIGS):
        sub = getattr(resolved, key, None) if key else resolved
        if sub is None or isinstance(sub, dict):
            continue
        floor = min_layers.get(key, 0) if isinstance(min_layers, dict) else min_layers
        cap = max(layers, floor)
        target = out[key] if key in out else out  # flat files (Qwen2.5-VL) keep text fields at the top level
        for name in DEPTH_KEYS:
            real = getattr(sub, name, None) if name not in getattr(sub, "attribute_map", {}) else None
            if not isinstance(real, int) or real <= cap:
                continue
            target[name] = cap
            if getattr(sub, "fullatt_block_indexes", None) is not None:
                target["fullatt_block_indexes"] = [i for i in sub.fullatt_block_indexes if i < cap] or [cap - 1]
            if getattr(sub, "layer_types", None) and ("layer_types" in target or "full_attention_interval" in target):
                types = list(sub.layer_types[:cap])
                if "full_attention" not in types:
                    types[-1] = "full_attention"
                target["layer_types"] = types
                if "full_attention_interval" in target:
                    target["full_attention_interval"] = min(target["full_attention_interval"], cap)
    return out


def is_id_key(key: str) -> bool:
    return key.endswith(("_token_id", "_token_ids", "_token_index")) or key == "bad_words_ids"


def remapped(obj, ids: dict[int, int], legacy=(), key: str = ""):
    """`obj` (a config / generation config dict) with every token id replaced via `ids` (real -> new);
    ids in `legacy` are kept (CLIP's legacy text ids are not token references)."""
    if isinstance(obj, dict):
        return {k: remapped(v, ids, legacy, k) for k, v in obj.items()}
    if isinstance(obj, list) and is_id_key(key):
        return [remapped(v, ids, legacy, key) for v in obj]
    if isinstance(obj, int) and not isinstance(obj, bool) and is_id_key(key) and obj not in legacy:
        if obj not in ids:
            raise ValueError(f"{key}: token id {obj} is not among the entry's special_tokens; add its string there")
        return ids[obj]
    return obj


def with_vocab_size(config: dict, size: int) -> dict:
    out = dict(config, vocab_size=size) if "vocab_size" in config else dict(config)
    if isinstance(out.get("text_config"), dict) and "vocab_size" in out["text_config"]:
        out["text_config"] = dict(out["text_config"], vocab_size=size)
    return out


# -- the folder -----------------------------------------------------------------------------------

def _etag(path: Path) -> str:
    """The hub's etag of a file: sha256 for LFS files (weights), the git blob sha1 otherwise."""
    if path.suffix != ".safetensors":
        data = path.read_bytes()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def check_tokenizer(folder: Path, vocab: dict[str, int]) -> None:
    """The tokenizer transformers loads from `folder` (the class it picks for the real folder) has exactly
    the rehearsal's vocabulary: a class that added or moved a token would leave the model's embedding
    table and config ids wrong."""
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    got = tok.get_vocab()
    if got != vocab:
        moved = sorted(set(got.items()) ^ set(vocab.items()), key=str)[:6]
        raise AssertionError(f"{folder}: {type(tok).__name__} loads {len(got)} tokens, the rehearsal wrote "
                             f"{len(vocab)}; differences (token, id): {moved}")


def write_files(entry: dict, folder, layers: int | None = 1, words=(), dtype="bfloat16"):
    """Every file of the rehearsal checkpoint but the weights, into `folder`: config.json in the real file's
    format, tokenizer, generation config, preprocessor and processor configs, the chat template where the
    checkpoint keeps it. Returns the config as transformers resolves it (for building the model)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = capped_config(entry["config"], layers, entry.get("min_layers", 0))
    legacy, ids, vocab = entry.get("legacy_ids", []), {}, None
    if entry.get("tokenizer"):
        vocab = write_tokenizer(entry, folder, words)
        ids = {real: vocab[token] for token, real in entry["special_tokens"].items()}
        config = with_vocab_size(remapped(config, ids, legacy), len(vocab))
    _write_json(folder / "config.json", dict(config, torch_dtype=dtype))
    if vocab is not None:
        check_tokenizer(folder, vocab)
    (folder / "generation_config.json").unlink(missing_ok=True)
    if entry.get("generation_config"):
        _write_json(folder / "generation_config.json", remapped(entry["generation_config"], ids, legacy))
    if entry.get("preprocessor"):
        _write_json(folder / "preprocessor_config.json", entry["preprocessor"])
    processor = dict(entry.get("processor") or {})
    where = entry.get("chat_template_file")
    if where == "processor_config.json":
        processor["chat_template"] = entry["chat_template"]
    elif where == "chat_template.json":
        _write_json(folder / where, {"chat_template": entry["chat_template"]})
    elif where == "chat_template.jinja":
        (folder / where).write_text(entry["chat_template"])
    if processor:
        _write_json(folder / "processor_config.json", processor)
    return AutoConfig.from_pretrained(folder, local_files_only=True)


def build_model(entry: dict, folder, layers: int | None = 1, words=(), dtype="bfloat16", device="cpu"):
    """The model of a rehearsal checkpoint with random (seeded) weights, drawn on `device`, its other files
    written into `folder` (write_files): a GPU check builds a full-depth model in place this way, without
    writing and reading back its weights."""
    resolved = write_files(entry, folder, layers, words, dtype)
    model_class = getattr(transformers, entry["config"]["architectures"][0])
    place = torch.device(device)
    with torch.random.fork_rng(devices=[place.index or 0] if place.type == "cuda" else []), place, torch.no_grad():
        torch.manual_seed(0)  # seeded weights, and the caller's random state left as it was
        model = model_class._from_config(resolved, dtype=resolve_dtype(dtype))
        for name, param in model.named_parameters():
            if name.endswith("perceiver_resampler.latents"):  # Idefics2 inits them all ones: one query
                param.normal_(0.0, 1.0)
    return model


def build_checkpoint(entry: dict, folder, layers: int | None = 1, words=(), dtype="bfloat16",
                     device="cpu") -> Path:
    """Write a rehearsal of `entry` (a real_checkpoints() entry) into `folder` (new or empty), as `hf download --local-dir`
    would leave the real checkpoint (see the module docstring for what is real); returns the folder.

    layers: towers' depth cap (None: the real depths); words: texts whose words the vocabulary holds (the
    prompt, captions); dtype: the saved weights' dtype; device: where the random weights are drawn."""
    folder = Path(folder)
    model = build_model(entry, folder, layers, words, dtype, device)
    model.save_pretrained(folder, max_shard_size="5GB")
    del model
    gc.collect()
    write_files(entry, folder, layers, words, dtype)  # the real files' format, not save_pretrained's re-serialisation
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and rel.parts[0] != ".cache":
            write_download_metadata(folder, rel.as_posix(), entry["revision"], _etag(path))
    return folder
