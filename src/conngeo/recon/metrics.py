"""Reconstruction metrics: pure functions of a prediction P and a target E (torch tensors).

Shapes: P, E [N, T, D] (N images, T tokens, D features) for the token metrics, [N, D] for the
pooled ones. Units are whatever the caller passes: z-units (E_pre z-scored with the training
split's statistics, see conngeo.recon.data) or raw units (E_pre as extracted). Results are float32
(computed in float64 where inputs are float64).
"""

from __future__ import annotations

import torch

EPS = 1e-8


def _float(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x).detach()
    return x if x.dtype == torch.float64 else x.float()


def token_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N, T]: mse[n, t] = (1/D) sum_d (P[n,t,d] - E[n,t,d])^2."""
    return (_float(pred) - _float(target)).pow(2).mean(dim=-1)


def image_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N]: mse[n] = (1/(T D)) sum_{t,d} (P[n,t,d] - E[n,t,d])^2, the mean of token_mse over tokens."""
    return token_mse(pred, target).mean(dim=-1)


def token_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N, T]: cos[n, t] = <P[n,t], E[n,t]> / max(|P[n,t]| |E[n,t]|, 1e-8); 0 where either is zero."""
    p, e = _float(pred), _float(target)
    return (p * e).sum(dim=-1) / (p.norm(dim=-1) * e.norm(dim=-1)).clamp_min(EPS)


def image_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N]: cos[n] = (1/T) sum_t cos[n, t], the mean of token_cosine over the image's tokens."""
    return token_cosine(pred, target).mean(dim=-1)


def pool_tokens(x: torch.Tensor) -> torch.Tensor:
    """[N, D]: the mean over tokens, pooled[n] = (1/T) sum_t X[n, t]."""
    return _float(x).mean(dim=-2)


def pooled_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N] from pooled vectors p, e [N, D]: (1/D) sum_d (p[n,d] - e[n,d])^2."""
    return (_float(pred) - _float(target)).pow(2).mean(dim=-1)


def pooled_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N] from pooled vectors p, e [N, D]: <p[n], e[n]> / max(|p[n]| |e[n]|, 1e-8)."""
    p, e = _float(pred), _float(target)
    return (p * e).sum(dim=-1) / (p.norm(dim=-1) * e.norm(dim=-1)).clamp_min(EPS)
