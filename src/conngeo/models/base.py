"""One adapter interface for every VLM family.

An adapter wraps a real transformers model and its processor and exposes the three views of an
image the study needs:

    E_pre  = vision_encoder(x)     the connector's input, one [tokens, d_vision] matrix per image
    E_post = connector(E_pre)      the connector's output, one [tokens', d_text] matrix per image
    caption = LM(E_post)

A family is one file in conngeo/models/ that subclasses `Adapter` and sets `family`; importing
conngeo.models registers every such file, so a fifth family is one new file. Family quirks (hook
point, token order, processor details, the tiny zoo config) stay inside that file.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MissingCheckpointError(FileNotFoundError):
    pass


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def from_pretrained_kwargs(source: str, revision: str | None) -> dict:
    """Arguments shared by every from_pretrained call: offline unless told otherwise, never remote code."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return {"revision": revision, "local_files_only": offline or Path(source).is_dir(), "trust_remote_code": False}


def missing_checkpoint(source: str, revision: str | None, err: Exception) -> MissingCheckpointError:
    if Path(source).exists() or source.startswith((".", "/")) or source.startswith("data/"):
        how = "build the default zoo with `dvc repro zoo` (or point `source` at a save_pretrained folder)"
    else:
        how = (f"download it once with `huggingface-cli download {source}"
               f"{' --revision ' + revision if revision else ''}` on a machine with network, "
               "then run with HF_HUB_OFFLINE=1")
    return MissingCheckpointError(f"checkpoint {source!r} (revision {revision}) not found: {how}. ({err})")


def placeholder_prompt(processor, prompt: str, placeholder: str) -> str:
    """The user prompt with one image placeholder before it: through the processor's chat template
    when it has one (real checkpoints), else `<placeholder> <prompt>` (the tiny zoo's)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{placeholder} {prompt}" if prompt else placeholder


class Adapter(ABC):
    family: ClassVar[str]  # registry key, e.g. "llava"
    # keys of `prepare`'s output that carry pixels; dropped when generating from a supplied E_post
    pixel_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)
    # the family's image placeholder tokens, added to a tiny model's word-level tokenizer
    special_tokens: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model, processor, prompt: str = ""):
        self.model = model.eval()
        self.processor = processor
        self.prompt = prompt

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- loading ---------------------------------------------------------------------------------
    model_class: ClassVar[type]  # the transformers *ForConditionalGeneration class

    @classmethod
    def load(cls, source: str, revision: str | None = None, device: str = "cpu",
             dtype: str = "float32", prompt: str = "") -> "Adapter":
        """Load model + processor from a hub id (at `revision`) or a save_pretrained folder; a
        missing one raises MissingCheckpointError saying how to fetch it."""
        looks_local = source.startswith((".", "/", "data/")) or Path(source).exists()
        if looks_local and not Path(source).is_dir():
            raise missing_checkpoint(source, revision, FileNotFoundError(f"no folder {source}"))
        try:
            model = cls.model_class.from_pretrained(source, dtype=resolve_dtype(dtype),
                                                    **from_pretrained_kwargs(source, revision))
            processor = cls.load_processor(source, revision)
        except OSError as err:
            raise missing_checkpoint(source, revision, err) from err
        return cls(model.to(device), processor, prompt=prompt)

    @classmethod
    def load_processor(cls, source: str, revision: str | None):
        """The family's processor (image processor + tokenizer) from `source`, for `load`; use
        `from_pretrained_kwargs(source, revision)`. (An adapter with its own `load` needs none.)"""
        raise NotImplementedError(f"{cls.__name__} defines neither load_processor nor its own load")

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)

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
        """Per-image E_pre and E_post, exactly as the model computes them internally (float32, cpu)."""

    @abstractmethod
    def connect(self, pre: list[torch.Tensor]) -> list[torch.Tensor]:
        """Re-apply the real connector to per-image E_pre; connect(encode(x)[0]) == encode(x)[1]."""

    @torch.no_grad()
    def generate(self, images: list[Image.Image], post: list[torch.Tensor] | None = None,
                 max_new_tokens: int = 24) -> list[str]:
        """Greedy captions from the images, or from a supplied per-image E_post in the model's order.

        Unmodified E_post reproduces native generation token for token.
        """
        inputs = self.prepare(images)
        kwargs = {}
        if post is not None:
            for key in self.pixel_keys:
                inputs.pop(key, None)
            pooled = tuple(p.to(self.device, self.dtype) for p in post)
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=pooled)}
        out = self.model.generate(**inputs, **kwargs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    # -- the tiny zoo ------------------------------------------------------------------------------
    # Whether the family's recipe trains the vision encoder (Qwen) or keeps a pretrained one frozen
    # (LLaVA, Idefics2).
    trains_vision_encoder: ClassVar[bool] = False
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
        processor built around `tokenizer` (see conngeo.models.tokenizer). `vision_encoder`, where
        the family freezes a pretrained encoder, is what `load_frozen_encoder` returns (e.g. a
        CLIPVisionModel); its weights are copied in."""
