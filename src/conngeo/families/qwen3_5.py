"""Qwen3.5: a full-attention ViT with learned (interpolated) position embeddings, a 2x2 patch merger
(the connector), and a hybrid language model (Gated DeltaNet linear-attention layers between
full-attention layers, partial rotary M-RoPE).

Everything the adapter does on the image side is Qwen2.5-VL's (conngeo.families.qwen2_5_vl: hook at
model.model.visual.merger, the PIL image processor + tokenizer as processor, prompt ids built by
hand, the same stored token order), so this file holds only what differs:

- no window attention: the merger already sees merge units in the LM's order, so `encode` stores
  the hook's input and output as they are (E_pre: merge unit by merge unit, raster over the merged
  grid, 2x2 patches inside; E_post: raster over the merged grid). `raster_order` is unchanged.
- the tiny config: partial_rotary_factor 0.25 rotates a quarter of each head, so mrope_section
  sums to head_dim * 0.25 / 2; the vision tower's position table has one entry per patch of an
  image_size image (no interpolation at the zoo's size); layers alternate linear / full attention.
"""

from __future__ import annotations

import torch
from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

from .qwen2_5_vl import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, Qwen2_5_VLAdapter


class Qwen3_5Adapter(Qwen2_5_VLAdapter):
    family = "qwen3.5"
    model_class = Qwen3_5ForConditionalGeneration

    def unit_order(self, grid_thw: torch.Tensor) -> None:
        return None  # no window attention: the merger works in the LM's order

    @classmethod
    def tiny_config(cls, tokenizer, image_size: int, patch_size: int = 8, vision_width: int = 96,
                    vision_depth: int = 2, text_width: int = 128, text_depth: int = 2,
                    vision_init: float = 0.1, text_init: float = 0.1):
        """As Qwen2_5_VLAdapter.tiny_config (initializer ranges included), with Qwen3.5's towers."""
        head_dim = 32
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in cls.special_tokens}
        return Qwen3_5Config(
            vision_config=dict(depth=vision_depth, hidden_size=vision_width, intermediate_size=2 * vision_width,
                               num_heads=vision_width // 32, patch_size=patch_size, spatial_merge_size=2,
                               temporal_patch_size=2, out_hidden_size=text_width,
                               num_position_embeddings=(image_size // patch_size) ** 2, initializer_range=vision_init),
            text_config=dict(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
                             num_hidden_layers=text_depth, num_attention_heads=text_width // head_dim,
                             num_key_value_heads=max(1, text_width // 64), head_dim=head_dim,
                             max_position_embeddings=512, full_attention_interval=2,
                             linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=head_dim,
                             linear_value_head_dim=head_dim, linear_conv_kernel_dim=4,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.25, "mrope_interleaved": True,
                                              "mrope_section": [2, 1, 1]},  # sums to 32 * 0.25 / 2
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, initializer_range=text_init),
            image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
            vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END])
