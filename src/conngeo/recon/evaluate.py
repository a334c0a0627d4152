"""Per-image reconstruction metrics, the baselines, and the summary per split, streaming.

Columns of the per-image table (z: z-units of the training split's statistics; raw: as extracted):

    mse_z, mse_raw          image_mse of the reconstruction (per token, then mean over tokens)
    cosine, cosine_z        image_cosine (mean per-token cosine), raw and z-units
    pooled_mse_z            pooled_mse of mean_t reconstruction vs mean_t E_pre (z)
    pooled_cosine           pooled_cosine of the same, raw units
    mean_mse_z, mean_mse_raw, mean_cosine, mean_pooled_mse_z    the mean baseline, same formulas
    linear_mse_z, linear_cosine                                 the token-level linear baseline
    ridge_pooled_mse_z, ridge_pooled_cosine                     the ridge baseline (pooled only)

The summary holds the mean of every column over the images of each split (train: fitted the
reconstructor, the normalisation and the baselines; val: chose the checkpoint and the linear
baseline's alpha; test: touched by neither, the numbers to report), and the verdicts on test:
beats_mean_baseline (mse_z < mean_mse_z), beats_linear_baseline (mse_z < linear_mse_z; otherwise the
reconstructor is underfit: the linear map is inside what it can represent) and beats_ridge_baseline
(pooled_mse_z < ridge_pooled_mse_z). See conngeo.recon.baselines for what each baseline predicts.
"""

from __future__ import annotations

import torch

from conngeo.recon.baselines import DEFAULT_ALPHAS, TokenLinear, fit_ridge, predict_ridge
from conngeo.recon.data import SPLITS, TEST, TRAIN, VAL, Normalizer, windows
from conngeo.recon.metrics import image_cosine, image_mse, pool_tokens, pooled_cosine, pooled_mse, token_mse

COLUMNS = ("mse_z", "mse_raw", "cosine", "cosine_z", "pooled_mse_z", "pooled_cosine", "mean_mse_z", "mean_mse_raw",
           "mean_cosine", "mean_pooled_mse_z", "linear_mse_z", "linear_cosine")


def reconstruction_report(original, rebuilt, split: list[str], norm: Normalizer, pre_to_post: list[int] | None,
                          alphas=DEFAULT_ALPHAS, window: int = 256, linear_max_features: int = 16384):
    """(columns, summary, patch_mse_z) for the reconstructed E_pre of `rebuilt` against `original`.

    original: a source of E_pre and E_post (VectorReader or Pairs), rebuilt: one of E_pre (the same images
    in the same order); split: "train" / "val" / "test" per image; pre_to_post: the connector's token
    correspondence for the linear baseline (TokenLinear), which is left out (NaN) where it would need more
    than `linear_max_features` inputs. Reads `window` images at a time, so only pooled vectors and
    per-image numbers exist for all N at once.
    columns: dict of per-image tensors [N] (module docstring); summary: JSON-ready dict;
    patch_mse_z: token_mse in z-units [N, T] (token order as stored) for patch-loss maps.
    """
    n = len(original)
    if len(rebuilt) != n or list(rebuilt.stems) != list(original.stems):
        raise ValueError("the reconstructions do not hold the original images in the same order; "
                         "re-export them with the current reconstructor")
    n_pre, d_pre, n_post, d_post = (original.tokens("pre"), original.width["pre"], original.tokens("post"),
                                    original.width["post"])
    if (rebuilt.tokens("pre"), rebuilt.width["pre"]) != (n_pre, d_pre):
        raise ValueError(f"reconstructions of {rebuilt.tokens('pre')}x{rebuilt.width['pre']} tokens differ from E_pre "
                         f"{n_pre}x{d_pre}; re-export them with the current reconstructor")
    index = {side: [i for i, s in enumerate(split) if s == side] for side in SPLITS}
    everything = list(range(n))

    # Baselines from the training images only (the linear one's alpha from the validation images).
    mean_z = torch.zeros(n_pre, d_pre, dtype=torch.float64)
    features = d_post + 1 if pre_to_post is not None else n_post * d_post + 1
    use_linear = features <= linear_max_features
    linear = TokenLinear(n_pre, d_pre, n_post, d_post, pre_to_post) if use_linear else None
    pooled_post, pooled_pre = [], []
    for part in windows(everything, window):
        pre_z, post_z = norm.pre_to_z(original.read("pre", part)), norm.post_to_z(original.read("post", part))
        pooled_pre.append(pool_tokens(pre_z))
        pooled_post.append(pool_tokens(post_z))
        rows = [k for k, i in enumerate(part) if split[i] == TRAIN]
        mean_z += pre_z[rows].double().sum(dim=0)
        if use_linear and rows:
            linear.add(post_z[rows], pre_z[rows])
    mean_z = (mean_z / len(index[TRAIN])).float()
    pooled_post_z, pooled_pre_z = torch.cat(pooled_post), torch.cat(pooled_pre)
    is_train = torch.tensor([s == TRAIN for s in split])
    ridge = fit_ridge(pooled_post_z[is_train], pooled_pre_z[is_train], alphas)
    ridge_z = predict_ridge(ridge, pooled_post_z)
    linear_val = {}
    if use_linear:
        linear_val = linear.choose(((norm.post_to_z(original.read("post", part)),
                                     norm.pre_to_z(original.read("pre", part))) for part in windows(index[VAL], window)),
                                   alphas)

    cols: dict[str, list] = {k: [] for k in COLUMNS}
    patch = []
    mean_raw = norm.pre_from_z(mean_z)
    for part in windows(everything, window):
        e_raw, p_raw = original.read("pre", part), rebuilt.read("pre", part)
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
        if use_linear:
            l_z = linear.predict(norm.post_to_z(original.read("post", part)))
            cols["linear_mse_z"].append(image_mse(l_z, e_z))
            cols["linear_cosine"].append(image_cosine(norm.pre_from_z(l_z), e_raw))
        else:
            cols["linear_mse_z"].append(torch.full((len(part),), float("nan")))
            cols["linear_cosine"].append(torch.full((len(part),), float("nan")))
    columns = {k: torch.cat(v) for k, v in cols.items()}
    columns["ridge_pooled_mse_z"] = pooled_mse(ridge_z, pooled_pre_z)
    ridge_raw = ridge_z * norm.pre_std + norm.pre_mean  # pooling commutes with the per-feature affine map
    pooled_pre_raw = pooled_pre_z * norm.pre_std + norm.pre_mean
    columns["ridge_pooled_cosine"] = pooled_cosine(ridge_raw, pooled_pre_raw)

    summary = {"images": {side: len(index[side]) for side in SPLITS},
               "tokens": {"n_pre": n_pre, "d_pre": d_pre, "n_post": n_post, "d_post": d_post},
               "ridge_alpha": float(ridge.alpha_),
               "linear": ({"alpha": linear.alpha, "units": "tokens" if pre_to_post is not None else "images",
                           "slots": len(linear.slots), "val_mse_z": {str(a): e for a, e in linear_val.items()}}
                          if use_linear else {"not_computed": f"{features} inputs per unit exceed "
                                                              f"linear_max_features {linear_max_features}"})}
    for side in SPLITS:
        mask = torch.tensor([s == side for s in split])
        summary[side] = {k: float(v[mask].double().mean()) for k, v in columns.items()}
    test = summary[TEST]
    summary["beats_mean_baseline"] = bool(test["mse_z"] < test["mean_mse_z"])
    summary["beats_linear_baseline"] = bool(test["mse_z"] < test["linear_mse_z"]) if use_linear else None
    summary["underfit"] = (not summary["beats_linear_baseline"]) if use_linear else None
    summary["beats_ridge_baseline"] = bool(test["pooled_mse_z"] < test["ridge_pooled_mse_z"])
    return columns, summary, torch.cat(patch)
