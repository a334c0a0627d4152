"""Per-image reconstruction metrics, the two baselines, and the held-out summary.

Columns of the per-image table (z: z-units of the training split's statistics; raw: as extracted):

    mse_z, mse_raw          image_mse of the reconstruction (per token, then mean over tokens)
    cosine, cosine_z        image_cosine (mean per-token cosine), raw and z-units
    pooled_mse_z            pooled_mse of mean_t reconstruction vs mean_t E_pre (z)
    pooled_cosine           pooled_cosine of the same, raw units
    mean_mse_z, mean_mse_raw, mean_cosine, mean_pooled_mse_z    the mean baseline, same formulas
    ridge_pooled_mse_z, ridge_pooled_cosine                     the ridge baseline (pooled only)

The summary holds the mean of every column over the validation images (held out from training,
normalisation and baselines alike) and over the training images, and two verdicts on validation:
beats_mean_baseline (mse_z < mean_mse_z) and beats_ridge_baseline (pooled_mse_z <
ridge_pooled_mse_z). See conngeo.recon.baselines for what each baseline predicts.
"""

from __future__ import annotations

import torch

from conngeo.recon.baselines import DEFAULT_ALPHAS, fit_ridge, mean_baseline, predict_ridge
from conngeo.recon.data import TRAIN, VAL, Normalizer
from conngeo.recon.metrics import image_cosine, image_mse, pool_tokens, pooled_cosine, pooled_mse, token_mse


def _chunks(n: int, size: int):
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


def reconstruction_report(pred: torch.Tensor, pre: torch.Tensor, post: torch.Tensor, split: list[str],
                          norm: Normalizer, alphas=DEFAULT_ALPHAS, chunk: int = 256):
    """(columns, summary, patch_mse_z) for reconstructions `pred` of `pre`, both raw [N, T, D].

    columns: dict of per-image tensors [N] (module docstring); summary: JSON-ready dict;
    patch_mse_z: token_mse in z-units [N, T] (token order as stored) for patch-loss maps.
    Works through the images `chunk` at a time, so only pooled vectors exist for all N at once.
    """
    if pred.shape != pre.shape:
        raise ValueError(f"reconstruction shape {tuple(pred.shape)} differs from E_pre {tuple(pre.shape)}; "
                         "re-export the reconstructions with the current reconstructor")
    is_train = torch.tensor([s == TRAIN for s in split])
    n = pre.shape[0]

    # Baselines from the training images only.
    train_idx = is_train.nonzero().flatten()
    mean_z = mean_baseline(torch.cat([norm.pre_to_z(pre[train_idx[s]]) for s in _chunks(len(train_idx), chunk)]))
    pooled_post_z = torch.cat([pool_tokens(norm.post_to_z(post[s])) for s in _chunks(n, chunk)])
    pooled_pre_z = torch.cat([pool_tokens(norm.pre_to_z(pre[s])) for s in _chunks(n, chunk)])
    ridge = fit_ridge(pooled_post_z[is_train], pooled_pre_z[is_train], alphas)
    ridge_z = predict_ridge(ridge, pooled_post_z)

    names = ("mse_z", "mse_raw", "cosine", "cosine_z", "pooled_mse_z", "pooled_cosine",
             "mean_mse_z", "mean_mse_raw", "mean_cosine", "mean_pooled_mse_z")
    cols: dict[str, list] = {k: [] for k in names}
    patch = []
    mean_raw = norm.pre_from_z(mean_z)
    for s in _chunks(n, chunk):
        p_raw, e_raw = pred[s].float(), pre[s].float()
        p_z, e_z = norm.pre_to_z(p_raw), norm.pre_to_z(e_raw)
        m_z, m_raw = mean_z.expand_as(e_z), mean_raw.expand_as(e_raw)
        tok = token_mse(p_z, e_z)
        patch.append(tok)
        cols["mse_z"].append(tok.mean(dim=-1))
        cols["mse_raw"].append(image_mse(p_raw, e_raw))
        cols["cosine"].append(image_cosine(p_raw, e_raw))
        cols["cosine_z"].append(image_cosine(p_z, e_z))
        cols["pooled_mse_z"].append(pooled_mse(pool_tokens(p_z), pool_tokens(e_z)))
        cols["pooled_cosine"].append(pooled_cosine(pool_tokens(p_raw), pool_tokens(e_raw)))
        cols["mean_mse_z"].append(image_mse(m_z, e_z))
        cols["mean_mse_raw"].append(image_mse(m_raw, e_raw))
        cols["mean_cosine"].append(image_cosine(m_raw, e_raw))
        cols["mean_pooled_mse_z"].append(pooled_mse(pool_tokens(m_z), pool_tokens(e_z)))
    columns = {k: torch.cat(v) for k, v in cols.items()}
    columns["ridge_pooled_mse_z"] = pooled_mse(ridge_z, pooled_pre_z)
    ridge_raw = ridge_z * norm.pre_std + norm.pre_mean  # pooling commutes with the per-feature affine map
    pooled_pre_raw = pooled_pre_z * norm.pre_std + norm.pre_mean
    columns["ridge_pooled_cosine"] = pooled_cosine(ridge_raw, pooled_pre_raw)

    summary = {"images": {TRAIN: int(is_train.sum()), VAL: int((~is_train).sum())},
               "tokens": {"n_pre": pre.shape[1], "d_pre": pre.shape[2], "n_post": post.shape[1], "d_post": post.shape[2]},
               "ridge_alpha": float(ridge.alpha_)}
    for side, mask in ((VAL, ~is_train), (TRAIN, is_train)):
        summary[side] = {k: float(v[mask].mean()) for k, v in columns.items()}
    val = summary[VAL]
    summary["beats_mean_baseline"] = bool(val["mse_z"] < val["mean_mse_z"])
    summary["beats_ridge_baseline"] = bool(val["pooled_mse_z"] < val["ridge_pooled_mse_z"])
    return columns, summary, torch.cat(patch)
