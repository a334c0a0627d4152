"""Reconstructors: E_post (z-scored) -> E_pre (z-scored), one image at a time, token order kept.

- `mlp`: the same MLP on every token, E_post token i -> E_pre token i. Only where the connector
  keeps the token count (LLaVA's projector maps each patch to one token).
- `transformer`: one learned query per E_pre position cross-attends to the E_post tokens (each
  with a learned position embedding added), through `num_layers` pre-norm decoder layers
  (query self-attention, cross-attention, GELU MLP), then a linear read-out to d_pre. Output row
  i is always E_pre position i, and the position embeddings tell the queries which E_post token
  is which, so the model can learn where each pre token's information went (a 2x2 merge unit,
  a perceiver latent) and is not blind to token order.

A model is rebuilt from its `ReconConfig` (config.json) and its weights (model.safetensors).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from conngeo.data.vectors import atomic_save

MODEL_TYPES = ("mlp", "transformer")
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def choose_model_type(requested: str, n_pre: int, n_post: int) -> str:
    """`auto` is mlp where the token counts match, else transformer; mlp needs matching counts."""
    if requested == "auto":
        return "mlp" if n_pre == n_post else "transformer"
    if requested not in MODEL_TYPES:
        raise ValueError(f"unknown reconstructor model_type {requested!r}; use auto, mlp or transformer")
    if requested == "mlp" and n_pre != n_post:
        raise ValueError(f"model_type mlp maps token i to token i, but this connector turns {n_pre} E_pre tokens "
                         f"into {n_post} E_post tokens; use model_type transformer (or auto)")
    return requested


@dataclass
class ReconConfig:
    """Everything needed to rebuild a reconstructor (saved as config.json beside the weights)."""

    model_type: str
    n_post: int
    d_post: int
    n_pre: int
    d_pre: int
    hidden_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    dropout: float = 0.0

    def save(self, folder: Path) -> None:
        (Path(folder) / CONFIG).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "ReconConfig":
        return cls(**json.loads((Path(folder) / CONFIG).read_text()))


class TokenMLP(nn.Module):
    """num_layers linear layers (GELU and dropout between them) applied to every token alike;
    num_layers=1 is a linear map."""

    def __init__(self, c: ReconConfig):
        super().__init__()
        widths = [c.d_post] + [c.hidden_size] * (c.num_layers - 1) + [c.d_pre]
        layers = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            if i:
                layers += [nn.GELU(), nn.Dropout(c.dropout)]
            layers.append(nn.Linear(a, b))
        self.net = nn.Sequential(*layers)

    def forward(self, post: torch.Tensor) -> torch.Tensor:
        return self.net(post)


class QueryTransformer(nn.Module):
    """Learned E_pre-position queries cross-attending to position-embedded E_post tokens."""

    def __init__(self, c: ReconConfig):
        super().__init__()
        self.embed = nn.Linear(c.d_post, c.hidden_size)
        self.post_position = nn.Parameter(0.02 * torch.randn(c.n_post, c.hidden_size))
        self.queries = nn.Parameter(0.02 * torch.randn(c.n_pre, c.hidden_size))
        self.memory_norm = nn.LayerNorm(c.hidden_size)
        layer = nn.TransformerDecoderLayer(c.hidden_size, c.num_heads, 4 * c.hidden_size, c.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerDecoder(layer, c.num_layers)
        self.norm = nn.LayerNorm(c.hidden_size)
        self.out = nn.Linear(c.hidden_size, c.d_pre)

    def forward(self, post: torch.Tensor) -> torch.Tensor:
        memory = self.memory_norm(self.embed(post) + self.post_position)
        queries = self.queries.expand(post.shape[0], -1, -1)
        return self.out(self.norm(self.layers(queries, memory)))


def build_reconstructor(c: ReconConfig) -> nn.Module:
    """The module `c` describes, freshly initialised (seed torch first for reproducible weights)."""
    if c.num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {c.num_layers}")
    if c.model_type == "mlp":
        if c.n_pre != c.n_post:
            choose_model_type("mlp", c.n_pre, c.n_post)  # raises the explanation
        return TokenMLP(c)
    if c.model_type == "transformer":
        if c.hidden_size % c.num_heads:
            raise ValueError(f"hidden_size {c.hidden_size} is not divisible by num_heads {c.num_heads}")
        return QueryTransformer(c)
    raise ValueError(f"unknown reconstructor model_type {c.model_type!r}; use mlp or transformer")


def save_reconstructor(model: nn.Module, c: ReconConfig, folder: Path) -> None:
    """model.safetensors (weights) + config.json into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c.save(folder)
    atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, folder / WEIGHTS)


def load_reconstructor(folder: Path, device: str = "cpu") -> tuple[nn.Module, ReconConfig]:
    """Rebuild the model saved in `folder` and load its weights, in eval mode."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{folder}: no trained reconstructor ({WEIGHTS} + {CONFIG}); train it first "
                                "(`python stages/recon.py --model NAME` or `dvc repro recon`)")
    c = ReconConfig.load(folder)
    model = build_reconstructor(c)
    try:
        model.load_state_dict(load_file(str(folder / WEIGHTS)))
    except RuntimeError as err:
        raise ValueError(f"{folder / WEIGHTS} does not match {folder / CONFIG}: {err}; retrain the reconstructor") from err
    return model.to(device).eval(), c
