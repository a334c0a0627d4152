"""Linear probes against scikit-learn, synthetic spaces with known decodability, and hand cases."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge, RidgeClassifier, RidgeCV
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import StandardScaler

from conngeo.geometry.probes import DEFAULT_ALPHAS, _fold_ids, _ridge_fit_predict, probe_accuracy, probe_r2, probe_table


def rng(seed):
    return np.random.default_rng(seed)


def separable(n=300, d=32, classes=3, sep=6.0, seed=0):
    """Each class's mean sep along its own random unit direction, isotropic unit noise, a common shift.
    (Means in general position: with three means on one line, one-vs-rest least squares cannot
    single out the middle class, the "masking" of linear regression for classes.)"""
    r = rng(seed)
    labels = np.arange(n) % classes
    u = r.standard_normal((classes, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    x = r.standard_normal((n, d)) + sep * u[labels] + 5.0
    return x, labels


def sklearn_fold(x, labels, train, test, alpha):
    """Reference per fold: StandardScaler fitted on the training rows, then RidgeClassifier and Ridge
    on one-hot targets, both with fit_intercept=True."""
    sc = StandardScaler().fit(x[train])
    ztr, zte = sc.transform(x[train]), sc.transform(x[test])
    clf = RidgeClassifier(alpha=alpha, fit_intercept=True, solver="svd").fit(ztr, labels[train])
    classes = np.unique(labels[train])
    reg = Ridge(alpha=alpha, fit_intercept=True, solver="svd").fit(ztr, (labels[train, None] == classes).astype(float))
    return clf.predict(zte), reg.predict(zte)


# --- (1) against scikit-learn ----------------------------------------------------------------


@pytest.mark.parametrize("n,d,classes,alpha", [(120, 10, 3, 3.0), (40, 60, 4, 0.5), (90, 8, 2, 30.0)])
def test_matches_sklearn_ridge_fixed_alpha(n, d, classes, alpha):
    # primal (n >= d), dual (n < d) and binary (sklearn uses one +-1 column there).
    r = rng(1)
    x = r.standard_normal((n, d)) * r.uniform(0.1, 10, d) + r.standard_normal(d) * 3
    score = x[:, 0] / x[:, 0].std() + r.standard_normal(n)
    labels = np.searchsorted(np.quantile(score, np.linspace(0, 1, classes + 1)[1:-1]), score)
    fold_ids = r.integers(0, 4, n)  # an explicit, unstratified split
    accs, held_out = [], np.empty(n, dtype=labels.dtype)
    for f in range(4):
        train, test = np.flatnonzero(fold_ids != f), np.flatnonzero(fold_ids == f)
        ref_pred, ref_scores = sklearn_fold(x, labels, train, test, alpha)
        held_out[test] = ref_pred
        onehot = torch.tensor(labels[train, None] == np.unique(labels[train]), dtype=torch.float64)
        scores, chosen = _ridge_fit_predict(torch.tensor(x[train]), onehot, torch.tensor(x[test]), [alpha])
        assert chosen == alpha
        np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-8, atol=1e-10)
        np.testing.assert_array_equal(np.unique(labels[train])[scores.argmax(1).numpy()], ref_pred)
        accs.append(np.mean(ref_pred == labels[test]))
    out = probe_accuracy(x, labels, folds=fold_ids, alphas=[alpha])
    assert out["accuracy"] == pytest.approx(np.mean(accs), abs=1e-12)
    assert out["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, held_out), abs=1e-12)
    assert out["alpha"] == [alpha] * 4 and out["folds"] == 4 and out["n"] == n and out["classes"] == classes


@pytest.mark.parametrize("n,d", [(100, 12), (30, 50)])
def test_alpha_choice_matches_sklearn_ridgecv_loo(n, d):
    # RidgeCV(cv=None) is sklearn's exact leave-one-out over the same grid, intercept unpenalised.
    r = rng(2)
    x = r.standard_normal((n, d))
    y3 = x[:, :3] @ r.standard_normal((3, 3)) + r.standard_normal((n, 3)) * 2
    grid = DEFAULT_ALPHAS
    z = StandardScaler().fit_transform(x)
    for y in (y3, y3[:, :1]):
        ref = RidgeCV(alphas=grid, fit_intercept=True).fit(z, y)
        pred, chosen = _ridge_fit_predict(torch.tensor(x), torch.tensor(y), torch.tensor(x[:5]), grid)
        assert chosen == ref.alpha_
        np.testing.assert_allclose(pred.numpy(), ref.predict(z[:5]).reshape(5, -1), rtol=1e-8)


def test_r2_matches_sklearn():
    r = rng(3)
    x = r.standard_normal((80, 6))
    y = x @ r.standard_normal(6) + r.standard_normal(80)
    fold_ids = np.arange(80) % 3
    sse = sst = 0.0
    for f in range(3):
        train, test = fold_ids != f, fold_ids == f
        sc = StandardScaler().fit(x[train])
        pred = Ridge(alpha=10.0).fit(sc.transform(x[train]), y[train]).predict(sc.transform(x[test]))
        sse += np.sum((y[test] - pred) ** 2)
        sst += np.sum((y[test] - y[train].mean()) ** 2)
    out = probe_r2(x, y, folds=fold_ids, alphas=[10.0])
    assert out["r2"] == pytest.approx(1 - sse / sst, rel=1e-10)
    assert out["mse"] == pytest.approx(sse / 80, rel=1e-10)
    assert out["chance_mse"] == pytest.approx(sst / 80, rel=1e-10)


# --- (2)-(4) decodable and undecodable targets -----------------------------------------------


def test_decodable_class_near_one():
    x, labels = separable()
    out = probe_accuracy(x, labels)
    assert out["accuracy"] > 0.97
    assert out["chance"] == pytest.approx(1 / 3, abs=0.02)  # balanced: the majority is a tie
    assert out["folds"] == 5 and out["n"] == 300 and out["classes"] == 3
    assert all(a in DEFAULT_ALPHAS for a in out["alpha"])


def test_independent_labels_near_chance():
    r = rng(4)
    x, labels = r.standard_normal((300, 32)), r.integers(0, 3, 300)
    out = probe_accuracy(x, labels)
    se = np.sqrt(out["chance"] * (1 - out["chance"]) / 300)  # binomial standard error over N rows
    assert abs(out["accuracy"] - out["chance"]) < 4 * se
    assert out["accuracy"] < 0.5


def test_balanced_accuracy_does_not_reward_the_majority_answer():
    r = rng(15)
    x, labels = r.standard_normal((400, 16)), (r.uniform(size=400) < 0.15).astype(int)  # a rare "present"
    out = probe_accuracy(x, labels)
    assert out["accuracy"] > 0.8                          # mostly "absent", right most of the time ...
    assert abs(out["balanced_accuracy"] - 0.5) < 0.08     # ... and no better than 1/C where it matters


def test_number_target():
    r = rng(5)
    x = r.standard_normal((300, 32))
    y = x @ r.standard_normal(32) + 0.05 * r.standard_normal(300)
    good = probe_r2(x, y)
    assert good["r2"] > 0.99
    assert good["mse"] < 0.01 * good["chance_mse"]
    bad = probe_r2(x, r.standard_normal(300))
    assert -0.15 < bad["r2"] < 0.05
    assert bad["r2"] == pytest.approx(1 - bad["mse"] / bad["chance_mse"])
    assert bad["chance_mse"] == pytest.approx(1.0, abs=0.2)


def test_counts_as_numbers_and_string_labels():
    x, labels = separable(n=150, d=8, classes=3, seed=6)
    counts = labels.astype(float)  # integral floats are fine as classes too
    assert probe_r2(x, counts)["r2"] > 0.8
    names = np.array(["red", "green", "blue"])[labels]
    assert probe_accuracy(x, names)["accuracy"] == probe_accuracy(x, counts)["accuracy"] == probe_accuracy(
        torch.tensor(x, dtype=torch.float32), torch.tensor(labels))["accuracy"]


# --- (5) no leakage --------------------------------------------------------------------------


def test_standardisation_uses_training_rows_only():
    # A test row's prediction must not depend on the other test rows: appending wild test rows
    # (which would move a test-fold mean/sd by orders of magnitude) changes nothing.
    r = rng(7)
    xtr, xte = r.standard_normal((60, 5)) * [1, 2, 3, 4, 5], r.standard_normal((10, 5))
    y = torch.tensor(xtr[:, :1] * 2 + 1)
    base, _ = _ridge_fit_predict(torch.tensor(xtr), y, torch.tensor(xte), [1.0])
    wild = np.vstack([xte, 1e3 * r.standard_normal((30, 5)) + 500])
    more, _ = _ridge_fit_predict(torch.tensor(xtr), y, torch.tensor(wild), [1.0])
    np.testing.assert_allclose(more[:10].numpy(), base.numpy(), rtol=1e-12)
    one, _ = _ridge_fit_predict(torch.tensor(xtr), y, torch.tensor(xte[3:4]), [1.0])
    np.testing.assert_allclose(one.numpy(), base[3:4].numpy(), rtol=1e-12)
    # and the training-row statistics are used (sklearn's scaler fitted on xtr alone)
    z = StandardScaler().fit(xtr)
    ref = Ridge(alpha=1.0).fit(z.transform(xtr), y.numpy()).predict(z.transform(xte))
    np.testing.assert_allclose(base.numpy(), ref.reshape(10, 1), rtol=1e-10)


def test_folds_deterministic_stratified_and_disjoint():
    labels = np.array([0] * 50 + [1] * 23 + [2] * 7)
    a = _fold_ids(5, 80, 0, labels, "x", "t")
    assert np.array_equal(a, _fold_ids(5, 80, 0, labels, "x", "t"))
    assert not np.array_equal(a, _fold_ids(5, 80, 1, labels, "x", "t"))
    assert np.bincount(a).tolist() == [16] * 5
    for c, size in ((0, 50), (1, 23), (2, 7)):
        per = np.bincount(a[labels == c], minlength=5)
        assert per.max() - per.min() <= 1 and per.sum() == size
    # the same split for every space: folds never depend on x
    x1, x2 = rng(8).standard_normal((80, 4)), rng(9).standard_normal((80, 7))
    assert probe_accuracy(x1, labels, alphas=[1.0])["chance"] == probe_accuracy(x2, labels, alphas=[1.0])["chance"]


def test_class_only_in_test_fold_counts_as_error():
    x, labels = separable(n=40, d=4, classes=2, sep=20.0, seed=10)
    labels = labels.copy()
    labels[0] = 7  # a singleton class
    x[0] = 100.0
    fold_ids = np.arange(40) % 4  # row 0 in fold 0 (10 rows)
    out = probe_accuracy(x, labels, folds=fold_ids, alphas=[1.0])
    assert out["classes"] == 3
    assert out["accuracy"] == pytest.approx((9 / 10 + 1 + 1 + 1) / 4)


# --- probe_table -----------------------------------------------------------------------------


def test_probe_table_rows():
    x, labels = separable(n=90, d=6, classes=3, seed=11)
    noise = rng(12).standard_normal((90, 5))
    counts = labels * 2.0 + 0.1 * rng(13).standard_normal(90)
    rows = probe_table({"E_pre": x, "E_post": noise}, {"food": ("class", labels), "count": ("number", counts)}, folds=3,
                       seeds=(0, 1))
    assert [(r["space"], r["target"], r["seed"]) for r in rows] == [
        (space, target, seed) for space in ("E_pre", "E_post") for target in ("food", "count") for seed in (0, 1)]
    food = probe_accuracy(x, labels, folds=3, seed=1)
    assert rows[1]["score"] == food["balanced_accuracy"] and rows[1]["accuracy"] == food["accuracy"]
    assert rows[0]["metric"] == "balanced_accuracy" and rows[0]["classes"] == 3 and rows[0]["mse"] is None
    assert rows[0]["chance"] == pytest.approx(1 / 3)  # a predictor that ignores x
    assert rows[2]["metric"] == "r2" and rows[2]["chance"] == 0.0 and rows[2]["classes"] is None
    assert rows[2]["score"] == probe_r2(x, counts, folds=3)["r2"] > 0.9
    assert rows[0]["score"] != rows[1]["score"] or rows[2]["score"] != rows[3]["score"]  # the split moves it
    assert rows[4]["score"] < 0.6 and rows[6]["score"] < 0.1
    assert all(r["n"] == 90 and r["folds"] == 3 and r["alpha"] in DEFAULT_ALPHAS for r in rows)
    with pytest.raises(ValueError, match="target food: expected \\(kind, values\\)"):
        probe_table({"E_pre": x}, {"food": ("category", labels)})


# --- (6) errors ------------------------------------------------------------------------------


def test_errors_name_the_input():
    x, labels = separable(n=30, d=4, seed=14)
    with pytest.raises(ValueError, match="plate_colour: only one class"):
        probe_accuracy(x, np.zeros(30, int), target="plate_colour")
    with pytest.raises(ValueError, match=r"plate_colour: expected one label per row of E_post \(30\)"):
        probe_accuracy(x, labels[:29], name="E_post", target="plate_colour")
    with pytest.raises(ValueError, match=r"count: expected one value per row of E_post \(30\)"):
        probe_r2(x, np.ones(31), name="E_post", target="count")
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="E_post: 1 of 30 vectors contain NaN"):
        probe_accuracy(bad, labels, name="E_post")
    with pytest.raises(ValueError, match="E_post: 1 of 30 vectors contain NaN"):
        probe_r2(bad, labels * 1.0, name="E_post")
    with pytest.raises(ValueError, match="count: 1 of 30 values are NaN"):
        probe_r2(x, np.where(np.arange(30) == 5, np.nan, 1.0 * labels), target="count")
    with pytest.raises(ValueError, match="count: all 30 values are equal"):
        probe_r2(x, np.full(30, 2.0), target="count")
    with pytest.raises(ValueError, match="food: class labels must be integers"):
        probe_accuracy(x, labels + 0.5, target="food")
    with pytest.raises(ValueError, match="folds=31"):
        probe_accuracy(x, labels, folds=31)
    with pytest.raises(ValueError, match="alphas"):
        probe_accuracy(x, labels, alphas=[0.0, 1.0])
