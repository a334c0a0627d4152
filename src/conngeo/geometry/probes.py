"""Linear probes: how well a space's pooled vectors [N, d] linearly encode a ground-truth attribute.

A probe reads one attribute of each image (a class: food kind, plate colour, "is a dog present";
or a number: a count) from the vectors of one space (E_pre, E_post, a reference encoder). Its
held-out score, beside the score of a predictor that ignores the vectors (chance), says what the
space keeps of that attribute in the world's own terms.

Method, for every fold f of a K-fold split (the same split for every space: it depends only on N,
the target and the seed, never on x):

  1. standardise: z = (x - mu_train) / sd_train, with the mean and (population, ddof=0) standard
     deviation of the *training* rows only; a column constant on the training rows is only
     centred (it carries nothing there). The test rows never influence mu or sd.
  2. ridge regression with an unpenalised intercept, in closed form, float64:

         b = mean_train(Y),  W = argmin ||Z W + b - Y||_F^2 + alpha ||W||_F^2
           = (Z^T Z + alpha I)^{-1} Z^T (Y - b)       (primal, d x d, when N_train >= d)
           = Z^T (Z Z^T + alpha I)^{-1} (Y - b)       (dual,   N_train x N_train, when N_train < d)

     Y is the one-hot matrix [N_train, C] of the training classes (one-vs-rest ridge; the same
     predictions as sklearn's RidgeClassifier, whose {-1, 1} targets are 2 Y - 1) or the column
     of values. One eigendecomposition of the Gram matrix serves every alpha.
  3. alpha: the grid value with the smallest exact leave-one-out squared error on the training
     rows (summed over the C target columns), from the hat matrix of the fit with intercept,

         H = 11^T / n + Z (Z^T Z + alpha I)^{-1} Z^T,   e_loo_i = (y_i - yhat_i) / (1 - H_ii),

     (the LOO refit re-estimates the intercept but keeps the training rows' mu and sd; this is what
     sklearn's RidgeCV computes). Ties go to the earlier grid value. The test rows play no part.
  4. predict the test rows: the class with the largest ridge output (so a class absent from the
     training rows is never predicted and its test rows count as errors), or the value itself.

Folds: labels are stratified (a seeded permutation, then each class's members dealt round-robin
to the folds, so fold sizes and per-class counts differ by at most one); numbers get a seeded
permutation dealt round-robin. An explicit [N] array of fold ids may be passed instead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from conngeo.geometry.knn import as_vectors

# Features are standardised, so the Gram matrix has trace N_train * d and its leading eigenvalues
# are of order N_train (correlated features) up to N_train * d; the grid runs from nearly
# unregularised to shrinking every direction but the strongest ones.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(10.0**k for k in range(-2, 7))

TARGET_KINDS = ("class", "number")


def probe_accuracy(x, labels, folds=5, alphas: Sequence[float] = DEFAULT_ALPHAS, seed: int = 0, *,
                   name: str = "x", target: str = "labels") -> dict:
    """Cross-validated accuracy of a one-vs-rest ridge probe predicting `labels` [N] from x [N, d].

        accuracy          = mean_f (1/|T_f|) sum_{i in T_f} [yhat_i == label_i]
        balanced_accuracy = (1/C) sum_c (1/|{i : label_i = c}|) sum_{i : label_i = c} [yhat_i == c]
        chance            = mean_f (1/|T_f|) sum_{i in T_f} [majority class of the training rows == label_i]

    yhat_i = argmax_c (z_i W_f + b_f)_c, the prediction of the fold f that holds row i as a test row, with
    W_f and b_f fitted on the other rows as the module docstring says (standardised on the training rows,
    alpha from the training rows' leave-one-out error); balanced accuracy pools every row's held-out
    prediction (sklearn's balanced_accuracy_score of cross-validated predictions). A predictor that
    ignores x scores 1/C balanced accuracy, whatever the class frequencies: with a rare class (a food
    kind on 1 plate in 5) accuracy rewards always answering "absent", balanced accuracy does not. The
    majority class breaks ties towards the first in sorted label order. `labels` may be ints, bools or
    strings (float arrays only if every value is integral). `folds` is the number K of folds
    (2 <= K <= N) or an explicit [N] array of fold ids. `name` and `target` label the errors.

    One-vs-rest least squares can miss a class whose mean lies between two others on one line
    (the "masking" of regression for classes): probe ordered targets such as counts as numbers.

    Returns {"accuracy", "balanced_accuracy", "chance", "folds", "n", "classes", "alpha"}: floats, the
    number of folds, of rows, of distinct classes over all N rows, and the alpha chosen in each fold.
    """
    x = _features(x, name)
    codes, classes = _class_codes(labels, x.shape[0], name, target)
    fold_ids = _fold_ids(folds, x.shape[0], seed, codes, name, target)
    accs, chance, chosen = [], [], []
    predicted = np.empty_like(codes)
    for train, test in _splits(fold_ids, name):
        tr_codes, uniq = codes[train], np.unique(codes[train])
        onehot = torch.from_numpy((tr_codes[:, None] == uniq[None, :]).astype(np.float64))
        scores, alpha = _ridge_fit_predict(x[train], onehot, x[test], alphas)
        pred = uniq[scores.argmax(dim=1).numpy()]
        predicted[test.numpy()] = pred
        counts = np.bincount(tr_codes)
        accs.append(float(np.mean(pred == codes[test])))
        chance.append(float(np.mean(codes[test] == counts.argmax())))  # argmax: first of equals
        chosen.append(alpha)
    recall = [float(np.mean(predicted[codes == c] == c)) for c in range(len(classes))]
    return {"accuracy": float(np.mean(accs)), "balanced_accuracy": float(np.mean(recall)),
            "chance": float(np.mean(chance)), "folds": len(accs), "n": int(x.shape[0]), "classes": len(classes),
            "alpha": chosen}


def probe_r2(x, values, folds=5, alphas: Sequence[float] = DEFAULT_ALPHAS, seed: int = 0, *,
             name: str = "x", target: str = "values") -> dict:
    """Cross-validated held-out R^2 of a ridge probe predicting numeric `values` [N] from x [N, d].

        SSE = sum_f sum_{i in T_f} (y_i - yhat_i)^2,     SST = sum_f sum_{i in T_f} (y_i - ybar_f)^2
        r2  = 1 - SSE / SST,   mse = SSE / N,   chance_mse = SST / N

    with yhat_i the probe fitted on the other folds and ybar_f the mean of the *training* rows of
    fold f: SST is the error of the chance predictor "the training mean", so r2 = 1 - mse /
    chance_mse, 0 for a probe no better than that mean, negative when worse. Sums are pooled over
    folds (not per-fold R^2 averaged: a small fold's SST can be tiny). `folds` as in probe_accuracy.

    Returns {"r2", "mse", "chance_mse", "folds", "n", "alpha"} (alpha: the value chosen per fold).
    """
    x = _features(x, name)
    y = _values(values, x.shape[0], name, target)
    fold_ids = _fold_ids(folds, x.shape[0], seed, None, name, target)
    sse = sst = 0.0
    chosen = []
    for train, test in _splits(fold_ids, name):
        pred, alpha = _ridge_fit_predict(x[train], y[train, None], x[test], alphas)
        sse += float((y[test] - pred[:, 0]).square().sum())
        sst += float((y[test] - y[train].mean()).square().sum())
        chosen.append(alpha)
    n = x.shape[0]
    if sst == 0:  # every test value equals its training mean: only possible for a constant target
        raise ValueError(f"{target}: the values do not vary across folds; R^2 is undefined")
    return {"r2": 1 - sse / sst, "mse": sse / n, "chance_mse": sst / n, "folds": len(chosen), "n": int(n),
            "alpha": chosen}


def probe_table(spaces: Mapping[str, object], targets: Mapping[str, tuple[str, object]], *, folds=5,
                alphas: Sequence[float] = DEFAULT_ALPHAS, seeds: Sequence[int] = (0,)) -> list[dict]:
    """Every target probed on every space under every fold seed: one row per (space, target, seed), spaces
    outer, seeds inner.

    spaces: name -> pooled vectors [N, d] (rows aligned across spaces and targets).
    targets: name -> (kind, values [N]) with kind "class" (probe_accuracy) or "number" (probe_r2).
    seeds: the seeds of the fold split; how far a score moves with the split is its spread.

    Each row: {"space", "target", "kind", "seed", "metric" ("balanced_accuracy" or "r2"), "score",
    "chance" (1/C for balanced accuracy, what a predictor that ignores the vectors scores; 0.0 for R^2,
    the R^2 of the training mean), "accuracy" (plain, None for numbers), "n", "folds", "classes" (None for
    numbers), "alpha" (the value chosen in most folds), "mse" and "chance_mse" (None for classes)}. The
    folds depend only on N, the target and the seed, so every space is scored on the same splits.
    """
    for tname, spec in targets.items():
        if not (isinstance(spec, tuple) and len(spec) == 2) or spec[0] not in TARGET_KINDS:
            raise ValueError(f"target {tname}: expected (kind, values) with kind in {TARGET_KINDS}, got {spec!r:.80}")
    rows = []
    for sname, x in spaces.items():
        for tname, (kind, values) in targets.items():
            for seed in seeds:
                kw = dict(folds=folds, alphas=alphas, seed=seed, name=sname, target=tname)
                row = {"space": sname, "target": tname, "kind": kind, "seed": seed}
                if kind == "class":
                    r = probe_accuracy(x, values, **kw)
                    row.update(metric="balanced_accuracy", score=r["balanced_accuracy"], chance=1 / r["classes"],
                               accuracy=r["accuracy"], classes=r["classes"], mse=None, chance_mse=None)
                else:
                    r = probe_r2(x, values, **kw)
                    row.update(metric="r2", score=r["r2"], chance=0.0, accuracy=None, classes=None, mse=r["mse"],
                               chance_mse=r["chance_mse"])
                row.update(n=r["n"], folds=r["folds"], alpha=Counter(r["alpha"]).most_common(1)[0][0])
                rows.append(row)
    return rows


# --- helpers --------------------------------------------------------------------------------


def _ridge_fit_predict(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                       alphas: Sequence[float]) -> tuple[torch.Tensor, float]:
    """Ridge outputs [n_test, C] for targets y_train [n, C], alpha by training-row LOO; see module doc."""
    alphas = [float(a) for a in alphas]
    if not alphas or min(alphas) <= 0:
        raise ValueError(f"alphas: expected a non-empty grid of positive values, got {alphas}")
    x_train, y_train, x_test = x_train.double(), y_train.double(), x_test.double()
    mu = x_train.mean(dim=0)
    sd = x_train.std(dim=0, correction=0)
    # Compare values, not sd: a constant column's computed mean can differ from the value by one
    # rounding step, leaving an sd of ~1e-17 that would blow rounding noise up to unit scale.
    sd[(x_train == x_train[0]).all(dim=0)] = 1.0
    z, z_test = (x_train - mu) / sd, (x_test - mu) / sd
    b = y_train.mean(dim=0)
    yc = y_train - b
    n, d = z.shape
    # One eigendecomposition per fold, of the smaller Gram matrix: lam (ascending) and an
    # orthonormal basis, so every alpha costs only matrix-vector work.
    primal = n >= d
    lam, vecs = torch.linalg.eigh(z.T @ z if primal else z @ z.T)
    lam = lam.clamp_min(0)  # rounding can leave tiny negative eigenvalues of a PSD matrix
    if primal:
        zv = z @ vecs  # [n, d]: Z V
        proj = zv.T @ yc  # V^T Z^T Yc
    else:
        proj = vecs.T @ yc  # U^T Yc
    alpha = alphas[0]
    if len(alphas) > 1:
        best = None
        for a in alphas:
            if primal:  # H_Z = Z V diag(1/(lam+a)) V^T Z^T
                fit = zv @ (proj / (lam + a)[:, None])
                h = zv.square() @ (1 / (lam + a))
            else:  # H_Z = U diag(lam/(lam+a)) U^T
                shrink = lam / (lam + a)
                fit = vecs @ (proj * shrink[:, None])
                h = vecs.square() @ shrink
            # h < 1 - 1/n for a > 0 (H's eigenvalues are 1 on the constant vector, < 1 elsewhere).
            err = ((yc - fit) / (1 - 1 / n - h)[:, None]).square().sum().item()
            if best is None or err < best:
                best, alpha = err, a
    if primal:
        w = vecs @ (proj / (lam + alpha)[:, None])
    else:
        w = z.T @ (vecs @ (proj / (lam + alpha)[:, None]))
    return z_test @ w + b, alpha


def _features(x, name: str) -> torch.Tensor:
    return as_vectors(x, name).to(torch.float64)


def _as_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _class_codes(labels, n: int, name: str, target: str) -> tuple[np.ndarray, np.ndarray]:
    """labels [n] as codes 0..C-1 into the sorted distinct classes; checks shape and class count."""
    lab = _as_numpy(labels)
    if lab.ndim != 1 or lab.shape[0] != n:
        raise ValueError(f"{target}: expected one label per row of {name} ({n}), got shape {lab.shape}")
    if lab.dtype.kind == "f":
        if not np.isfinite(lab).all() or (lab != np.round(lab)).any():
            raise ValueError(f"{target}: class labels must be integers (or strings); got non-integral or "
                             "NaN floats. For a numeric target use probe_r2 (kind 'number').")
    try:
        classes, codes = np.unique(lab, return_inverse=True)
    except TypeError as e:
        raise ValueError(f"{target}: labels of mixed or unorderable types ({e})") from None
    if len(classes) < 2:
        raise ValueError(f"{target}: only one class ({classes[0]!r}) among {n} rows; there is nothing to probe")
    return codes.reshape(-1), classes


def _values(values, n: int, name: str, target: str) -> torch.Tensor:
    y = _as_numpy(values)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{target}: expected one value per row of {name} ({n}), got shape {y.shape}")
    try:
        y = torch.from_numpy(y.astype(np.float64))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{target}: values must be numeric ({e})") from None
    bad = ~torch.isfinite(y)
    if bad.any():
        raise ValueError(f"{target}: {int(bad.sum())} of {n} values are NaN or inf (rows {bad.nonzero().flatten()[:10].tolist()})")
    if (y == y[0]).all():
        raise ValueError(f"{target}: all {n} values are equal ({y[0].item()}); there is nothing to probe")
    return y


def _fold_ids(folds, n: int, seed: int, codes: np.ndarray | None, name: str, target: str) -> np.ndarray:
    """[n] fold ids: the given array, or K folds dealt from a seeded permutation (stratified by codes)."""
    if not isinstance(folds, (int, np.integer)):
        ids = _as_numpy(folds)
        if ids.ndim != 1 or ids.shape[0] != n:
            raise ValueError(f"folds: expected an int or one fold id per row of {name} ({n}), got shape {ids.shape}")
        return ids
    if not 2 <= folds <= n:
        raise ValueError(f"folds={folds}: need 2 <= folds <= N = {n} rows of {name}")
    order = np.random.default_rng(seed).permutation(n)
    if codes is not None:
        # Stable sort of the shuffled rows by class: each class's members stay in random order and
        # are dealt round-robin continuing across classes, so every fold gets its share of each.
        order = order[np.argsort(codes[order], kind="stable")]
    ids = np.empty(n, dtype=np.int64)
    ids[order] = np.arange(n) % folds
    return ids


def _splits(fold_ids: np.ndarray, name: str):
    """(train, test) index tensors per distinct fold id, in sorted id order."""
    uniq = np.unique(fold_ids)
    if len(uniq) < 2:
        raise ValueError(f"folds: all rows of {name} are in one fold; need at least 2 folds")
    for f in uniq:
        test = np.flatnonzero(fold_ids == f)
        train = np.flatnonzero(fold_ids != f)
        if len(train) < 2:
            raise ValueError(f"folds: fold {f!r} leaves {len(train)} training row of {name}; need at least 2")
        yield torch.from_numpy(train), torch.from_numpy(test)
