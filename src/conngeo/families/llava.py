"""LLaVA: a CLIP vision tower, a 2-layer MLP projector (the connector), a Llama language model.

Hook point: model.model.multi_modal_projector. Its forward input is E_pre, its output E_post, both
one row per image patch in raster order (the CLS token is dropped before the projector):

    E_pre   vision_tower(x).hidden_states[vision_feature_layer][:, 1:]   ("default" strategy, layer -2)
    E_post  multi_modal_projector(E_pre)                                 one row per <image> placeholder

Prompt: where the processor has a chat template (llava-hf/llava-1.5-7b-hf does), the prompt is the
user turn [image, `prompt`] with the generation prompt, i.e. "USER: <image>\\n{prompt} ASSISTANT:";
otherwise (the tiny zoo) it is "<image>" followed by `prompt` (which may be empty). The processor
expands the single <image> into one placeholder per patch. A training caption follows the prompt
and ends with eos; `labels` are -100 everywhere else.

Tiny zoo: LLaVA keeps a pretrained CLIP vision tower frozen and trains projector + LM. `tiny`
takes that tower as a transformers CLIPVisionModel (the zoo's tiny CLIP, loaded with
CLIPVisionModel.from_pretrained) and copies its config and weights in; its images must be the
`image_size` the CLIP was trained at. The image processor uses CLIP's normalisation for that reason.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .base import Adapter, from_pretrained_kwargs, placeholder_prompt

IMAGE = "<image>"


def tiny_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """Resize to image_size x image_size (no crop) with CLIP's mean/std, as the zoo's tiny CLIP sees images."""
    return CLIPImageProcessorPil(size={"height": image_size, "width": image_size}, do_center_crop=False,
                                 image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)


def left_pad(rows: list[list[int]], targets: list[list[int]], pad_id: int) -> dict:
    """input_ids, attention_mask and labels of token rows, padded on the left (generation appends on
    the right; Llama's rotary positions are relative, so the offset changes nothing for training)."""
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, target) in enumerate(zip(rows, targets)):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        attention_mask[i, width - len(ids):] = 1
        labels[i, width - len(ids):] = torch.tensor(target)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class LlavaAdapter(Adapter):
    family = "llava"
    connector_kind = "mlp"  # the 2-layer projector
    special_tokens = (IMAGE,)
    pixel_keys = ("pixel_values",)

    model_class = LlavaForConditionalGeneration

    @classmethod
    def load_processor(cls, folder) -> LlavaProcessor:
        return LlavaProcessor.from_pretrained(folder, **from_pretrained_kwargs())

    def set_image_size(self, size: int) -> None:
        """As LLaVA-1.5's own processor: shortest edge resized to `size`, then the centre `size` x `size`
        crop. The CLIP tower's position embeddings fix the size: it must be the tower's image_size."""
        trained = self.model.config.vision_config.image_size
        if size != trained:
            raise ValueError(f"LLaVA: image_size {size} differs from the CLIP tower's {trained} px (its position "
                             f"embeddings are for {trained}); set the model's image_size to {trained}")
        ip = self.processor.image_processor
        ip.do_resize, ip.do_center_crop = True, True
        ip.size, ip.crop_size = {"shortest_edge": size}, {"height": size, "width": size}
        self.image_size = size

    # -- the three views -------------------------------------------------------------------------
    def connector(self) -> torch.nn.Module:
        return self.model.model.multi_modal_projector

    def vision_encoder(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    def prompt_text(self) -> str:
        """The prompt with one <image> placeholder (see the module docstring)."""
        return placeholder_prompt(self.processor, self.prompt, IMAGE, self.chat_template)

    def prepare(self, images: list[Image.Image], captions: list[str] | None = None) -> dict:
        """input_ids and attention_mask (prompt, then caption + eos when given; left-padded),
        pixel_values and, with captions, labels on the caption tokens and eos only."""
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
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def encode(self, images: list[Image.Image]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pixels = self.processor.image_processor(images=self.fit(images), return_tensors="pt")["pixel_values"]
        seen = {}

        def hook(module, args, output):
            seen["pre"], seen["post"] = args[0], output

        handle = self.connector().register_forward_hook(hook)
        try:
            self.model.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        finally:
            handle.remove()
        return list(seen["pre"].cpu()), list(seen["post"].cpu())

    @torch.no_grad()
    def connect(self, pre: list[torch.Tensor]) -> list[torch.Tensor]:
        projector = self.connector()
        if len({tuple(p.shape) for p in pre}) == 1:
            post = projector(torch.stack(pre).to(self.device, self.dtype))
        else:  # the projector is per token: images of different sizes go one by one
            post = [projector(p.to(self.device, self.dtype)) for p in pre]
        return [p.cpu() for p in post]

    # -- the tiny zoo ------------------------------------------------------------------------------
    frozen_encoder = "clip"

    @classmethod
    def load_frozen_encoder(cls, folder: Path) -> CLIPVisionModel:
        """The vision tower of the zoo's tiny CLIP (a CLIPModel save_pretrained folder)."""
        return CLIPVisionModel.from_pretrained(folder)

    @classmethod
    def tiny(cls, tokenizer, image_size: int, vision_encoder: CLIPVisionModel | None = None, seed: int = 0,
             patch_size: int = 8, text_width: int = 128, text_depth: int = 2) -> "LlavaAdapter":
        """A random-init tiny LLaVA (about 0.9M parameters at image_size 48).

        `vision_encoder`: a CLIPVisionModel (the zoo's frozen pretrained tiny CLIP) whose config and
        weights become the vision tower; its image_size must equal `image_size`. Without it the
        tower is a random CLIP of the same shape as the zoo's (width 128, 4 layers, `patch_size`).
        """
        if IMAGE not in tokenizer.get_vocab():
            raise ValueError(f"the tokenizer lacks {IMAGE}: build it with "
                             f"build_tokenizer(words, {cls.__name__}.special_tokens)")
        if vision_encoder is not None:
            if not isinstance(vision_encoder, CLIPVisionModel):
                raise TypeError("vision_encoder must be a transformers CLIPVisionModel, "
                                f"not {type(vision_encoder).__name__}")
            vision_config = vision_encoder.config
            if vision_config.image_size != image_size:
                raise ValueError(f"the vision encoder was built for {vision_config.image_size} px images, "
                                 f"not {image_size}")
        else:
            vision_config = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                             num_attention_heads=4, image_size=image_size, patch_size=patch_size)
        patches = (image_size // vision_config.patch_size) ** 2
        config = LlavaConfig(
            vision_config=vision_config.to_dict(),
            text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=text_width,
                             intermediate_size=2 * text_width, num_hidden_layers=text_depth,
                             num_attention_heads=text_width // 32, num_key_value_heads=max(1, text_width // 64),
                             max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE), image_seq_length=patches,
            vision_feature_layer=-2, vision_feature_select_strategy="default")
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
        if vision_encoder is not None:
            model.model.vision_tower.load_state_dict(vision_encoder.state_dict())
        # num_additional_image_tokens=1: the CLS token, which the "default" strategy then drops
        processor = LlavaProcessor(image_processor=tiny_image_processor(image_size), tokenizer=tokenizer,
                                   patch_size=vision_config.patch_size, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1)
        return cls(model, processor)
