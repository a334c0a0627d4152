"""Tiny pretrained reference models for the default study: a CLIP and a DINOv2, trained on the toy world.

Both are the real transformers classes (CLIPModel, Dinov2Model) at about 1M parameters, so the
default study and the real one (openai/clip-vit-large-patch14, facebook/dinov2-base) run the same
code. The tiny CLIP is the `clip` reference space and also the frozen pretrained vision encoder
of the tiny LLaVA (CLIPVisionModel.from_pretrained(folder) loads its vision tower); the tiny DINO
is the `dino` reference space: an image-only, self-supervised view with no captions involved.

Recipes, chosen to learn something in one to two CPU minutes:
    CLIP  CLIPModel's own symmetric contrastive loss (return_loss=True) on (image, caption) batches.
    DINO  DINO-lite self-distillation (Caron et al. 2021) with two crops per image: a student
          ViT + MLP head against an EMA teacher; the teacher's logits are centred (running mean)
          and sharpened (low temperature), which is what keeps the two from collapsing. The
          augmentations (random resized crop, flip, brightness/contrast/saturation jitter, all in
          torch) have no hue shift, so colour, a toy-world attribute, stays visible.

Training is deterministic for a fixed seed: torch.manual_seed(seed) before the model is built, a
seeded generator for batch order and augmentations, no dropout. This module never imports a
logger; pass `log(step, {name: value})` to record the curves.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import processors
from transformers import (BitImageProcessorPil, CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor,
                          Dinov2Config, Dinov2Model)

from ..scoring.clipscore import retrieval_hits
from ..references import CLIPReference

Log = Callable[[int, dict], None] | None

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _schedule(optimizer, steps: int, warmup_fraction: float = 0.05):
    """Linear warm-up, then cosine decay to zero."""
    warmup = max(1, int(steps * warmup_fraction))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """`steps` index batches, epoch after epoch of seeded permutations (the last partial batch of an
    epoch is dropped so every step sees `batch_size` items)."""
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    order = None
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(n, generator=generator)
        start = (step % per_epoch) * batch_size
        yield step, order[start:start + batch_size]


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_image_text(model, pixels: torch.Tensor, text: dict, steps: int, batch_size: int, lr: float,
                     seed: int = 0, log: Log = None, max_inverse_temperature: float | None = 100.0) -> None:
    """Train an image-text model (CLIPModel, SiglipModel) in place with its own loss (return_loss):
    AdamW, warm-up then cosine decay, gradients clipped at norm 1, seeded batches.

    CLIP clamps its learned inverse temperature at 100; SigLIP does not (None).
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    scheduler = _schedule(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step, idx in _batches(len(pixels), batch_size, steps, generator):
        out = model(input_ids=text["input_ids"][idx], attention_mask=text["attention_mask"][idx],
                    pixel_values=pixels[idx], return_loss=True)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if max_inverse_temperature is not None:
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(max_inverse_temperature))
        if log:
            values = {"loss": out.loss.item(), "inverse_temperature": model.logit_scale.exp().item(),
                      "lr": scheduler.get_last_lr()[0]}
            if getattr(model, "logit_bias", None) is not None:
                values["bias"] = model.logit_bias.item()
            log(step, values)


def top1_retrieval(image_vectors: torch.Tensor, text_vectors: torch.Tensor, captions: list[str],
                   batch_size: int = 64) -> dict:
    """Image -> caption top-1 within consecutive batches of `batch_size` pairs
    (conngeo.scoring.clipscore.retrieval_hits: right where the retrieved text equals the image's own;
    `chance` the expected top-1 of a random pick under that rule)."""
    hits, chance = map(torch.cat, zip(*(retrieval_hits(image_vectors[a:a + batch_size], text_vectors[a:a + batch_size],
                                                       captions[a:a + batch_size])
                                        for a in range(0, len(captions), batch_size))))
    return {"top1": float(hits.mean()), "chance": float(chance.mean()), "n": len(captions), "batch_size": batch_size}


# -- CLIP ------------------------------------------------------------------------------------------

def clip_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """Resize to image_size x image_size (no crop), CLIP's mean/std. The tiny LLaVA should use the
    same normalisation for the frozen encoder to see what it was trained on."""
    return CLIPImageProcessorPil(size={"height": image_size, "width": image_size}, do_center_crop=False,
                                 image_mean=CLIP_MEAN, image_std=CLIP_STD)


def clip_text_tokenizer(tokenizer):
    """A copy of the word-level tokenizer that wraps each text in <s> ... </s> and pads on the
    right, as CLIP's own tokenizer does: CLIP's text tower pools at the first eos token."""
    tok = copy.deepcopy(tokenizer)
    bos, eos = tok.bos_token, tok.eos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}",
        special_tokens=[(bos, tok.bos_token_id), (eos, tok.eos_token_id)])
    tok.padding_side = "right"
    return tok


def tiny_clip(tokenizer, image_size: int = 48, patch_size: int = 8, hidden_size: int = 128,
              num_layers: int = 4, projection_dim: int = 64, max_text_length: int = 32,
              seed: int = 0) -> tuple[CLIPModel, CLIPProcessor]:
    """A random-init tiny CLIPModel (about 1.1M parameters at the defaults) and its processor, whose
    text side is `clip_text_tokenizer(tokenizer)`."""
    text_tokenizer = clip_text_tokenizer(tokenizer)
    tower = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                 num_attention_heads=max(1, hidden_size // 32))
    config = CLIPConfig(
        text_config=dict(**tower, vocab_size=len(text_tokenizer), max_position_embeddings=max_text_length,
                         pad_token_id=text_tokenizer.pad_token_id, bos_token_id=text_tokenizer.bos_token_id,
                         # not 2: CLIP treats eos_token_id == 2 as the legacy "argmax id" pooling
                         eos_token_id=text_tokenizer.eos_token_id, projection_dim=projection_dim),
        # projection_dim in the tower configs too, so CLIPVisionModelWithProjection loads from the folder
        vision_config=dict(**tower, image_size=image_size, patch_size=patch_size, projection_dim=projection_dim),
        projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    processor = CLIPProcessor(image_processor=clip_image_processor(image_size), tokenizer=text_tokenizer)
    return model, processor


def train_tiny_clip(images: list[Image.Image], captions: list[str], tokenizer, image_size: int = 48,
                    steps: int = 600, batch_size: int = 64, lr: float = 1e-3, seed: int = 0, log: Log = None,
                    **config) -> tuple[CLIPModel, CLIPProcessor]:
    """Train a tiny CLIP contrastively (CLIPModel's return_loss) on (image, caption) pairs.

    `tokenizer` is the world's word-level tokenizer (conngeo.zoo.tokenizer.build_tokenizer);
    `config` goes to `tiny_clip` (patch_size, hidden_size, num_layers, ...). Returns the model in
    eval mode and its CLIPProcessor; save both with save_pretrained into one folder.
    """
    if not images or len(images) != len(captions):
        raise ValueError(f"need matching, non-empty images and captions; got {len(images)} and {len(captions)}")
    model, processor = tiny_clip(tokenizer, image_size=image_size, seed=seed, **config)
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    text = processor.tokenizer(list(captions), padding=True, truncation=True,
                               max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
    train_image_text(model, pixels, text, steps=steps, batch_size=batch_size, lr=lr, seed=seed, log=log)
    return model.eval(), processor


@torch.no_grad()
def retrieval_accuracy(model: CLIPModel, processor: CLIPProcessor, images: list[Image.Image],
                       captions: list[str], batch_size: int = 64) -> dict:
    """`top1_retrieval` of the tiny CLIP on held-out (image, caption) pairs."""
    reference = CLIPReference(model, processor.image_processor, processor.tokenizer)
    image_vectors = F.normalize(reference.embed(images), dim=-1)
    text_vectors = F.normalize(reference.embed_text(captions), dim=-1)
    return top1_retrieval(image_vectors, text_vectors, captions, batch_size)


# -- DINO ------------------------------------------------------------------------------------------

def dino_image_processor(image_size: int) -> BitImageProcessorPil:
    """Resize to image_size x image_size (no crop), ImageNet mean/std, as DINOv2's processor."""
    return BitImageProcessorPil(size={"height": image_size, "width": image_size}, do_center_crop=False,
                                image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def tiny_dino(image_size: int = 48, patch_size: int = 8, hidden_size: int = 128, num_layers: int = 4,
              seed: int = 0) -> tuple[Dinov2Model, BitImageProcessorPil]:
    """A random-init tiny Dinov2Model (about 0.56M parameters at the defaults) and its processor."""
    config = Dinov2Config(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                          num_hidden_layers=num_layers, num_attention_heads=max(1, hidden_size // 32),
                          mlp_ratio=2, layerscale_value=1.0)
    torch.manual_seed(seed)
    return Dinov2Model(config), dino_image_processor(image_size)


class DinoHead(torch.nn.Module):
    """MLP -> l2-normalised bottleneck -> prototypes, as in DINO (weight norm left out)."""

    def __init__(self, hidden_size: int, prototypes: int = 256, width: int = 256, bottleneck: int = 64):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden_size, width), torch.nn.GELU(),
                                       torch.nn.Linear(width, bottleneck))
        self.prototypes = torch.nn.Linear(bottleneck, prototypes, bias=False)

    def forward(self, x):
        return self.prototypes(F.normalize(self.mlp(x), dim=-1))


def augment(raw: torch.Tensor, generator: torch.Generator, min_scale: float = 0.35) -> torch.Tensor:
    """Random resized crop (area min_scale-1, aspect 3/4-4/3), horizontal flip and brightness,
    contrast and saturation jitter of a [B, 3, H, W] batch in [0, 1], one draw per image."""
    b = raw.shape[0]
    u = torch.rand(b, 8, generator=generator)
    area = min_scale + (1 - min_scale) * u[:, 0]
    aspect = torch.exp((u[:, 1] - 0.5) * 2 * math.log(4 / 3))
    sx, sy = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
    tx, ty = (1 - sx) * (2 * u[:, 2] - 1), (1 - sy) * (2 * u[:, 3] - 1)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, tx, sy, ty
    grid = F.affine_grid(theta, list(raw.shape), align_corners=False)
    x = F.grid_sample(raw, grid, mode="bilinear", padding_mode="border", align_corners=False)
    brightness, contrast, saturation = (0.75 + 0.5 * u[:, 5:8]).unbind(1)
    x = x * brightness.view(b, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * contrast.view(b, 1, 1, 1)
    gray = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    x = gray + (x - gray) * saturation.view(b, 1, 1, 1)
    return x.clamp(0, 1)


def train_tiny_dino(images: list[Image.Image], image_size: int = 48, steps: int = 500, batch_size: int = 32,
                    lr: float = 2e-3, seed: int = 0, log: Log = None, teacher_momentum: float = 0.99,
                    student_temperature: float = 0.1, teacher_temperature: float = 0.04,
                    center_momentum: float = 0.9, crop_min_scale: float = 0.35, **config) -> tuple[Dinov2Model, BitImageProcessorPil]:
    """Train a tiny Dinov2Model with DINO-lite self-distillation (see the module docstring).

    `config` goes to `tiny_dino`. Returns the teacher backbone (DINO's evaluated model) in eval
    mode and its image processor; save both with save_pretrained into one folder.
    """
    if not images:
        raise ValueError("train_tiny_dino got no images")
    student, image_processor = tiny_dino(image_size=image_size, seed=seed, **config)
    student_head = DinoHead(student.config.hidden_size)
    teacher, teacher_head = copy.deepcopy(student), copy.deepcopy(student_head)
    for p in [*teacher.parameters(), *teacher_head.parameters()]:
        p.requires_grad_(False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    raw = image_processor(images=images, return_tensors="pt")["pixel_values"] * std + mean
    center = torch.zeros(student_head.prototypes.out_features)
    params = [*student.parameters(), *student_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.04)
    scheduler = _schedule(optimizer, steps, warmup_fraction=0.1)
    generator = torch.Generator().manual_seed(seed)
    student.train()
    for step, idx in _batches(len(images), batch_size, steps, generator):
        views = torch.cat([augment(raw[idx], generator, crop_min_scale), augment(raw[idx], generator, crop_min_scale)])
        views = (views - mean) / std
        student_logits = student_head(student(pixel_values=views).pooler_output) / student_temperature
        with torch.no_grad():
            teacher_logits = teacher_head(teacher(pixel_values=views).pooler_output)
            targets = F.softmax((teacher_logits - center) / teacher_temperature, dim=-1)
        # each view's student predicts the teacher's output on the other view of the same image
        loss = -(targets.roll(len(idx), dims=0) * F.log_softmax(student_logits, dim=-1)).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            momentum = 1 - (1 - teacher_momentum) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for t, s in zip([*teacher.parameters(), *teacher_head.parameters()], params):
                t.lerp_(s, 1 - momentum)
            center.mul_(center_momentum).add_(teacher_logits.mean(0), alpha=1 - center_momentum)
        if log:
            # loss = entropy of the teacher's targets + KL(targets || student); centring raises the
            # first early on, so the KL is the part that shows the student learning
            entropy = -(targets * targets.clamp_min(1e-12).log()).sum(-1).mean().item()
            log(step, {"loss": loss.item(), "teacher_entropy": entropy, "kl": loss.item() - entropy,
                       "lr": scheduler.get_last_lr()[0]})
    return teacher.eval(), image_processor


@torch.no_grad()
def knn_probe_accuracy(train_features: torch.Tensor, train_labels: list, test_features: torch.Tensor,
                       test_labels: list, k: int = 10) -> dict:
    """Majority vote of the k cosine-nearest training features (features standardised with the
    training statistics); `chance` is the share of the most common training label."""
    mu, sigma = train_features.mean(0), train_features.std(0) + 1e-6
    a = F.normalize((train_features - mu) / sigma, dim=-1)
    b = F.normalize((test_features - mu) / sigma, dim=-1)
    names = sorted(set(train_labels) | set(test_labels))
    code = {name: i for i, name in enumerate(names)}
    train_codes = torch.tensor([code[y] for y in train_labels])
    test_codes = torch.tensor([code[y] for y in test_labels])
    neighbours = (b @ a.T).topk(min(k, len(train_labels)), dim=1).indices
    votes = F.one_hot(train_codes[neighbours], len(names)).sum(1)
    accuracy = (votes.argmax(1) == test_codes).float().mean().item()
    chance = train_codes.bincount(minlength=len(names)).max().item() / len(train_labels)
    return {"accuracy": accuracy, "chance": chance, "k": k}


def probe_reference(reference, train_images, train_labels, test_images, test_labels, k: int = 10) -> dict:
    """kNN probe of a Reference (CLIPReference / DinoReference) on one attribute."""
    return knn_probe_accuracy(reference.embed(train_images), train_labels, reference.embed(test_images),
                              test_labels, k=k)


__all__ = ["train_image_text", "top1_retrieval", "clip_image_processor", "clip_text_tokenizer", "tiny_clip", "train_tiny_clip", "retrieval_accuracy",
           "dino_image_processor", "tiny_dino", "DinoHead", "augment", "train_tiny_dino", "knn_probe_accuracy",
           "probe_reference"]
