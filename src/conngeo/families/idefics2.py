"""Idefics2: a SigLIP-like vision transformer, a connector (modality projection + perceiver
resampler), a Mistral language model.

Hook point: model.model.connector. Its forward input is E_pre, its output E_post:

    E_pre   vision_model(x).last_hidden_state (after post_layernorm), one row per patch of the
            image in raster order; patches the image processor added as padding are left out
    E_post  connector(E_pre): resampler_n_latents rows per image, whatever the image's size

The connector attends only to an image's real patches, so `connect` re-applies it to the stored
E_pre with an all-ones mask and gets the same E_post.

Processor: Idefics2Processor with do_image_splitting=False (one view per image, so one block of
latents per image; `load` switches splitting off for real checkpoints too). Prompt: the chat
template where the processor has one (HuggingFaceM4/idefics2-8b: "User:<image>{prompt}
<end_of_utterance>\\nAssistant:"), else "<image>" followed by `prompt` (the tiny zoo). The
processor expands <image> to <fake_token_around_image> <image>*n_latents <fake_token_around_image>.
A training caption follows the prompt and ends with eos; `labels` are -100 everywhere else.

Gotchas handled here:
- Idefics2's _init_weights sets the perceiver latents to ones, so every latent is the same query
  and E_post has rank 1 (training cannot break the symmetry): `tiny` re-draws them normal(std=1).
- get_image_features silently drops images whose pixel_values are all exactly 0 (it takes them for
  padding); `encode` raises instead of returning fewer images than it was given.
- Idefics2Processor re-registers the tokenizer's extra special tokens (dropping <image> and
  <fake_token_around_image> from the list, not from the vocabulary); they are registered again
  so that decoding skips them.

Tiny zoo: Idefics2 keeps a pretrained vision encoder frozen and trains connector + LM. Its tower
is SigLIP's architecture (no CLS token, no pre-layernorm, patch embedding with bias), so `tiny`
copies weights exactly from a transformers SiglipVisionModel (or an Idefics2VisionTransformer).
A CLIPVisionModel is refused: its CLS token and pre-layernorm have no place in this tower, so a
copy would not compute what the CLIP computes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import (CLIPVisionModel, Idefics2Config, Idefics2ForConditionalGeneration,
                          Idefics2ImageProcessorPil, Idefics2Processor, SiglipVisionModel)
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

from .base import Adapter, from_pretrained_kwargs, placeholder_prompt

FAKE_IMAGE, IMAGE, END_OF_UTTERANCE = "<fake_token_around_image>", "<image>", "<end_of_utterance>"
# copied from the encoder into the Idefics2 vision config; everything else keeps Idefics2's defaults
VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                 "image_size", "patch_size", "hidden_act", "layer_norm_eps")


def tiny_image_processor(image_size: int) -> Idefics2ImageProcessorPil:
    """Resize to image_size x image_size, SigLIP's mean/std (0.5), no splitting."""
    return Idefics2ImageProcessorPil(size={"height": image_size, "width": image_size}, do_image_splitting=False,
                                     image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD)


def register_image_tokens(tokenizer) -> None:
    """Mark the image tokens special again after Idefics2Processor replaced the list (vocab unchanged)."""
    present = [t for t in (FAKE_IMAGE, IMAGE, END_OF_UTTERANCE) if t in tokenizer.get_vocab()]
    tokenizer.add_special_tokens({"additional_special_tokens": present}, replace_extra_special_tokens=False)


def left_pad(rows: list[list[int]], targets: list[list[int]], pad_id: int) -> dict:
    """input_ids, attention_mask and labels of token rows, padded on the left (generation appends on
    the right; Mistral's rotary positions are relative, so the offset changes nothing for training)."""
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, target) in enumerate(zip(rows, targets)):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        attention_mask[i, width - len(ids):] = 1
        labels[i, width - len(ids):] = torch.tensor(target)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def vision_weights(vision_encoder) -> tuple[dict, dict]:
    """(config fields, state dict) of a pretrained encoder, in Idefics2VisionTransformer's names."""
    if isinstance(vision_encoder, SiglipVisionModel):  # also SiglipModel(...).vision_model
        # its attention-pooling head has no counterpart in Idefics2 (the connector pools instead)
        state = {k: v for k, v in vision_encoder.state_dict().items() if not k.startswith("head.")}
    elif isinstance(vision_encoder, Idefics2VisionTransformer):
        state = vision_encoder.state_dict()
    elif isinstance(vision_encoder, CLIPVisionModel):
        raise TypeError("Idefics2's vision tower is SigLIP's architecture: a CLIPVisionModel's CLS token and "
                        "pre-layernorm have no place in it, so its weights cannot be copied faithfully. Pass a "
                        "pretrained transformers SiglipVisionModel (or an Idefics2VisionTransformer) instead.")
    else:
        raise TypeError(f"vision_encoder must be a SiglipVisionModel or Idefics2VisionTransformer, "
                        f"not {type(vision_encoder).__name__}")
    config = vision_encoder.config
    return {f: getattr(config, f) for f in VISION_FIELDS}, state


class Idefics2Adapter(Adapter):
    family = "idefics2"
    connector_kind = "resampler"  # projection + perceiver
    special_tokens = (FAKE_IMAGE, IMAGE, END_OF_UTTERANCE)
    stop_tokens = (END_OF_UTTERANCE,)  # the end of an assistant turn in its chat format
    pixel_keys = ("pixel_values", "pixel_attention_mask")

    model_class = Idefics2ForConditionalGeneration

    @classmethod
    def load_processor(cls, folder) -> Idefics2Processor:
        processor = Idefics2Processor.from_pretrained(folder, **from_pretrained_kwargs())
        processor.image_processor.do_image_splitting = False  # one block of latents per image
        register_image_tokens(processor.tokenizer)
        return processor

    def set_image_size(self, size: int) -> None:
        """longest = shortest edge = `size`, splitting off: Idefics2's resize then gives every image
        `size` x `size` pixels, aspect not kept (as in "Lost in Embeddings", Li et al. 2025, at 336:
        24 x 24 = 576 patches -> the resampler's latents)."""
        ip = self.processor.image_processor
        ip.do_resize, ip.do_image_splitting = True, False
        ip.size = {"longest_edge": size, "shortest_edge": size}
        self.image_size = size

    # -- the three views -------------------------------------------------------------------------
    def connector(self) -> torch.nn.Module:
        return self.model.model.connector

    def vision_encoder(self) -> torch.nn.Module:
        return self.model.model.vision_model

    def prompt_text(self) -> str:
        """The prompt with one <image> placeholder (see the module docstring)."""
        return placeholder_prompt(self.processor, self.prompt, IMAGE, self.chat_template)

    def prepare(self, images: list[Image.Image], captions: list[str] | None = None) -> dict:
        """input_ids and attention_mask (prompt, then caption + eos when given; left-padded),
        pixel_values [B, 1, 3, H, W], pixel_attention_mask and, with captions, labels on the
        caption tokens and eos only."""
        if captions is not None and len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        inputs = self.processor(images=self.fit(images), text=[self.prompt_text()] * len(images), return_tensors="pt")
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        if captions is not None:
            tok = self.tokenizer
            rows, targets = [], []
            for ids, mask, caption in zip(inputs["input_ids"], inputs["attention_mask"], captions):
                prompt = ids[mask.bool()].tolist()
                answer = tok(caption, add_special_tokens=False).input_ids + [tok.eos_token_id]
                rows.append(prompt + answer)
                targets.append([-100] * len(prompt) + answer)
            batch = left_pad(rows, targets, tok.pad_token_id)
        batch["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        batch["pixel_attention_mask"] = inputs["pixel_attention_mask"]
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def encode(self, images: list[Image.Image]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        vision = self.processor.image_processor(images=[[image] for image in self.fit(images)], return_tensors="pt")
        seen = {}

        def hook(module, args, kwargs, output):
            seen["pre"], seen["mask"], seen["post"] = args[0], kwargs["attention_mask"], output

        handle = self.connector().register_forward_hook(hook, with_kwargs=True)
        try:
            self.model.model.get_image_features(vision["pixel_values"].to(self.device, self.dtype),
                                                vision["pixel_attention_mask"].to(self.device))
        finally:
            handle.remove()
        if seen["post"].shape[0] != len(images):
            raise ValueError(f"Idefics2 dropped {len(images) - seen['post'].shape[0]} of {len(images)} images "
                             "whose pixel_values were all zero (it takes them for padding)")
        pre, mask = seen["pre"].cpu(), seen["mask"].bool().cpu()
        return [p[m] for p, m in zip(pre, mask)], list(seen["post"].cpu())

    def token_layout(self, n_pre: int, n_post: int) -> dict:
        """The perceiver mixes every patch into every latent: no token correspondence."""
        return {**super().token_layout(n_pre, n_post), "pre_to_post": None}

    @torch.no_grad()
    def connect(self, pre: list[torch.Tensor]) -> list[torch.Tensor]:
        connector = self.connector()

        def run(stack: torch.Tensor) -> torch.Tensor:
            mask = torch.ones(stack.shape[:2], dtype=torch.bool, device=self.device)
            return connector(stack.to(self.device, self.dtype), attention_mask=mask).cpu()

        if len({tuple(p.shape) for p in pre}) == 1:
            return list(run(torch.stack(pre)))
        return [run(p[None])[0] for p in pre]  # images of different sizes: one by one

    # -- the tiny zoo ------------------------------------------------------------------------------
    frozen_encoder = "siglip"

    @classmethod
    def load_frozen_encoder(cls, folder: Path) -> SiglipVisionModel:
        """The vision tower of the zoo's tiny SigLIP (a SiglipModel save_pretrained folder)."""
        return SiglipVisionModel.from_pretrained(folder)

    @classmethod
    def tiny(cls, tokenizer, image_size: int, vision_encoder=None, seed: int = 0, patch_size: int = 8,
             text_width: int = 128, text_depth: int = 2, latents: int = 16,
             resampler_depth: int = 2, text_init: float = 0.1) -> "Idefics2Adapter":
        """A random-init tiny Idefics2 (about 1.5M parameters at image_size 48).

        `text_init` is the initializer_range of the connector and language model: 0.1 rather than
        transformers' 0.02, which at width 128 left the zoo's captioner learning slower (held-out
        food kinds 44% vs 49% after the same 1500 steps).

        `vision_encoder`: a transformers SiglipVisionModel (or Idefics2VisionTransformer), the zoo's
        frozen pretrained encoder, whose config and weights become the vision tower exactly; its
        image_size must equal `image_size` and it should have been trained on images normalised
        with mean = std = 0.5 (SiglipImageProcessor's default, which this processor uses). A
        CLIPVisionModel raises TypeError (see the module docstring). Without it the tower is random:
        width 128, 4 layers, `patch_size`.
        """
        missing = [t for t in cls.special_tokens if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"the tokenizer lacks {missing}: build it with "
                             f"build_tokenizer(words, {cls.__name__}.special_tokens)")
        state = None
        if vision_encoder is not None:
            vision_config, state = vision_weights(vision_encoder)
            if vision_config["image_size"] != image_size:
                raise ValueError(f"the vision encoder was built for {vision_config['image_size']} px images, "
                                 f"not {image_size}")
        else:
            vision_config = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                                 image_size=image_size, patch_size=patch_size)
        heads = text_width // 32
        config = Idefics2Config(
            vision_config=vision_config,
            perceiver_config=dict(hidden_size=text_width, resampler_n_latents=latents,
                                  resampler_depth=resampler_depth, resampler_n_heads=heads, resampler_head_dim=32,
                                  num_key_value_heads=max(1, heads // 2), initializer_range=text_init),
            text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=text_width,
                             intermediate_size=2 * text_width, num_hidden_layers=text_depth, num_attention_heads=heads,
                             num_key_value_heads=max(1, heads // 2), max_position_embeddings=512,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, initializer_range=text_init),
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE))
        torch.manual_seed(seed)
        model = Idefics2ForConditionalGeneration(config)
        with torch.no_grad():  # _init_weights left them all ones: every latent the same query
            model.model.connector.perceiver_resampler.latents.normal_(0.0, 1.0)
        if state is not None:
            model.model.vision_model.load_state_dict(state)
        processor = Idefics2Processor(tiny_image_processor(image_size), tokenizer, image_seq_len=latents)
        register_image_tokens(processor.tokenizer)
        return cls(model, processor)
