"""One adapter interface for every VLM family.

An adapter wraps a real transformers model and its processor and exposes the three views of an
image the study needs:

    E_pre  = vision_encoder(x)     the connector's input, one [tokens, d_vision] matrix per image
    E_post = connector(E_pre)      the connector's output, one [tokens', d_text] matrix per image
    caption = LM(E_post)

A family is one file in conngeo/families/ that subclasses `Adapter` and sets `family`, named in
conngeo.families.registry (a file outside the package registers itself: conngeo.families.register).
Family quirks (hook point, token order, processor details, the tiny zoo config) stay inside that file.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
from PIL import Image
from transformers import GenerationConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..data.vectors import resolve_dtype

# generation settings a checkpoint's generation_config.json may carry that the study never uses: it
# decodes plain greedy whatever the checkpoint suggests (e.g. Qwen2.5-VL's repetition_penalty 1.05)
SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams",
                 "no_repeat_ngram_size", "bad_words_ids", "length_penalty")


class MissingCheckpointError(FileNotFoundError):
    pass


class Generation(NamedTuple):
    """What `Adapter.generate_ids` returns: the generated token ids [images, steps] (pad after a stop token)
    and, where asked for, the first step's logits [images, vocabulary] (float32), both on the cpu."""
    ids: torch.Tensor
    first_logits: torch.Tensor | None = None


def same_generation(a: Generation, b: Generation) -> bool:
    """Whether two generations are the same: the same token ids and, where both have them, bit-identical
    first-step logits. The replay check: decoded strings are too coarse (over a small vocabulary a
    changed E_post can still decode to the same words), the first step's logits move with any change of
    what the language model reads."""
    if not torch.equal(a.ids, b.ids):
        return False
    if a.first_logits is None or b.first_logits is None:
        return True
    return torch.equal(a.first_logits, b.first_logits)


def from_pretrained_kwargs() -> dict:
    """Arguments of every from_pretrained call: a local folder only, never remote code."""
    return {"local_files_only": True, "trust_remote_code": False}


def missing_checkpoint(folder, revision: str | None = None, hub: str | None = None) -> MissingCheckpointError:
    """The error for a checkpoint folder that is not there, saying how to get it: the download command
    of a hub checkpoint (`hub` + `revision`), else the stage that trains the tiny one."""
    if hub:
        how = (f"download it once on a machine with network: `hf download {hub}"
               f"{' --revision ' + revision if revision else ''} --local-dir {folder}`")
    else:
        how = "build it with `dvc repro` (the pretrain, zoo and train_connector stages write the tiny ones)"
    return MissingCheckpointError(f"{folder}: checkpoint not found; {how}")


def downloaded_revision(folder) -> str | None:
    """The hub commit a folder was downloaded at, as `hf download --local-dir` records it (the first
    line of .cache/huggingface/download/config.json.metadata); None where nothing is recorded."""
    record = Path(folder) / ".cache/huggingface/download/config.json.metadata"
    return record.read_text().split("\n", 1)[0].strip() if record.is_file() else None


def check_revision(folder, revision: str | None) -> None:
    """A pinned revision must be the one the folder was downloaded at (where the folder records it)."""
    got = downloaded_revision(folder)
    if revision and got and got != revision:
        raise ValueError(f"{folder}: downloaded at revision {got}, but params.yaml pins {revision}; download the "
                         f"pinned revision again (`hf download ... --revision {revision} --local-dir {folder}`) "
                         "or pin the one you have")


def checked_folder(folder, revision: str | None = None, hub: str | None = None) -> Path:
    """`folder` as a Path once it holds a checkpoint (config.json) at the pinned revision."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise missing_checkpoint(folder, revision, hub)
    check_revision(folder, revision)
    return folder


def image_processor_info(processor) -> dict:
    """The class and backend of the image processor in `processor`. transformers gives a checkpoint the
    torchvision backend's class where torchvision is installed (common on GPU nodes; CLIPImageProcessor) and
    the PIL one elsewhere (CLIPImageProcessorPil), and the two resize differently, so the same checkpoint and
    photograph give other pixels: vectors made with one must not be mixed with the other's."""
    image_processor = getattr(processor, "image_processor", processor)
    return {"class": type(image_processor).__name__, "backend": getattr(image_processor, "backend", None)}


def placeholder_prompt(processor, prompt: str, placeholder: str, template: str | None) -> str:
    """The user prompt with one image placeholder before it, through the checkpoint's chat `template`
    (the processor's or the tokenizer's: checkpoints keep it in either), else the placeholder alone
    (the tiny zoo, which has no prompt: `Adapter` refuses a prompt without a chat template)."""
    if template:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                             tokenize=False)
    return placeholder


class Adapter(ABC):
    family: ClassVar[str]  # registry key, e.g. "llava"
    # keys of `prepare`'s output that carry pixels; dropped when generating from a supplied E_post
    pixel_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)
    # the family's image placeholder tokens, added to a tiny model's word-level tokenizer
    special_tokens: ClassVar[tuple[str, ...]] = ()
    # tokens that end a caption besides the tokenizer's eos (e.g. Idefics2's <end_of_utterance>); passed
    # to generate explicitly, since a checkpoint's generation_config is not used
    stop_tokens: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model, processor, prompt: str = ""):
        self.model = model.eval()
        self.processor = processor
        self.prompt = prompt
        self.image_size: int | None = None
        if prompt and not self.chat_template:
            raise ValueError(f"{type(self).__name__}: a prompt ({prompt!r}) needs the checkpoint's chat template, and "
                             "this checkpoint has none (chat_template.jinja / chat_template.json / tokenizer_config); "
                             "a real checkpoint without one is incomplete: download it again")
        # What the checkpoint's generation_config suggests and the study overrides: it decodes plain greedy.
        suggested = model.generation_config.to_diff_dict() if model.generation_config is not None else {}
        self.ignored_generation = {k: suggested[k] for k in SAMPLING_KEYS if k in suggested}
        tok = self.tokenizer
        model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                                                   eos_token_id=self.stop_token_ids())

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- loading ---------------------------------------------------------------------------------
    model_class: ClassVar[type]  # the transformers *ForConditionalGeneration class

    @classmethod
    def load(cls, source, revision: str | None = None, device: str = "cpu", dtype: str = "float32",
             prompt: str = "", image_size: int | None = None, hub: str | None = None) -> "Adapter":
        """Load model + processor from a save_pretrained or `hf download --local-dir` folder.

        revision: the pinned hub commit, checked against the one the folder records; hub: the hub id,
        for the error that says how to download a missing folder; image_size: see `set_image_size`.
        """
        folder = checked_folder(source, revision, hub)
        model = cls.model_class.from_pretrained(folder, dtype=resolve_dtype(dtype), **from_pretrained_kwargs())
        adapter = cls(model.to(device), cls.load_processor(folder), prompt=prompt)
        if image_size:
            adapter.set_image_size(image_size)
        return adapter

    @classmethod
    def load_processor(cls, folder: Path):
        """The family's processor (image processor + tokenizer) from `folder`, for `load`; use
        `from_pretrained_kwargs()`. (An adapter with its own `load` needs none.)"""
        raise NotImplementedError(f"{cls.__name__} defines neither load_processor nor its own load")

    @classmethod
    def processor_info(cls, source, revision: str | None = None, hub: str | None = None) -> dict:
        """`image_processor_info` of the processor that `load` gives on this machine, without loading the
        model: the extraction's fingerprint records it (a run that only joins parts never loads a model)."""
        return image_processor_info(cls.load_processor(checked_folder(source, revision, hub)))

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)

    # -- image geometry --------------------------------------------------------------------------
    def set_image_size(self, size: int) -> None:
        """Bring every image to `size` x `size` pixels the family's way (its file says how), so that
        every image of a study has one token shape whatever its own size and aspect."""
        raise NotImplementedError(f"{type(self).__name__} does not set an image size")

    def fit(self, images: list[Image.Image]) -> list[Image.Image]:
        """The images as the processor should receive them; families whose processor cannot fix the
        size itself (Qwen keeps the aspect ratio) resize them here."""
        return images

    # -- generation settings ---------------------------------------------------------------------
    def stop_token_ids(self) -> list[int]:
        """The tokenizer's eos, then the family's stop tokens that the vocabulary has."""
        tok, vocab = self.tokenizer, self.tokenizer.get_vocab()
        ids = [tok.eos_token_id] + [vocab[t] for t in self.stop_tokens if t in vocab]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def greedy(self, max_new_tokens: int) -> GenerationConfig:
        """Plain greedy decoding: the settings every caption of the study is generated with."""
        tok = self.tokenizer
        return GenerationConfig(do_sample=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
                                eos_token_id=self.stop_token_ids(), pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id)

    def generation_settings(self, max_new_tokens: int) -> dict:
        """What `generate` decodes with, for the metrics: greedy, the stop tokens, and what the
        checkpoint's own generation_config suggested and was not used."""
        tok = self.tokenizer
        return {"decoding": "greedy", "do_sample": False, "num_beams": 1, "repetition_penalty": 1.0,
                "max_new_tokens": max_new_tokens,
                "stop_tokens": tok.convert_ids_to_tokens(self.stop_token_ids()),
                "ignored_from_checkpoint": self.ignored_generation}

    # -- the three views -------------------------------------------------------------------------
    @abstractmethod
    def connector(self) -> torch.nn.Module:
        """The connector module (the hook point): its forward input is E_pre, its output E_post."""

    def vision_encoder(self) -> torch.nn.Module:
        """The vision encoder before the connector (frozen by the LLaVA and Idefics2 zoo recipes)."""
        raise NotImplementedError(f"{type(self).__name__} does not name its vision encoder")

    @abstractmethod
    def prepare(self, images: list[Image.Image], captions: list[str] | None = None) -> dict:
        """Model inputs for the family's prompt and `images`, on the model's device.

        With `captions`, each caption follows the prompt and `labels` mark only the caption tokens
        (plus end of sequence) for the LM loss; this is what the zoo trains on.
        """

    @abstractmethod
    def encode(self, images: list[Image.Image]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-image E_pre and E_post, exactly as the model computes them internally (its dtype, on the cpu)."""

    @abstractmethod
    def connect(self, pre: list[torch.Tensor]) -> list[torch.Tensor]:
        """Re-apply the real connector to per-image E_pre (any float dtype; the result in the model's dtype, on the
        cpu); connect(encode(x)[0]) == encode(x)[1]."""

    def token_layout(self, n_pre: int, n_post: int) -> dict:
        """How the stored tokens relate, for the stages that know no family (extraction records it in
        the vector shards): `pre_to_post[t]`, the E_post token that E_pre token t goes into (None where
        the connector mixes every token into every output), `pre_raster`, the permutation that puts
        the stored E_pre tokens in raster order over the patch grid (None if they are not a square grid),
        and `connector`, the connector's kind. Here: token t -> token t where the counts match, E_pre stored
        in raster order."""
        side = math.isqrt(n_pre)
        return {"connector": self.connector_kind, "pre_to_post": list(range(n_pre)) if n_pre == n_post else None,
                "pre_raster": list(range(n_pre)) if side * side == n_pre else None}

    @torch.no_grad()
    def generate_ids(self, images: list[Image.Image], post: list[torch.Tensor] | None = None,
                     max_new_tokens: int = 24, with_logits: bool = False) -> Generation:
        """Greedy generation from the images, or from a supplied per-image E_post in the model's order: the
        new token ids and, with `with_logits`, the first step's logits (what the language model read).

        Unmodified E_post reproduces native generation token for token, logit for logit (`same_generation`).
        """
        inputs = self.prepare(images)
        kwargs = {"output_logits": True, "return_dict_in_generate": True} if with_logits else {}
        if post is not None:
            for key in self.pixel_keys:
                inputs.pop(key, None)
            pooled = tuple(p.to(self.device, self.dtype) for p in post)
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=pooled)}
        out = self.model.generate(**inputs, **kwargs, generation_config=self.greedy(max_new_tokens))
        sequences = out.sequences if with_logits else out
        logits = out.logits[0].float().cpu() if with_logits else None
        return Generation(sequences[:, inputs["input_ids"].shape[1]:].cpu(), logits)

    def generate(self, images: list[Image.Image], post: list[torch.Tensor] | None = None,
                 max_new_tokens: int = 24) -> list[str]:
        """Greedy captions (`generate_ids`, decoded without special tokens)."""
        ids = self.generate_ids(images, post, max_new_tokens).ids
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # -- the tiny zoo ------------------------------------------------------------------------------
    # Whether the family's recipe trains the vision encoder (Qwen) or keeps a pretrained one frozen
    # (LLaVA, Idefics2).
    trains_vision_encoder: ClassVar[bool] = False
    # What kind of connector the family has (mlp, resampler, merger): recorded with the vectors (token_layout)
    # so that the report can name a base's native connector without knowing the family.
    connector_kind: ClassVar[str] = "connector"
    # The pretrain product (a folder name under the zoo's pretrained models, e.g. "clip") whose
    # vision tower the family freezes; None where the family trains its own encoder.
    frozen_encoder: ClassVar[str | None] = None

    @classmethod
    def load_frozen_encoder(cls, folder: Path):
        """The pretrained vision encoder in `folder`, as `tiny(vision_encoder=...)` accepts it."""
        raise NotImplementedError(f"{cls.__name__} has no frozen pretrained encoder (frozen_encoder is None)")

    @classmethod
    @abstractmethod
    def tiny(cls, tokenizer, image_size: int, vision_encoder=None, seed: int = 0) -> "Adapter":
        """A random-init tiny model (about 0.5-3M parameters) of the family's real class, with a
        processor built around `tokenizer` (see conngeo.zoo.tokenizer). `vision_encoder`, where
        the family freezes a pretrained encoder, is what `load_frozen_encoder` returns (e.g. a
        CLIPVisionModel); its weights are copied in."""
