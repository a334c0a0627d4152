"""Baselines a reconstructor must beat, fitted on the training split only, in z-units.

- mean: every image gets the training mean of E_pre at each token position,
  M[t, d] = (1/N_train) sum_n Z_pre[n, t, d]. Compared with the reconstructor token by token
  (per-token / per-image MSE). Per position, not one vector for all tokens, so positional structure
  of the encoder (e.g. position embeddings) is credited to the baseline, not to the reconstructor.
- ridge: a linear map from the pooled E_post of an image to its pooled E_pre (pooling = mean over
  tokens, both in z-units), scikit-learn RidgeCV with its efficient leave-one-out choice of alpha
  among `alphas` on the training images. It predicts one vector per image, so it is compared with
  the reconstructor's output pooled the same way: pooled MSE between mean_t P[n, t] and
  mean_t Z_pre[n, t]. It answers "does the token-level reconstructor recover at least the
  image-level content a linear read-out of the pooled E_post recovers".
"""

from __future__ import annotations

import numpy as np
import torch

DEFAULT_ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def mean_baseline(train_pre_z: torch.Tensor) -> torch.Tensor:
    """[T, D]: M[t, d] = (1/N_train) sum_n Z_pre[n, t, d] over the training images given."""
    return train_pre_z.double().mean(dim=0).float()


def fit_ridge(pooled_post_z: torch.Tensor, pooled_pre_z: torch.Tensor, alphas=DEFAULT_ALPHAS) -> "RidgeCV":
    """RidgeCV from pooled E_post [N, D_post] to pooled E_pre [N, D_pre] of the training images
    (z-units, pooled with pool_tokens)."""
    from sklearn.linear_model import RidgeCV  # here, not at import: sklearn takes a second to load

    x, y = pooled_post_z.double().numpy(), pooled_pre_z.double().numpy()
    return RidgeCV(alphas=np.asarray(alphas, dtype=float)).fit(x, y)


def predict_ridge(ridge: "RidgeCV", pooled_post_z: torch.Tensor) -> torch.Tensor:
    """[N, D_pre]: the pooled E_pre (z-units) the ridge map predicts from each image's pooled E_post."""
    return torch.from_numpy(ridge.predict(pooled_post_z.double().numpy())).float()
