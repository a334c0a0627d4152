"""A tiny pretrained SigLIP for the default study: the frozen vision encoder of the tiny Idefics2.

Idefics2's vision tower is SigLIP's architecture (no CLS token, no pre-layernorm), so its frozen
encoder is a real transformers SiglipModel trained on the toy world, at about 1.2M parameters;
SiglipVisionModel.from_pretrained(folder) loads its vision tower, which Idefics2Adapter.tiny copies
in exactly.

Recipe: SiglipModel's own pairwise sigmoid loss (return_loss=True; Zhai et al. 2023) on
(image, caption) batches, with the paper's initial temperature and bias (t' = log 10, b = -10) in
place of transformers' zeros. Two details follow the real checkpoints:
    - the text tower pools the hidden state at the *last* position, so every text is the caption
      plus </s>, padded on the left to a fixed length: </s> always sits at the pooled position.
    - images are normalised with mean = std = 0.5 (SiglipImageProcessor's default), which the
      Idefics2 processor uses too, so the frozen encoder sees there what it was trained on.

Deterministic for a fixed seed; batches and the schedule are the tiny CLIP's (conngeo.zoo.pretrain).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import processors
from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipProcessor
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

from .pretrain import Log, top1_retrieval, train_image_text


def siglip_image_processor(image_size: int) -> SiglipImageProcessorPil:
    """Resize to image_size x image_size, mean = std = 0.5 (as Idefics2's processor normalises)."""
    return SiglipImageProcessorPil(size={"height": image_size, "width": image_size},
                                   image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD)


def siglip_text_tokenizer(tokenizer, max_length: int):
    """A copy of the word-level tokenizer that ends each text with </s> and pads on the left to
    `max_length` by default: SigLIP's text tower pools the last position, which is then </s>."""
    tok = copy.deepcopy(tokenizer)
    eos = tok.eos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tok.eos_token_id)])
    tok.padding_side = "left"
    tok.model_max_length = max_length
    return tok


def tiny_siglip(tokenizer, image_size: int = 48, patch_size: int = 8, hidden_size: int = 128,
                num_layers: int = 4, max_text_length: int = 16, seed: int = 0) -> tuple[SiglipModel, SiglipProcessor]:
    """A random-init tiny SiglipModel (about 1.2M parameters at the defaults) and its processor,
    whose text side is `siglip_text_tokenizer(tokenizer, max_text_length)`."""
    text_tokenizer = siglip_text_tokenizer(tokenizer, max_text_length)
    tower = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                 num_attention_heads=max(1, hidden_size // 32))
    config = SiglipConfig(
        text_config=dict(**tower, vocab_size=len(text_tokenizer), max_position_embeddings=max_text_length,
                         pad_token_id=text_tokenizer.pad_token_id, bos_token_id=text_tokenizer.bos_token_id,
                         eos_token_id=text_tokenizer.eos_token_id),
        vision_config=dict(**tower, image_size=image_size, patch_size=patch_size))
    torch.manual_seed(seed)
    model = SiglipModel(config)
    with torch.no_grad():  # the paper's initialisation; transformers' _init_weights leaves both at 0
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    processor = SiglipProcessor(image_processor=siglip_image_processor(image_size), tokenizer=text_tokenizer)
    return model, processor


def siglip_text_inputs(processor: SiglipProcessor, captions: list[str]) -> dict:
    """input_ids and attention_mask of captions, each ending in </s> at the last position."""
    tok = processor.tokenizer
    longest = max(len(ids) for ids in tok(list(captions)).input_ids)
    if longest > tok.model_max_length:
        raise ValueError(f"a caption has {longest} tokens with </s>, more than max_text_length "
                         f"{tok.model_max_length}: raise max_text_length")
    return tok(list(captions), padding="max_length", max_length=tok.model_max_length, return_tensors="pt")


def train_tiny_siglip(images: list[Image.Image], captions: list[str], tokenizer, image_size: int = 48,
                      steps: int = 600, batch_size: int = 64, lr: float = 1e-3, seed: int = 0, log: Log = None,
                      **config) -> tuple[SiglipModel, SiglipProcessor]:
    """Train a tiny SigLIP with its sigmoid loss (SiglipModel's return_loss) on (image, caption) pairs.

    `tokenizer` is the world's word-level tokenizer (conngeo.zoo.tokenizer.build_tokenizer);
    `config` goes to `tiny_siglip` (patch_size, hidden_size, num_layers, ...). Returns the model in
    eval mode and its SiglipProcessor; save both with save_pretrained into one folder.
    """
    if not images or len(images) != len(captions):
        raise ValueError(f"need matching, non-empty images and captions; got {len(images)} and {len(captions)}")
    model, processor = tiny_siglip(tokenizer, image_size=image_size, seed=seed, **config)
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    text = siglip_text_inputs(processor, captions)
    train_image_text(model, pixels, text, steps=steps, batch_size=batch_size, lr=lr, seed=seed, log=log,
                     max_inverse_temperature=None)
    return model.eval(), processor


@torch.no_grad()
def siglip_retrieval_accuracy(model: SiglipModel, processor: SiglipProcessor, images: list[Image.Image],
                              captions: list[str], batch_size: int = 64) -> dict:
    """`top1_retrieval` of the tiny SigLIP on held-out (image, caption) pairs."""
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    image_vectors = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    text_vectors = F.normalize(model.get_text_features(**siglip_text_inputs(processor, captions)).pooler_output, dim=-1)
    return top1_retrieval(image_vectors, text_vectors, captions, batch_size)


__all__ = ["siglip_image_processor", "siglip_text_tokenizer", "tiny_siglip", "siglip_text_inputs",
           "train_tiny_siglip", "siglip_retrieval_accuracy"]
