"""A training loop's state on disk, so that an interrupted run resumes where it stopped: the trained
weights, the optimizer's moments and counters, and a JSON record (step or epoch, history, the random
states) stamped with a fingerprint of what is being trained; a state with another fingerprint is never
used. Safetensors through a temporary name, never a pickle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from conngeo.data.vectors import atomic_save


def save_state(path: Path, weights: dict[str, torch.Tensor], opt: torch.optim.Optimizer, meta: dict) -> None:
    """`weights` (name -> tensor), the optimizer's state and `meta` (JSON; it must hold "fingerprint")."""
    tensors = {f"model.{k}": v.detach().cpu() for k, v in weights.items()}
    opt_state = opt.state_dict()
    for idx, state in opt_state["state"].items():
        for name, value in state.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(value).cpu()
    atomic_save(tensors, path, metadata={"state": json.dumps({**meta, "param_groups": opt_state["param_groups"]})})


def load_state(path: Path, fp: str, opt: torch.optim.Optimizer, device) -> tuple[dict, dict] | None:
    """(weights, meta) of the state at `path` if its fingerprint is `fp`, the optimizer loaded from it;
    None where there is no such state."""
    if not Path(path).is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
        if meta["fingerprint"] != fp:
            return None
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value if name == "step" else value.to(device)
    opt.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, meta
