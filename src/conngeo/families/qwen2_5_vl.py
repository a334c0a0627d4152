"""Qwen2.5-VL: a windowed-attention ViT, a 2x2 patch merger (the connector), a Qwen2 language model.

Hook point: model.model.visual.merger. Its forward input is E_pre (one row per ViT patch, all images
of a batch flat), its output E_post (one row per 2x2 group of patches, a "merge unit").

Token order, as stored by `encode` and expected by `connect` and `generate`:

    E_pre   the image processor's patch order: merge unit by merge unit in raster order over the
            merged grid, and inside a unit its 2x2 patches in raster order; pre tokens = t*h*w.
    E_post  the language model's order: one row per merge unit, raster order over the merged grid
            (t, h/2, w/2); post tokens = t*h*w / 4. This is what the LM's image placeholders receive.

So E_pre row 4j..4j+3 are exactly the four patches merged into E_post row j, and connect(E_pre) is
the merger applied as is. Inside the vision tower the merge units run in *window order* (all units
of a window together) wherever window attention is used: the hook sees that order and the model
itself only restores the LM order after the merger (argsort(window_index)). `encode` applies the
same restoring permutation to both the hook's input and output. `raster_order` gives the
permutation from the stored order to plain raster order (row by row over the patch grid) for patch
maps; E_post is already in raster order over the merged grid.

Processor: Qwen2_5_VLProcessor needs torchvision (for its video slot), which does not import beside
the CPU torch here. The adapter's processor is `QwenProcessor`: the pure-PIL image processor
(Qwen2VLImageProcessorPil) plus the tokenizer, both saved into the checkpoint folder
(preprocessor_config.json, tokenizer.json, tokenizer_config.json); `load` reads both from there.
The prompt's ids are built here: the chat template where the checkpoint has one (its single
<|image_pad|> expanded to the image's token count), else <|vision_start|> <|image_pad|>*n
<|vision_end|> alone (the tiny zoo, which has no prompt). `mm_token_type_ids` marks the image pads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image
from transformers import (AutoTokenizer, PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.vision_utils import get_vision_window_index

from .base import Adapter, from_pretrained_kwargs

VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"
IM_END, END_OF_TEXT = "<|im_end|>", "<|endoftext|>"
# Tokenizer classes that mean "the word-level tokenizer of conngeo.zoo.tokenizer": load them as
# they are, because AutoTokenizer would pick the family's own class from config.json's model_type
# and tokenize the custom vocabulary differently (Qwen3_5Tokenizer does).
GENERIC_TOKENIZERS = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def raster_order(grid_thw, merge_size: int, merged: bool = False) -> torch.Tensor:
    """Permutation from the stored token order of one image to raster order: `pre[perm]` lists the
    patches frame by frame, row by row (index t*h*w + row*w + col).

    `grid_thw` is the image's (t, h, w) patch grid (a row of `image_grid_thw`). E_pre is stored
    merge unit by merge unit, so its permutation regroups units into rows; with `merged=True` (for
    E_post, already raster over the (t, h/m, w/m) merged grid) it is the identity.
    """
    t, h, w = (int(v) for v in grid_thw)
    if merged:
        return torch.arange(t * (h // merge_size) * (w // merge_size))
    stored = torch.arange(t * h * w).view(t, h // merge_size, w // merge_size, merge_size, merge_size)
    return stored.permute(0, 1, 3, 2, 4).reshape(-1)


class QwenProcessor:
    """The image processor and tokenizer of a Qwen VLM, standing in for Qwen2_5_VLProcessor."""

    def __init__(self, image_processor: Qwen2VLImageProcessorPil, tokenizer, chat_template: str | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template

    def save_pretrained(self, folder) -> None:
        self.image_processor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        if self.chat_template and not self.tokenizer.chat_template:
            (Path(folder) / "chat_template.jinja").write_text(self.chat_template)


def load_qwen_processor(folder) -> QwenProcessor:
    """Image processor + tokenizer (+ chat template) from a checkpoint folder."""
    folder, kwargs = Path(folder), from_pretrained_kwargs()
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder, **kwargs)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    if tokenizer_config.get("tokenizer_class") in GENERIC_TOKENIZERS:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, **kwargs)
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    template = tokenizer.chat_template
    if template is None:  # checkpoints keep it in chat_template.jinja or, older ones, chat_template.json
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        elif (folder / "chat_template.json").is_file():
            template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    return QwenProcessor(image_processor, tokenizer, template)


def tiny_image_processor(image_size: int, patch_size: int, merge_size: int = 2,
                         temporal_patch_size: int = 2) -> Qwen2VLImageProcessorPil:
    """Every image is resized (aspect kept) to about image_size^2 pixels, in multiples of
    patch_size*merge_size, so a square image_size image keeps its size: 48 px, patch 8 -> 6x6 grid."""
    return Qwen2VLImageProcessorPil(min_pixels=image_size ** 2, max_pixels=image_size ** 2, patch_size=patch_size,
                                    merge_size=merge_size, temporal_patch_size=temporal_patch_size,
                                    image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)  # as the real ones


class Qwen2_5_VLAdapter(Adapter):
    family = "qwen2.5vl"
    connector_kind = "merger"  # 2x2 patch merger
    model_class: ClassVar[type] = Qwen2_5_VLForConditionalGeneration
    special_tokens = (VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD)
    stop_tokens = (IM_END, END_OF_TEXT)  # the end of an assistant turn, the end of text
    trains_vision_encoder = True  # Qwen trains encoder, merger and LM together

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load_processor(cls, folder) -> QwenProcessor:
        return load_qwen_processor(folder)

    def set_image_size(self, size: int) -> None:
        """Every image is resized to `size` x `size` first (Qwen's processor alone keeps the aspect
        ratio, so a photo's token count would follow its shape), and min_pixels = max_pixels =
        size^2 caps the processor too, so that no photo can ask for more tokens than that. `size`
        must be a multiple of patch_size * merge_size (28 for Qwen2.5-VL: 336 -> 24 x 24 = 576
        patches -> 144 tokens; 32 for Qwen3.5: 384 -> the same counts)."""
        ip = self.processor.image_processor
        unit = ip.patch_size * ip.merge_size
        if size % unit:
            raise ValueError(f"{self.family}: image_size {size} is not a multiple of patch_size * merge_size = {unit}; "
                             f"choose e.g. {round(size / unit) * unit}")
        ip.size = {"shortest_edge": size * size, "longest_edge": size * size}
        self.image_size = size

    def fit(self, images: list[Image.Image]) -> list[Image.Image]:
        if self.image_size is None:
            return list(images)
        side = (self.image_size, self.image_size)
        return [im if im.size == side else im.resize(side, Image.Resampling.BICUBIC) for im in images]

    # -- the three views -------------------------------------------------------------------------
    def connector(self) -> torch.nn.Module:
        return self.model.model.visual.merger

    def vision_encoder(self) -> torch.nn.Module:
        """The whole vision tower, merger included (Qwen has no separate encoder module)."""
        return self.model.model.visual

    @property
    def merge_size(self) -> int:
        return self.model.config.vision_config.spatial_merge_size

    def raster_order(self, grid_thw, merged: bool = False) -> torch.Tensor:
        """`raster_order` for this model's merge size (see the module docstring)."""
        return raster_order(grid_thw, self.merge_size, merged)

    def token_layout(self, n_pre: int, n_post: int) -> dict:
        """E_pre is stored merge unit by merge unit: rows 4j..4j+3 go into E_post row j (module docstring)."""
        unit, side = self.merge_size ** 2, math.isqrt(n_pre)
        return {"connector": self.connector_kind, "pre_to_post": [t // unit for t in range(n_pre)],
                "pre_raster": self.raster_order((1, side, side)).tolist() if side * side == n_pre else None}

    def unit_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Permutation from the merger's (window) order of merge units to the LM's order, for all
        images of a batch together; None where the two agree."""
        vision = self.model.model.visual
        window_index, _ = get_vision_window_index(grid_thw.cpu(), spatial_merge_size=vision.spatial_merge_size,
                                                  window_size=vision.window_size, patch_size=vision.patch_size)
        return torch.argsort(window_index)

    def prompt_ids(self, n_image_tokens: int) -> list[int]:
        """Token ids of the prompt for one image with `n_image_tokens` placeholders."""
        tok = self.tokenizer
        pad = tok.convert_tokens_to_ids(IMAGE_PAD)
        template = self.chat_template
        if template is None:  # the tiny zoo: the vision tokens alone (a prompt needs a chat template)
            ids = [tok.convert_tokens_to_ids(VISION_START), pad, tok.convert_tokens_to_ids(VISION_END)]
        else:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
            text = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False)
            ids = tok(text, add_special_tokens=False).input_ids
        if ids.count(pad) != 1:
            raise ValueError(f"the prompt must hold exactly one {IMAGE_PAD} token, found {ids.count(pad)}")
        at = ids.index(pad)
        return ids[:at] + [pad] * n_image_tokens + ids[at + 1:]

    def prepare(self, images: list[Image.Image], captions: list[str] | None = None) -> dict:
        """input_ids (prompt, then caption + eos when given), left-padded, with attention_mask,
        mm_token_type_ids (1 on image pads), pixel_values, image_grid_thw and, with captions, labels."""
        if captions is not None and len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        tok = self.tokenizer
        vision = self.processor.image_processor(images=self.fit(images), return_tensors="pt")
        pad = tok.convert_tokens_to_ids(IMAGE_PAD)
        rows, targets = [], []
        for i, thw in enumerate(vision["image_grid_thw"]):
            ids = self.prompt_ids(int(thw.prod()) // self.merge_size ** 2)
            target = [-100] * len(ids)
            if captions is not None:
                caption = tok(captions[i], add_special_tokens=False).input_ids + [tok.eos_token_id]
                ids, target = ids + caption, target + caption
            rows.append(ids)
            targets.append(target)
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (ids, target) in enumerate(zip(rows, targets)):  # left padding: generation appends on the right
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            attention_mask[i, width - len(ids):] = 1
            labels[i, width - len(ids):] = torch.tensor(target)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "mm_token_type_ids": ((input_ids == pad) & (attention_mask == 1)).long(),
                 "pixel_values": vision["pixel_values"].to(self.dtype), "image_grid_thw": vision["image_grid_thw"]}
        if captions is not None:
            batch["labels"] = labels
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def encode(self, images: list[Image.Image]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        vision = self.processor.image_processor(images=self.fit(images), return_tensors="pt")
        grid = vision["image_grid_thw"].to(self.device)
        seen = {}

        def hook(module, args, output):
            seen["pre"], seen["post"] = args[0], output

        handle = self.connector().register_forward_hook(hook)
        try:
            self.model.model.get_image_features(vision["pixel_values"].to(self.device, self.dtype), grid)
        finally:
            handle.remove()
        unit = self.merge_size ** 2
        pre, post = seen["pre"].cpu(), seen["post"].cpu()
        order = self.unit_order(grid)
        if order is not None:
            pre = pre.view(-1, unit, pre.shape[-1])[order].reshape(-1, pre.shape[-1])
            post = post[order]
        counts = grid.prod(-1).cpu().tolist()
        return list(pre.split(counts)), list(post.split([c // unit for c in counts]))

    @torch.no_grad()
    def connect(self, pre: list[torch.Tensor]) -> list[torch.Tensor]:
        unit = self.merge_size ** 2
        post = self.connector()(torch.cat(pre).to(self.device, self.dtype)).cpu()
        return list(post.split([p.shape[0] // unit for p in pre]))

    # -- the tiny zoo ------------------------------------------------------------------------------
    @classmethod
    def tiny_config(cls, tokenizer, image_size: int, patch_size: int = 8, vision_width: int = 96,
                    vision_depth: int = 2, text_width: int = 128, text_depth: int = 2,
                    vision_init: float = 0.1, text_init: float = 0.1):
        """Window attention in block 0 (windows of 2x2 merge units), full attention in the last block,
        as in the real model's mix. head_dim 32 -> mrope_section sums to 16.

        `vision_init` / `text_init` are the towers' initializer_range: 0.1 rather than transformers'
        0.02, which at these widths (96, 128) leaves every residual branch near zero; the zoo's
        from-scratch ViT then learned about half as fast (held-out food kinds after 1500 caption
        steps: 29% at 0.02/0.02, 34% with vision 0.1, 42% with both 0.1; 0.05 and 0.2 did worse)."""
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in cls.special_tokens}
        return Qwen2_5_VLConfig(
            vision_config=dict(depth=vision_depth, hidden_size=vision_width, intermediate_size=2 * vision_width,
                               num_heads=vision_width // 32, patch_size=patch_size, spatial_merge_size=2,
                               temporal_patch_size=2, window_size=4 * patch_size, out_hidden_size=text_width,
                               fullatt_block_indexes=[vision_depth - 1], initializer_range=vision_init),
            text_config=dict(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
                             num_hidden_layers=text_depth, num_attention_heads=text_width // 32,
                             num_key_value_heads=max(1, text_width // 64), max_position_embeddings=512,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [4, 6, 6]},
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, initializer_range=text_init),
            image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
            vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END])

    @classmethod
    def tiny(cls, tokenizer, image_size: int, vision_encoder=None, seed: int = 0,
             patch_size: int = 8, **config) -> "Qwen2_5_VLAdapter":
        """A random-init tiny model; `vision_encoder` is ignored (Qwen trains its own jointly).
        `config` goes to `tiny_config` (vision_width, vision_depth, text_width, text_depth)."""
        missing = [t for t in cls.special_tokens if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"the tokenizer lacks {missing}: build it with "
                             f"build_tokenizer(words, {cls.__name__}.special_tokens)")
        if image_size % (2 * patch_size):
            raise ValueError(f"image_size {image_size} must be a multiple of 2 * patch_size = {2 * patch_size}")
        torch.manual_seed(seed)
        model = cls.model_class(cls.tiny_config(tokenizer, image_size, patch_size=patch_size, **config))
        processor = QwenProcessor(tiny_image_processor(image_size, patch_size), tokenizer)
        return cls(model, processor)
