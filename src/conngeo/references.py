"""Reference embedders: outside views of the same images that E_pre and E_post are compared with.

    clip        a CLIP image tower (openai/clip-vit-large-patch14 in the real study; the zoo's tiny CLIP
                by default). pooling "cls": the pooled, projected image embedding, i.e.
                CLIPModel.get_image_features (what CLIPScore uses); "mean": the mean over patch tokens
                (CLS excluded) of the vision tower's last hidden state (before post_layernorm).
    dino        a DINOv2 backbone (facebook/dinov2-base in the real study; the zoo's tiny DINO by
                default). pooling "cls": last_hidden_state[:, 0] (after the final layernorm, as
                Dinov2Model returns it); "mean": the mean of the patch tokens of last_hidden_state.
    attributes  the toy world's ground truth (no model): `attribute_embedding`.

Every embedder returns one float32 cpu vector per image, in the order of the images given. Loading
is offline when HF_HUB_OFFLINE is set, never runs remote code, and a missing checkpoint is a
MissingCheckpointError that says how to get it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from PIL import Image
from transformers import (AutoConfig, AutoImageProcessor, AutoTokenizer, CLIPModel,
                          CLIPVisionModelWithProjection, Dinov2Model)

from .data.toyworld import FOODS, PLATES
from .data.vectors import resolve_dtype
from .families.base import checked_folder, from_pretrained_kwargs
from .tokenizer_checks import bound_to_model

POOLINGS = ("cls", "mean")
REAL_SOURCES = {"clip": "openai/clip-vit-large-patch14", "dino": "facebook/dinov2-base"}


class Reference:
    """A frozen image embedder: `embed(images) -> [n, d]` float32 on cpu."""

    kind: str = ""

    def __init__(self, model, image_processor, pooling: str = "cls"):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
        self.model = model.eval()
        self.image_processor = image_processor
        self.pooling = pooling

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.dtype)

    def embed_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """One vector per image, [n, d] float32 on cpu, computed `batch_size` images at a time."""
        if not images:
            raise ValueError("embed() got no images")
        chunks = [self.embed_pixels(self.pixel_values(images[i:i + batch_size]))
                  for i in range(0, len(images), batch_size)]
        return torch.cat(chunks).float().cpu()


class CLIPReference(Reference):
    kind = "clip"

    def __init__(self, model, image_processor, tokenizer=None, pooling: str = "cls"):
        super().__init__(model, image_processor, pooling)
        self.tokenizer = tokenizer

    def embed_pixels(self, pixel_values):
        if self.pooling == "cls":
            if isinstance(self.model, CLIPModel):
                return self.model.get_image_features(pixel_values=pixel_values).pooler_output
            return self.model(pixel_values=pixel_values).image_embeds  # CLIPVisionModelWithProjection
        vision = self.model.vision_model
        return vision(pixel_values=pixel_values).last_hidden_state[:, 1:].mean(dim=1)

    @torch.no_grad()
    def embed_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Projected text embeddings (CLIPModel.get_text_features), [n, d] float32 on cpu; truncated
        to the text tower's context length, as CLIPScore does."""
        if not isinstance(self.model, CLIPModel) or self.tokenizer is None:
            raise ValueError("embed_text needs a full CLIPModel checkpoint with its tokenizer, "
                             "not a vision tower alone")
        if not texts:
            raise ValueError("embed_text() got no texts")
        max_length = self.model.config.text_config.max_position_embeddings
        chunks = []
        for i in range(0, len(texts), batch_size):
            # right padding keeps each caption's positions independent of the batch it is in
            tokens = self.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                                    max_length=max_length, padding_side="right", return_tensors="pt")
            chunks.append(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                       attention_mask=tokens["attention_mask"].to(self.device)
                                                       ).pooler_output)
        return torch.cat(chunks).float().cpu()


class DinoReference(Reference):
    kind = "dino"

    def embed_pixels(self, pixel_values):
        hidden = self.model(pixel_values=pixel_values).last_hidden_state
        return hidden[:, 0] if self.pooling == "cls" else hidden[:, 1:].mean(dim=1)


def load_reference(kind: str, source, revision: str | None = None, device: str = "cpu",
                   dtype: str = "float32", pooling: str = "cls", hub: str | None = None) -> Reference:
    """Load a reference embedder from a save_pretrained or `hf download --local-dir` folder.

    kind "clip" accepts a CLIPModel checkpoint (image and text towers) or a vision-only
    CLIPVisionModelWithProjection one (no embed_text); kind "dino" a Dinov2Model checkpoint.
    revision / hub: as for Adapter.load (the pinned commit is checked; the hub id is named in the
    error that says how to download a missing folder).
    """
    if kind not in ("clip", "dino"):
        raise ValueError(f"unknown reference kind {kind!r}; choose 'clip' or 'dino'")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
    folder, kwargs = checked_folder(source, revision, hub), from_pretrained_kwargs()
    config = AutoConfig.from_pretrained(folder, **kwargs)
    image_processor = AutoImageProcessor.from_pretrained(folder, **kwargs)
    if kind == "clip":
        if config.model_type == "clip":
            model_class, tokenizer = CLIPModel, bound_to_model(AutoTokenizer.from_pretrained(folder, **kwargs),
                                                               config.text_config)
        elif config.model_type == "clip_vision_model":
            model_class, tokenizer = CLIPVisionModelWithProjection, None
        else:
            raise ValueError(f"{folder}: model_type {config.model_type!r} is not a CLIP checkpoint")
    else:
        if config.model_type != "dinov2":
            raise ValueError(f"{folder}: model_type {config.model_type!r} is not a DINOv2 checkpoint")
        model_class = Dinov2Model
    model = model_class.from_pretrained(folder, dtype=resolve_dtype(dtype), **kwargs).to(device)
    if kind == "clip":
        return CLIPReference(model, image_processor, tokenizer, pooling=pooling)
    return DinoReference(model, image_processor, pooling=pooling)


# -- the toy world's ground-truth attribute space -------------------------------------------------

def attribute_feature_names() -> list[str]:
    """Column names of `attribute_embedding`: per food kind (FOODS order) whether it is present,
    its colour (one-hot) and its count (one-hot 1/2/3); then the plate colour (one-hot)."""
    names = []
    for kind, (_, _, colours) in FOODS.items():
        names.append(f"{kind}")
        names += [f"{kind}:colour={c}" for c in colours]
        names += [f"{kind}:count={n}" for n in (1, 2, 3)]
    return names + [f"plate={c}" for c in PLATES]


def attribute_embedding(attributes_csv_path, stems: list[str]) -> torch.Tensor:
    """The ground-truth attribute vector of each stem, [len(stems), d] float32, rows in `stems` order.

    Blocks per food kind (present, colour one-hot, count one-hot) make two plates with the same food
    in another colour or count closer than two plates with different foods; see
    `attribute_feature_names` for the columns.
    """
    path = Path(attributes_csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: attributes file not found; it is written by the toyworld stage")
    column = {name: i for i, name in enumerate(attribute_feature_names())}
    vectors = {}
    with open(path, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            vector = torch.zeros(len(column))
            try:
                for slot in ("1", "2"):
                    kind = row[f"kind{slot}"]
                    if not kind:
                        continue
                    vector[column[kind]] = 1
                    vector[column[f"{kind}:colour={row[f'colour{slot}']}"]] = 1
                    vector[column[f"{kind}:count={int(row[f'count{slot}'])}"]] = 1
                vector[column[f"plate={row['plate_colour']}"]] = 1
            except (KeyError, ValueError) as err:
                raise ValueError(f"{path}, line {line}: unexpected attribute value ({err}); "
                                 "expected the toy world's kinds, colours, counts 1-3 and plates") from err
            vectors[row["stem"]] = vector
    missing = [s for s in stems if s not in vectors]
    if missing:
        raise ValueError(f"{path}: {len(missing)} stem(s) not in the attributes file, e.g. {missing[:5]}; "
                       "regenerate the toy world or check the image root")
    if not stems:
        return torch.zeros(0, len(column))
    return torch.stack([vectors[s] for s in stems])
