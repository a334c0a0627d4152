"""Connector variants: a trained VLM whose connector is replaced by another kind, everything else kept.

The experiment that turns "connectors distort geometry" into "this kind of connector does": take a
base model (its vision encoder and language model frozen, byte for byte) and train a new connector
of one of these kinds between them with the caption loss:

    linear        one Linear(d_vision, d_text) per token                      T tokens in, T out
    mlp           Linear -> GELU -> Linear per token (LLaVA's projector)      T -> T
    resampler<n>  n learned latents cross-attending to the projected E_pre    T -> n
                  (a small perceiver, Idefics2's connector)
    merger        2x2 neighbouring patches concatenated, then an MLP          T -> ceil(side/2)^2
                  (Qwen's patch merger; E_pre must be a square raster grid; an odd side is
                  padded with a zero row and column, as Qwen's grids never need)

`ConnectorVariant` is an ordinary `Adapter` (family "variant"): the new module is put in the base
model's place (the same attribute the base adapter hooks), so the base's own `encode` hooks it and
the model's own forward and generate run through it. Where the connector changes the number of
image tokens (resampler, merger), `prepare` resizes the run of image placeholders in the base's
prompt to that number; the language model places E_post row by row on those placeholders.

Bases: families whose image placeholders are one plain run per image (LLaVA, Idefics2). Not Qwen:
its M-RoPE positions come from the patch grid (image_grid_thw), which a resampler has no analogue of.

Saved as connector.safetensors + connector.json (kind, sizes, widths, and the base's source and
revision, or for a base without a revision the digest of its files). The base is not copied: loading
reads it from where it was, e.g. data/zoo/llava relative to the repository root (a DVC checkout has
it as the zoo stage's output), and refuses a base retrained since (another digest).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from ..resume import folder_digest
from .base import Adapter, MissingCheckpointError, resolve_dtype

KINDS = ("linear", "mlp", "resampler<n>", "merger")
CONFIG, WEIGHTS = "connector.json", "connector.safetensors"
# Qwen's M-RoPE ties the token count to the patch grid (see the module docstring)
UNSUPPORTED_BASES = {"qwen2.5vl", "qwen3.5"}


# -- the connector kinds ------------------------------------------------------------------------------
class Connector(nn.Module):
    """E_pre [B, T, d_in] (or one image [T, d_in]) -> E_post [B, T', d_out]. `attention_mask`
    ([B, T], 1 = real patch) is what Idefics2's model passes its connector; kinds that do not mix
    tokens ignore it."""

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 2:
            return self.forward(x[None], None if attention_mask is None else attention_mask[None])[0]
        return self.run(x, attention_mask)

    def tokens_out(self, tokens_in: int) -> int:
        return tokens_in


class Linear(Connector):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def run(self, x, attention_mask):
        return self.proj(x)


class MLP(Connector):
    def __init__(self, d_in: int, d_out: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or d_out  # LLaVA's projector: hidden width = the LM's width
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))

    def run(self, x, attention_mask):
        return self.net(x)


class ResamplerBlock(nn.Module):
    """Pre-norm cross-attention of the latents to [context; latents] (as Idefics2's perceiver), then an MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm_latents, self.norm_context, self.norm_mlp = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, latents, context, ignore):
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_context(context), q], dim=1)
        latents = latents + self.attn(q, kv, kv, key_padding_mask=ignore, need_weights=False)[0]
        return latents + self.mlp(self.norm_mlp(latents))


class Resampler(Connector):
    def __init__(self, d_in: int, d_out: int, latents: int = 16, layers: int = 1, heads: int = 4):
        super().__init__()
        if d_out % heads:
            raise ValueError(f"resampler: width {d_out} is not divisible by {heads} heads")
        self.proj = nn.Linear(d_in, d_out)  # the modality projection, before resampling
        # normal(0, 1), not constant: identical latents give identical outputs whatever they attend to,
        # a rank-1 E_post that training cannot break out of (Idefics2's _init_weights sets them to ones)
        self.latents = nn.Parameter(torch.randn(latents, d_out))
        self.blocks = nn.ModuleList(ResamplerBlock(d_out, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_out)

    def run(self, x, attention_mask):
        context = self.proj(x)
        latents = self.latents.expand(x.shape[0], -1, -1)
        ignore = None
        if attention_mask is not None:  # True = ignore; the latents themselves are always attended
            keep = torch.cat([attention_mask.bool(), attention_mask.new_ones(latents.shape[:2]).bool()], dim=1)
            ignore = ~keep
        for block in self.blocks:
            latents = block(latents, context, ignore)
        return self.norm(latents)

    def tokens_out(self, tokens_in: int) -> int:
        return self.latents.shape[0]


class Merger(Connector):
    """Qwen2-VL's PatchMerger on a raster patch grid: norm, each 2x2 unit of neighbouring patches
    concatenated (4 d_in), MLP to d_out. Output rows: the merged grid in raster order. A grid of odd
    side (the tiny LLaVA's 3x3) gets a zero row and column after the norm, so its last units are
    partly empty."""

    def __init__(self, d_in: int, d_out: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 4 * d_in  # Qwen: hidden = the concatenated width
        self.norm = nn.LayerNorm(d_in)
        self.net = nn.Sequential(nn.Linear(4 * d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))

    def run(self, x, attention_mask):
        b, t, d = x.shape
        side = grid_side(t)
        grid = nn.functional.pad(self.norm(x).view(b, side, side, d), (0, 0, 0, side % 2, 0, side % 2))
        half = (side + 1) // 2
        units = grid.view(b, half, 2, half, 2, d).permute(0, 1, 3, 2, 4, 5)
        return self.net(units.reshape(b, half * half, 4 * d))

    def tokens_out(self, tokens_in: int) -> int:
        return ((grid_side(tokens_in) + 1) // 2) ** 2


def grid_side(tokens: int) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"merger: {tokens} E_pre tokens are not a square grid")
    return side


def parse_kind(kind: str) -> dict:
    """'linear' | 'mlp' | 'merger' | 'resampler<n>' -> {'kind': ..., 'latents': n}."""
    if kind in ("linear", "mlp", "merger"):
        return {"kind": kind}
    match = re.fullmatch(r"resampler(\d+)", kind)
    if match and int(match[1]) > 0:
        return {"kind": "resampler", "latents": int(match[1])}
    raise ValueError(f"unknown connector kind {kind!r}; choose one of {', '.join(KINDS)} (e.g. resampler16)")


def build_connector(kind: str, d_in: int, d_out: int, **size) -> Connector:
    """A fresh connector; `size`: hidden (mlp, merger), latents/layers/heads (resampler)."""
    cls = {"linear": Linear, "mlp": MLP, "resampler": Resampler, "merger": Merger}.get(kind)
    if cls is None:
        raise ValueError(f"unknown connector kind {kind!r}; choose one of {', '.join(KINDS)}")
    try:
        return cls(d_in, d_out, **size)
    except TypeError as err:  # a size the kind does not have, e.g. hidden for linear
        raise ValueError(f"connector kind {kind!r} does not take sizes {sorted(size)}: {err}") from err


# -- the adapter ----------------------------------------------------------------------------------------
def replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` where `old` sits inside `root` (the attribute the base adapter's connector() reads)."""
    for name, module in root.named_modules():
        for child_name, child in module.named_children():
            if child is old:
                setattr(module, child_name, new)
                return
    raise ValueError(f"{type(old).__name__} is not a submodule of {type(root).__name__}")


def resize_image_runs(batch: dict, image_token_id: int, tokens: int) -> dict:
    """Every run of `image_token_id` in input_ids (and the same positions of attention_mask and
    labels) becomes `tokens` long. Each row must change length by the same amount (one image per
    row, as prepare builds it), so padding keeps its side and width."""
    rows = {key: batch[key] for key in ("input_ids", "attention_mask", "labels") if key in batch}
    new, deltas = {key: [] for key in rows}, set()
    for i, ids in enumerate(rows["input_ids"].tolist()):
        keep, j = [], 0
        while j < len(ids):  # keep[k] = source position of output position k
            if ids[j] != image_token_id:
                keep.append(j)
                j += 1
                continue
            end = j
            while end < len(ids) and ids[end] == image_token_id:
                end += 1
            keep += [j] * tokens  # every placeholder is the same token with the same mask and label
            j = end
        deltas.add(len(keep) - len(ids))
        for key, value in rows.items():
            new[key].append(value[i, keep])
    if len(deltas) > 1:
        raise ValueError("rows hold different numbers of images; prepare builds one image per row")
    return {**batch, **{key: torch.stack(value) for key, value in new.items()}}


class ConnectorVariant(Adapter):
    family = "variant"

    def __init__(self, base: Adapter, connector: Connector, config: dict):
        replace_module(base.model, base.connector(), connector)
        super().__init__(base.model, base.processor, prompt=base.prompt)
        self.base, self._connector, self.config = base, connector, config
        self.pixel_keys, self.image_size = base.pixel_keys, base.image_size
        # Only the connector ever trains: train_captioner takes the parameters that require grad
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in connector.parameters():
            p.requires_grad_(True)

    @property
    def image_tokens(self) -> int:
        return self.config["image_tokens"]

    @classmethod
    def from_base(cls, base: Adapter, kind: str, base_source: str, base_revision: str | None = None,
                  seed: int = 0, **size) -> "ConnectorVariant":
        """`base` (loaded from `base_source`, which the saved variant records) with a fresh connector
        of `kind` ('linear', 'mlp', 'merger', 'resampler16', ...) in place of its own."""
        if base.family in UNSUPPORTED_BASES:
            raise ValueError(f"connector variants of {base.family} are not supported: its M-RoPE positions "
                             "follow the patch grid, which a replaced connector does not keep")
        # widths and E_pre token count from one probe image (gray: Idefics2 drops all-zero images)
        pre, post = base.encode([Image.new("RGB", (64, 64), (128, 128, 128))])
        spec = {**parse_kind(kind), **{k: v for k, v in size.items() if v is not None}}
        torch.manual_seed(seed)
        connector = build_connector(d_in=pre[0].shape[1], d_out=post[0].shape[1], **spec)
        config = {"kind": spec.pop("kind"), "size": spec, "d_in": pre[0].shape[1], "d_out": post[0].shape[1],
                  "pre_tokens": pre[0].shape[0], "native_image_tokens": post[0].shape[0],
                  "image_tokens": connector.tokens_out(pre[0].shape[0]), "seed": seed,
                  "base": {"family": base.family, "source": str(base_source), "revision": base_revision,
                           "digest": folder_digest(base_source) if not base_revision and Path(base_source).is_dir() else None,
                           "prompt": base.prompt}}
        return cls(base, connector.to(base.device, base.dtype), config)

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, source, revision: str | None = None, device: str = "cpu", dtype: str = "float32",
             prompt: str = "", image_size: int | None = None, hub: str | None = None) -> "ConnectorVariant":
        """A variant folder (connector.json + connector.safetensors); the base loads from its recorded
        source and revision (`revision` and `hub` are unused: the variant is a local folder), with the
        prompt the connector was trained under unless `prompt` is given, at `image_size`."""
        from . import load_adapter  # the registry imports this module

        folder = Path(source)
        if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
            raise MissingCheckpointError(f"connector variant {source!r}: no {CONFIG} + {WEIGHTS} there; train it "
                                         f"with `dvc repro train_connector@{folder.name}`")
        config = json.loads((folder / CONFIG).read_text())
        b = config["base"]
        if b.get("digest") and Path(b["source"]).is_dir() and folder_digest(b["source"]) != b["digest"]:
            raise ValueError(f"{folder / CONFIG}: its base {b['source']} has changed since this connector was trained "
                             f"on it (another digest of its files); retrain it: `dvc repro train_connector@{folder.name}`")
        base = load_adapter(b["family"], b["source"], revision=b["revision"], device=device, dtype=dtype,
                            prompt=prompt or b.get("prompt", ""), image_size=image_size)
        connector = build_connector(config["kind"], config["d_in"], config["d_out"], **config["size"])
        connector.load_state_dict(load_file(folder / WEIGHTS))
        return cls(base, connector.to(device, resolve_dtype(dtype)), config)

    @classmethod
    def processor_info(cls, source, revision: str | None = None, hub: str | None = None) -> dict:
        """The base's (the images go through the base's processor)."""
        from . import adapter_class  # the registry imports this module

        config = Path(source) / CONFIG
        if not config.is_file():
            raise MissingCheckpointError(f"connector variant {source!r}: no {CONFIG} there; train it with "
                                         f"`dvc repro train_connector@{Path(source).name}`")
        base = json.loads(config.read_text())["base"]
        return adapter_class(base["family"]).processor_info(base["source"], base["revision"])

    def save(self, folder: Path) -> None:
        """connector.safetensors + connector.json only: the base stays where config['base'] says."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().float().cpu().contiguous() for k, v in self._connector.state_dict().items()}
        save_file(weights, folder / WEIGHTS)
        (folder / CONFIG).write_text(json.dumps(self.config, indent=2) + "\n")

    def token_layout(self, n_pre: int, n_post: int) -> dict:
        """linear / mlp: token t -> token t; merger: a patch -> its 2x2 unit on the (padded) grid;
        resampler: every latent sees every patch (no correspondence). E_pre keeps the base's order."""
        kind = self.config["kind"]
        layout = {**self.base.token_layout(n_pre, n_pre), "connector": kind}
        if kind == "merger":
            side = grid_side(n_pre)
            half = (side + 1) // 2
            layout["pre_to_post"] = [(t // side) // 2 * half + (t % side) // 2 for t in range(n_pre)]
        elif kind == "resampler":
            layout["pre_to_post"] = None
        return layout

    def set_image_size(self, size: int) -> None:
        self.base.set_image_size(size)  # the base's processor prepares the images
        self.image_size = size

    # -- the three views -------------------------------------------------------------------------
    def connector(self) -> nn.Module:
        return self._connector

    def vision_encoder(self) -> nn.Module:
        return self.base.vision_encoder()

    def prepare(self, images: list[Image.Image], captions: list[str] | None = None) -> dict:
        """The base's inputs with each image's placeholder run resized to this connector's token count."""
        batch = self.base.prepare(images, captions)
        return resize_image_runs(batch, self.model.config.image_token_id, self.image_tokens)

    def encode(self, images: list[Image.Image]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.base.encode(images)  # the base hooks base.connector(), which is now this connector

    @torch.no_grad()
    def connect(self, pre: list[torch.Tensor]) -> list[torch.Tensor]:
        if len({tuple(p.shape) for p in pre}) == 1:
            post = self._connector(torch.stack(pre).to(self.device, self.dtype))
        else:
            post = [self._connector(p.to(self.device, self.dtype)) for p in pre]
        return [p.cpu() for p in post]

    # -- the tiny zoo ------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, tokenizer, image_size: int, vision_encoder=None, seed: int = 0) -> "ConnectorVariant":
        raise TypeError("a connector variant is made from a trained base model: "
                        "ConnectorVariant.from_base(base_adapter, kind, base_source) (stage train_connector)")
