"""Baselines a reconstructor must beat, fitted on the training split only, in z-units.

- mean: every image gets the training mean of E_pre at each token position,
  M[t, d] = (1/N_train) sum_n Z_pre[n, t, d]. Compared with the reconstructor token by token
  (per-token / per-image MSE). Per position, not one vector for all tokens, so positional structure
  of the encoder (e.g. position embeddings) is credited to the baseline, not to the reconstructor.
- linear: the best linear map from E_post to E_pre at token level, closed-form ridge on the same z-MSE
  as the learned reconstructor (`TokenLinear`). A learned reconstructor that does not beat it is underfit:
  a linear map is inside what it can represent.
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


class TokenLinear:
    """Closed-form ridge reconstruction of z(E_pre) from z(E_post), token by token where the connector's
    tokens correspond, for the whole image where they do not.

    `pre_to_post[t]` is the E_post token that E_pre token t is merged into (LLaVA's projector: t itself;
    a Qwen merger: t // 4 in the stored order), or None for a connector that mixes every token (a
    resampler). With a correspondence, E_pre token t is predicted from [z_post[pre_to_post[t]], 1] by a
    map shared across the image and across the units, one per slot (t's place among the E_pre tokens of
    its E_post token: LLaVA 1 slot, Qwen 4). Without one, vec(z_pre) is predicted from [vec(z_post), 1]:
    a single unit per image. Each map: W = (X^T X + alpha I')^-1 X^T Y, the bias not penalised, in
    float64, from sums over the training images streamed in (`add`); alpha is the one of `alphas` with
    the smallest z-MSE on the validation images (`choose`). `predict` gives [N, n_pre, d_pre].
    """

    def __init__(self, n_pre: int, d_pre: int, n_post: int, d_post: int, pre_to_post: list[int] | None):
        self.shape = (n_pre, d_pre, n_post, d_post)
        if pre_to_post is None:
            self.slots = [list(range(n_pre))]  # one unit: the whole image
            self.features = n_post * d_post + 1
        else:
            if len(pre_to_post) != n_pre or not all(0 <= j < n_post for j in pre_to_post):
                raise ValueError(f"pre_to_post must give, for each of {n_pre} E_pre tokens, an E_post token < {n_post}")
            seen: dict[int, int] = {}
            slot = []
            for j in pre_to_post:
                slot.append(seen.get(j, 0))
                seen[j] = slot[-1] + 1
            self.slots = [[t for t in range(n_pre) if slot[t] == s] for s in range(max(slot) + 1)]
            self.features = d_post + 1
        self.pre_to_post = pre_to_post
        self.xx = torch.zeros(len(self.slots), self.features, self.features, dtype=torch.float64)
        outputs = d_pre if pre_to_post is not None else n_pre * d_pre
        self.xy = torch.zeros(len(self.slots), self.features, outputs, dtype=torch.float64)
        self.weights: list[torch.Tensor] | None = None
        self.alpha: float | None = None

    def _units(self, post_z: torch.Tensor, s: int) -> tuple[torch.Tensor, list[int]]:
        """The inputs [units, features] of slot s and the E_pre tokens they predict."""
        tokens = self.slots[s]
        if self.pre_to_post is None:
            x = post_z.reshape(post_z.shape[0], -1)
        else:
            x = post_z[:, [self.pre_to_post[t] for t in tokens]].reshape(-1, post_z.shape[-1])
        return torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1), tokens

    def _targets(self, pre_z: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        y = pre_z[:, tokens]
        return (y.reshape(y.shape[0], -1) if self.pre_to_post is None else y.reshape(-1, y.shape[-1])).double()

    def add(self, post_z: torch.Tensor, pre_z: torch.Tensor) -> None:
        """Add training images (z-units) to the sums."""
        for s in range(len(self.slots)):
            x, tokens = self._units(post_z, s)
            self.xx[s] += x.T @ x
            self.xy[s] += x.T @ self._targets(pre_z, tokens)

    def solve(self, alpha: float) -> list[torch.Tensor]:
        penalty = torch.eye(self.features, dtype=torch.float64) * alpha
        penalty[-1, -1] = 0.0  # the bias
        return [torch.linalg.solve(xx + penalty, xy) for xx, xy in zip(self.xx, self.xy)]

    def predict(self, post_z: torch.Tensor, weights: list[torch.Tensor] | None = None) -> torch.Tensor:
        """[N, n_pre, d_pre] float32 predictions of z(E_pre) from z(E_post) [N, n_post, d_post]."""
        weights = weights or self.weights
        n_pre, d_pre = self.shape[:2]
        out = torch.empty(post_z.shape[0], n_pre, d_pre, dtype=torch.float64)
        for s, w in enumerate(weights):
            x, tokens = self._units(post_z, s)
            out[:, tokens] = (x @ w).reshape(post_z.shape[0], len(tokens), d_pre)
        return out.float()

    def choose(self, batches, alphas) -> dict[float, float]:
        """Fix alpha: the one with the smallest z-MSE over `batches` of (post_z, pre_z) validation images
        (an iterable that can be read once); returns every alpha's validation z-MSE."""
        solved = {alpha: self.solve(alpha) for alpha in alphas}
        error, count = dict.fromkeys(alphas, 0.0), 0
        for post_z, pre_z in batches:
            count += pre_z.shape[0]
            for alpha, weights in solved.items():
                error[alpha] += (self.predict(post_z, weights) - pre_z).pow(2).mean(dim=(1, 2)).sum().item()
        mse = {alpha: e / max(count, 1) for alpha, e in error.items()}
        self.alpha = min(mse, key=mse.get)
        self.weights = solved[self.alpha]
        return mse
