"""Reconstructors (conngeo.recon) and the recon stages, on synthetic connectors with known inverses."""

import hashlib
import json
import random
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from conngeo.data.vectors import VectorReader, write_shard
from conngeo.recon import (TEST, TRAIN, VAL, Normalizer, Pairs, ReconConfig, TokenLinear, TrainSettings,
                           build_reconstructor, choose_model_type, evaluate, fit_ridge, image_cosine, image_mse,
                           load_pairs, load_reconstructor, mean_baseline, pool_tokens, pooled_cosine, pooled_mse,
                           predict_ridge, reconstruction_report, save_reconstructor, split_by_stem, stack_tokens,
                           token_cosine, token_mse, train_reconstructor)
from conngeo.recon.train import STATE, epoch_windows

ROOT = Path(__file__).resolve().parents[1]


def stems(n):
    return [f"img{i:04d}" for i in range(n)]


def affine_pairs(n=400, tokens=6, d=8, seed=0):
    """post = pre @ W + b with W invertible: the exact inverse is a per-token affine map."""
    g = torch.Generator().manual_seed(seed)
    pre = 3 * torch.randn(n, tokens, d, generator=g) + 1
    w = torch.randn(d, d, generator=g) + 2 * torch.eye(d)
    return Pairs(stems(n), pre, pre @ w + torch.randn(d, generator=g))


def merge_pairs(n=400, side=4, d=4, seed=0):
    """Qwen-like: E_pre rows 4j..4j+3 concatenated, times an invertible W, are E_post row j."""
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(n, side * side, d, generator=g)
    w = torch.randn(4 * d, 4 * d, generator=g) / 2 + torch.eye(4 * d)
    return Pairs(stems(n), pre, pre.reshape(n, side * side // 4, 4 * d) @ w + 0.5)


def split_indices(pairs, val_fraction=0.2, test_fraction=0.2):
    """Image indices of the train, val and test splits."""
    split = split_by_stem(pairs.stems, val_fraction, test_fraction)
    return tuple([i for i, s in enumerate(split) if s == side] for side in (TRAIN, VAL, TEST))


def settings(**kw):
    """Training settings for the tests: every field named (nothing has a default of its own)."""
    return TrainSettings(**{"epochs": 6, "batch_size": 16, "lr": 3e-3, "warmup": 5, "weight_decay": 0.01,
                            "patience": 10, "seed": 0, "device": "cpu", "window": 10**6, **kw})


def config_for(pairs, model_type, **kw):
    return ReconConfig(model_type, pairs.post.shape[1], pairs.post.shape[2], pairs.pre.shape[1], pairs.pre.shape[2], **kw)


# -- recovery of known connectors -----------------------------------------------------------------

def test_mlp_recovers_an_invertible_affine_connector(tmp_path):
    pairs = affine_pairs()
    train, val, test = split_indices(pairs)
    norm = Normalizer.fit(pairs, train)
    summary = train_reconstructor(config_for(pairs, "mlp", hidden_size=64), pairs, train, val, norm,
                                  settings(epochs=60, batch_size=32, warmup=20, weight_decay=0.0, patience=60), tmp_path)
    model, _ = load_reconstructor(tmp_path)
    test_loss = evaluate(model, pairs, test, norm, window=16)["loss"]
    mean_loss = (norm.pre_to_z(pairs.pre[test]) - mean_baseline(norm.pre_to_z(pairs.pre[train]))).pow(2).mean().item()
    assert mean_loss > 0.9  # predicting the mean is about 1 z-unit^2: the task is not trivial
    assert test_loss < 0.01 and summary["best_val_loss"] < 0.01


def test_transformer_recovers_a_token_merging_connector(tmp_path):
    pairs = merge_pairs()
    train, val, test = split_indices(pairs)
    norm = Normalizer.fit(pairs, train)
    config = config_for(pairs, "transformer", hidden_size=64, num_layers=1, num_heads=4)
    train_reconstructor(config, pairs, train, val, norm, settings(epochs=40, batch_size=32, lr=5e-3, warmup=20,
                                                                  weight_decay=0.0, patience=40), tmp_path)
    model, _ = load_reconstructor(tmp_path)
    assert evaluate(model, pairs, test, norm, window=16)["loss"] < 0.02


def test_token_order_is_respected():
    g = torch.Generator().manual_seed(0)
    post = torch.randn(2, 9, 8, generator=g)
    perm = torch.randperm(9, generator=g)
    torch.manual_seed(0)
    transformer = build_reconstructor(ReconConfig("transformer", 9, 8, 36, 5, hidden_size=16, num_layers=1, num_heads=2)).eval()
    out = transformer(post)
    assert out.shape == (2, 36, 5)
    assert not torch.allclose(transformer(post[:, perm]), out, atol=1e-4)  # E_post positions matter
    mlp = build_reconstructor(ReconConfig("mlp", 9, 8, 9, 5, hidden_size=16)).eval()
    assert torch.allclose(mlp(post[:, perm]), mlp(post)[:, perm], atol=1e-6)  # token i -> token i


def test_model_type_choice():
    assert choose_model_type("auto", 36, 36) == "mlp"
    assert choose_model_type("auto", 36, 9) == "transformer"
    assert choose_model_type("transformer", 36, 36) == "transformer"
    with pytest.raises(ValueError, match="use model_type transformer"):
        choose_model_type("mlp", 36, 16)
    with pytest.raises(ValueError, match="unknown"):
        choose_model_type("lstm", 36, 36)


# -- split and normalisation ----------------------------------------------------------------------

def test_split_by_stem_is_deterministic_and_order_free():
    names = [f"study_{s:03d}_{i:05d}" for s in range(3) for i in range(400)]
    split = dict(zip(names, split_by_stem(names, 0.2, 0.25)))
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    assert dict(zip(shuffled, split_by_stem(shuffled, 0.2, 0.25))) == split
    subset = names[::7]
    assert dict(zip(subset, split_by_stem(subset, 0.2, 0.25))) == {s: split[s] for s in subset}  # others don't matter
    for s in names[:50]:  # the documented rule
        h = int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big") / 2**64
        assert split[s] == (TEST if h < 0.25 else VAL if h < 0.45 else TRAIN)
    shares = {side: list(split.values()).count(side) / len(names) for side in (TRAIN, VAL, TEST)}
    assert 0.15 < shares[VAL] < 0.25 and 0.2 < shares[TEST] < 0.3
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_stem(names, 0.0, 0.2)
    with pytest.raises(ValueError, match="sum to < 1"):
        split_by_stem(names, 0.5, 0.5)
    with pytest.raises(ValueError, match="none of 1 images"):
        split_by_stem(names[:1], 0.3, 0.3)


def test_split_file_survives_commas_and_quotes(tmp_path):
    from conngeo.recon import read_split, write_split

    names = ['a,b', 'say "hi"', "plain", "naïve café"]
    write_split(tmp_path / "split.csv", names, [TRAIN, VAL, TEST, TRAIN])
    assert read_split(tmp_path / "split.csv") == dict(zip(names, [TRAIN, VAL, TEST, TRAIN]))


def test_normalizer_statistics_and_round_trip(tmp_path):
    pairs = affine_pairs(n=20)
    pairs.pre[:, :, 0] = 5.0  # a constant feature: std 1, maps to 0
    norm = Normalizer.fit(pairs, window=3)  # streamed in windows of 3 images
    flat = pairs.pre.reshape(-1, pairs.pre.shape[2]).double().numpy()
    assert np.allclose(norm.pre_mean.numpy(), flat.mean(axis=0), atol=1e-6, rtol=1e-6)  # numpy, two passes
    assert np.allclose(norm.pre_std.numpy()[1:], flat.std(axis=0)[1:], rtol=1e-6)
    assert torch.equal(Normalizer.fit(pairs, list(range(0, 20, 2)), window=4).pre_mean,
                       Normalizer.fit(pairs.select(torch.arange(20) % 2 == 0)).pre_mean)  # indices = the subset
    assert norm.pre_std[0] == 1 and torch.all(norm.pre_to_z(pairs.pre)[:, :, 0] == 0)
    assert torch.allclose(norm.pre_from_z(norm.pre_to_z(pairs.pre)), pairs.pre, atol=1e-5)
    norm.save(tmp_path / "norm.safetensors")
    again = Normalizer.load(tmp_path / "norm.safetensors")
    assert all(torch.equal(getattr(norm, k), getattr(again, k)) for k in ("pre_mean", "pre_std", "post_mean", "post_std"))
    with pytest.raises(FileNotFoundError, match="train the reconstructor first"):
        Normalizer.load(tmp_path / "missing.safetensors")


# -- checkpoints: eval-only and resume --------------------------------------------------------------

def quick_run(**kw):
    pairs = affine_pairs(n=120)
    train, val, _ = split_indices(pairs)
    norm = Normalizer.fit(pairs, train)
    config = config_for(pairs, "mlp", hidden_size=16, dropout=0.1)
    return config, pairs, train, val, norm, settings(**kw)


def test_saved_best_model_reloads_with_the_same_validation_loss(tmp_path):
    config, pairs, train, val, norm, s = quick_run()
    summary = train_reconstructor(config, pairs, train, val, norm, s, tmp_path / "a")
    best = min(row["val/loss"] for row in summary["history"])
    model, loaded = load_reconstructor(tmp_path / "a")
    assert loaded == config
    assert evaluate(model, pairs, val, norm, window=16)["loss"] == pytest.approx(best, rel=1e-6) == summary["best_val_loss"]
    torch.manual_seed(123)
    assert evaluate(build_reconstructor(config), pairs, val, norm, window=16)["loss"] != best  # the weights did come from disk
    assert not (tmp_path / "a" / STATE).exists()  # removed once training finished


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    config, pairs, train, val, norm, s = quick_run()
    straight = train_reconstructor(config, pairs, train, val, norm, s, tmp_path / "straight")

    def crash(epoch, values):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_reconstructor(config, pairs, train, val, norm, s, tmp_path / "resumed", log=crash)
    assert (tmp_path / "resumed" / STATE).is_file()
    resumed = train_reconstructor(config, pairs, train, val, norm, s, tmp_path / "resumed")
    assert resumed["resumed_from_epoch"] == 3
    assert [r["val/loss"] for r in resumed["history"]] == [r["val/loss"] for r in straight["history"]]
    a, b = load_file(str(tmp_path / "straight/model.safetensors")), load_file(str(tmp_path / "resumed/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a state from other settings is not reused
    with pytest.raises(KeyboardInterrupt):
        train_reconstructor(config, pairs, train, val, norm, s, tmp_path / "other", log=crash)
    s.lr = 1e-3
    assert train_reconstructor(config, pairs, train, val, norm, s, tmp_path / "other")["resumed_from_epoch"] is None

    # nor a state from other vectors of the same images (e.g. re-extracted from a model retrained in place)
    with pytest.raises(KeyboardInterrupt):
        train_reconstructor(config, pairs, train, val, norm, s, tmp_path / "data", log=crash)
    other = Pairs(pairs.stems, pairs.pre * 2, pairs.post)
    assert train_reconstructor(config, other, train, val, Normalizer.fit(other, train), s,
                               tmp_path / "data")["resumed_from_epoch"] is None


def reference_training(config, pairs, train, val, norm, s):
    """An independent in-memory loop over the same windows and batches: every training image on hand,
    the loss and the update written out again."""
    torch.manual_seed(s.seed)
    model = build_reconstructor(config)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}], lr=s.lr)
    from conngeo.schedule import warmup_cosine
    zpre, zpost = norm.pre_to_z(pairs.pre), norm.post_to_z(pairs.post)
    batches = lambda part: [part[i:i + s.batch_size] for i in range(0, len(part), s.batch_size)]  # noqa: E731
    total = s.epochs * sum(len(batches(w)) for w in epoch_windows(train, s.window, 0))
    losses, step = [], 0
    for epoch in range(s.epochs):
        torch.manual_seed(s.seed * 1_000_003 + epoch)
        epoch_loss = 0.0
        for part in epoch_windows(train, s.window, s.seed * 1_000_003 + epoch):
            for batch in batches(part):
                for group in opt.param_groups:
                    group["lr"] = s.lr * warmup_cosine(step, total, s.warmup)
                loss = (model(zpost[batch]) - zpre[batch]).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step += 1
                epoch_loss += loss.item() * len(batch)
        losses.append(epoch_loss / len(train))
    return losses


def sharded_pairs(folder):
    """60 affine pairs, in memory and written as three vector shards under `folder` (read back by a VectorReader)."""
    pairs = affine_pairs(n=60, tokens=4, d=3)
    for k in range(3):
        sl = slice(20 * k, 20 * (k + 1))
        write_shard(folder / f"s{k}", pairs.stems[sl], list(pairs.pre[sl]), list(pairs.post[sl]))
    return pairs, VectorReader([folder / f"s{k}" for k in range(3)])


def test_streaming_from_shards_equals_the_in_memory_computation(tmp_path):
    """Shards on disk read in windows of 7 images give the statistics and the losses of an in-memory
    computation of the same order (to float precision)."""
    pairs, reader = sharded_pairs(tmp_path)
    train, val, _ = split_indices(pairs)
    streamed, in_memory = Normalizer.fit(reader, train, window=7), Normalizer.fit(pairs, train, window=10**6)
    for key in ("pre_mean", "pre_std", "post_mean", "post_std"):
        torch.testing.assert_close(getattr(streamed, key), getattr(in_memory, key), rtol=1e-6, atol=1e-7)
    config = config_for(pairs, "mlp", hidden_size=8)
    s = settings(window=7, batch_size=4, epochs=3)
    summary = train_reconstructor(config, reader, train, val, in_memory, s, tmp_path / "r")
    want = reference_training(config, pairs, train, val, in_memory, s)
    assert [round(r["train/loss"], 5) for r in summary["history"]] == [round(x, 5) for x in want]
    assert len(epoch_windows(train, 7, 0)) == -(-len(train) // 7)  # memory: at most 7 images a window


def test_training_data_held_in_memory_gives_the_weights_of_reading_every_epoch(tmp_path, monkeypatch):
    """When the training and validation images fit in one window they are read once (`in_memory`); the
    result must be the very bytes of reading them from the shards every epoch, even with shuffled index
    lists."""
    pairs, reader = sharded_pairs(tmp_path)
    train, val, _ = split_indices(pairs)
    random.Random(0).shuffle(train)
    random.Random(1).shuffle(val)
    norm = Normalizer.fit(reader, train, window=10**6)
    config, s = config_for(pairs, "mlp", hidden_size=8, dropout=0.1), settings(window=1000, batch_size=4, epochs=3)
    held = train_reconstructor(config, reader, train, val, norm, s, tmp_path / "held")
    monkeypatch.setattr("conngeo.recon.train.in_memory", lambda source, train, val: (source, train, val))
    streamed = train_reconstructor(config, reader, train, val, norm, s, tmp_path / "streamed")
    assert held["history"] == streamed["history"]
    assert (tmp_path / "held/model.safetensors").read_bytes() == (tmp_path / "streamed/model.safetensors").read_bytes()


def test_checkpoint_errors_say_what_to_do(tmp_path):
    config = ReconConfig("mlp", 4, 3, 4, 3, hidden_size=8)
    with pytest.raises(FileNotFoundError, match="train it first"):
        load_reconstructor(tmp_path)
    save_reconstructor(build_reconstructor(config), config, tmp_path)
    ReconConfig("mlp", 4, 3, 4, 3, hidden_size=16).save(tmp_path)
    with pytest.raises(ValueError, match="model.safetensors does not match"):
        load_reconstructor(tmp_path)


# -- bad input ------------------------------------------------------------------------------------

def test_shape_mismatch_and_nan_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"post.safetensors: images have different token matrix shapes.*re-extract"):
        stack_tokens([torch.zeros(4, 3), torch.zeros(5, 3)], ["a", "b"], "x/post.safetensors")
    pre = [torch.randn(4, 3) for _ in range(3)]
    pre[1][2, 0] = float("nan")
    write_shard(tmp_path / "s0", ["a", "b", "c"], pre, [torch.randn(2, 5) for _ in range(3)])
    with pytest.raises(ValueError, match=r"s0/pre.safetensors: image b contains NaN or inf.*rerun"):
        load_pairs([tmp_path / "s0"])
    write_shard(tmp_path / "s1", ["d"], [torch.randn(4, 3)], [torch.randn(2, 5)])
    write_shard(tmp_path / "s2", ["e"], [torch.randn(6, 3)], [torch.randn(2, 5)])
    with pytest.raises(ValueError, match=r"pre: images have different token matrix shapes \(d: 4 tokens, e: 6\)"):
        load_pairs([tmp_path / "s1", tmp_path / "s2"])
    write_shard(tmp_path / "s3", ["d"], [torch.randn(4, 3)], [torch.randn(2, 5)])
    with pytest.raises(ValueError, match="stems repeat"):
        load_pairs([tmp_path / "s1", tmp_path / "s3"])


# -- metrics and baselines --------------------------------------------------------------------------

def test_metrics_against_hand_computed_values():
    pred = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert torch.allclose(token_mse(pred, target), torch.tensor([[0.5, 2.0]]))
    assert torch.allclose(image_mse(pred, target), torch.tensor([1.25]))
    assert torch.allclose(token_cosine(pred, target), torch.tensor([[2 ** -0.5, 0.0]]))  # zero target -> 0
    assert torch.allclose(image_cosine(pred, target), torch.tensor([2 ** -0.5 / 2]))
    p, e = pool_tokens(pred), pool_tokens(target)
    assert torch.allclose(p, torch.tensor([[0.5, 1.0]])) and torch.allclose(e, torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(pooled_mse(p, e), torch.tensor([0.125]))
    assert torch.allclose(pooled_cosine(p, e), torch.tensor([0.75 / (1.25 ** 0.5 * 0.5 ** 0.5)]))
    assert torch.allclose(token_cosine(-pred, pred), torch.tensor([[-1.0, -1.0]]))


def test_baselines_against_direct_computation():
    g = torch.Generator().manual_seed(0)
    post, pre = torch.randn(50, 3, 4, generator=g), torch.randn(50, 5, 6, generator=g) + torch.arange(5.0)[:, None]
    assert np.allclose(mean_baseline(pre).numpy(), pre.numpy().mean(axis=0), atol=1e-6)
    x, y = post.numpy().mean(axis=1).astype(np.float64), pre.numpy().mean(axis=1).astype(np.float64)
    ridge = fit_ridge(pool_tokens(post), pool_tokens(pre), alphas=[0.1, 1.0, 10.0])
    assert ridge.alpha_ in (0.1, 1.0, 10.0)
    # closed form with a free intercept: centre, solve (X'X + aI) w = X'y
    xm, ym = x.mean(axis=0), y.mean(axis=0)
    w = np.linalg.solve((x - xm).T @ (x - xm) + ridge.alpha_ * np.eye(4), (x - xm).T @ (y - ym))
    assert np.allclose(predict_ridge(ridge, pool_tokens(post)).numpy(), (x - xm) @ w + ym, atol=1e-5)


def test_token_linear_baseline_is_the_closed_form_ridge():
    """Per-token (a shared map, the LLaVA case) and per merge unit (4 slots, the Qwen case) against
    numpy's least squares on the same units; whole-image (a resampler) likewise."""
    g = torch.Generator().manual_seed(0)
    post_z, pre_z = torch.randn(30, 4, 3, generator=g), torch.randn(30, 8, 2, generator=g)
    linear = TokenLinear(8, 2, 4, 3, [t // 2 for t in range(8)])  # 2 E_pre tokens per E_post token: 2 slots
    linear.add(post_z, pre_z)
    weights = linear.solve(0.0)
    for slot, tokens in enumerate(linear.slots):
        x = post_z[:, [t // 2 for t in tokens]].reshape(-1, 3).double().numpy()
        x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
        y = pre_z[:, tokens].reshape(-1, 2).double().numpy()
        assert np.allclose(weights[slot].numpy(), np.linalg.lstsq(x, y, rcond=None)[0], atol=1e-10)
    whole = TokenLinear(8, 2, 4, 3, None)
    whole.add(post_z, pre_z)
    x = np.concatenate([post_z.reshape(30, -1).double().numpy(), np.ones((30, 1))], axis=1)
    w = np.linalg.solve(x.T @ x + 5.0 * np.diag([1.0] * 12 + [0.0]), x.T @ pre_z.reshape(30, -1).double().numpy())
    assert np.allclose(whole.solve(5.0)[0].numpy(), w, atol=1e-10)
    mse = whole.choose([(post_z[:10], pre_z[:10])], [0.1, 5.0])
    assert whole.alpha == min(mse, key=mse.get) and whole.predict(post_z).shape == (30, 8, 2)


def test_report_columns_and_verdicts_against_direct_computation():
    pairs = affine_pairs(n=80, tokens=4, d=3)
    split = split_by_stem(pairs.stems, 0.25, 0.25)
    is_train = np.array([s == TRAIN for s in split])
    norm = Normalizer.fit(pairs, [i for i, s in enumerate(split) if s == TRAIN])
    good = Pairs(pairs.stems, pairs.pre + 0.01 * torch.randn(pairs.pre.shape, generator=torch.Generator().manual_seed(1)),
                 pairs.post)
    identity = list(range(4))
    cols, summary, patch = reconstruction_report(pairs, good, split, norm, identity, alphas=[1.0], window=7)
    z = ((pairs.pre - norm.pre_mean) / norm.pre_std).numpy()
    zg = ((good.pre - norm.pre_mean) / norm.pre_std).numpy()
    assert np.allclose(cols["mse_z"].numpy(), ((zg - z) ** 2).mean(axis=(1, 2)), rtol=1e-4)
    assert np.allclose(patch.numpy(), ((zg - z) ** 2).mean(axis=2), rtol=1e-4)
    mean_z = z[is_train].mean(axis=0)
    assert np.allclose(cols["mean_mse_z"].numpy(), ((mean_z - z) ** 2).mean(axis=(1, 2)), rtol=1e-4)
    raw = pairs.pre.numpy()
    assert np.allclose(cols["mean_mse_raw"].numpy(), ((raw[is_train].mean(axis=0) - raw) ** 2).mean(axis=(1, 2)), rtol=1e-4)
    assert summary["images"] == {side: split.count(side) for side in (TRAIN, VAL, TEST)}
    is_test = np.array([s == TEST for s in split])
    assert summary[TEST]["mse_z"] == pytest.approx(((zg - z) ** 2).mean(axis=(1, 2))[is_test].mean(), rel=1e-4)
    # post is an invertible affine map of pre, token by token: the linear baseline recovers it nearly exactly
    assert summary[TEST]["linear_mse_z"] < 1e-3 and summary["linear"]["units"] == "tokens"
    assert summary["beats_mean_baseline"] and summary["beats_ridge_baseline"]
    assert summary["beats_linear_baseline"] is (summary[TEST]["mse_z"] < summary[TEST]["linear_mse_z"])
    # the mean itself as "reconstruction" beats none, and is reported underfit
    mean_raw = Pairs(pairs.stems, norm.pre_from_z(torch.from_numpy(mean_z)).expand_as(pairs.pre).clone(), pairs.post)
    _, bad, _ = reconstruction_report(pairs, mean_raw, split, norm, identity, alphas=[1.0])
    assert not bad["beats_mean_baseline"] and not bad["beats_ridge_baseline"] and bad["underfit"]
    _, capped, _ = reconstruction_report(pairs, good, split, norm, None, alphas=[1.0], linear_max_features=5)
    assert "not_computed" in capped["linear"] and capped["underfit"] is None


# -- the stages, in process, on synthetic shards ----------------------------------------------------

def stage(name):
    sys.path.insert(0, str(ROOT / "stages"))
    try:
        module = __import__(name)
    finally:
        sys.path.remove(str(ROOT / "stages"))
    return module.app


def test_stages_train_export_and_evaluate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["recon"].update(epochs=4, patience=4, batch_size=16, warmup=4, hidden_size=16, num_layers=1, num_heads=2,
                           val_fraction=0.25, test_fraction=0.25, patch_maps=2)
    Path("params.yaml").write_text(yaml.safe_dump({"recon": params["recon"], "models": params["models"],
                                                   "device": params["device"], "threads": None, "max_window_mb": 0.002}))
    pairs = merge_pairs(n=80, side=4, d=3)
    names = [f"study_{i // 40:03d}_{i % 40:05d}" for i in range(80)]
    split = split_by_stem(names, 0.25, 0.25)
    train = torch.tensor([s == TRAIN for s in split])
    pairs.pre[~train] += 100.0  # validation and test images far off: statistics that saw them would show it
    pairs.post[~train] += 100.0
    layout = {"pre_to_post": [t // 4 for t in range(16)],  # stored the Qwen way: merge unit by merge unit
              "pre_raster": torch.arange(16).reshape(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(-1).argsort().tolist()}
    for k in range(2):
        sl = slice(40 * k, 40 * (k + 1))
        folder = Path(f"data/vectors/qwen2_5vl/shard{k:03d}")
        write_shard(folder, names[sl], list(pairs.pre[sl]), list(pairs.post[sl]))
        (folder / "fingerprint.json").write_text(json.dumps({"fingerprint": "x", "layout": layout}))
    runner = CliRunner()

    result = runner.invoke(stage("recon"), ["--model", "qwen2_5vl"])
    assert result.exit_code == 0, result.output
    assert "2 images in memory" not in result.output and "16 images in memory" in result.output  # the batch at least
    out = Path("data/recon/qwen2_5vl")
    assert ReconConfig.load(out).model_type == "transformer"
    saved = Normalizer.load(out / "norm.safetensors")
    train_pre = pairs.pre[train].reshape(-1, 3).double()
    assert torch.allclose(saved.pre_mean.double(), train_pre.mean(dim=0), atol=1e-5)
    assert torch.allclose(saved.pre_std.double(), train_pre.std(dim=0, unbiased=False), atol=1e-5)
    assert torch.allclose(saved.post_mean.double(), pairs.post[train].reshape(-1, 12).double().mean(dim=0), atol=1e-5)
    assert pd.read_csv(out / "split.csv")["split"].tolist() == split
    trained = json.loads(Path("metrics/recon/qwen2_5vl.json").read_text())
    assert trained["images"] == {side: split.count(side) for side in (TRAIN, VAL, TEST)} and trained["epochs_run"] == 4
    assert (Path("dvclive/recon/qwen2_5vl/plots/metrics/val/loss.tsv")).is_file()

    result = runner.invoke(stage("recon"), ["--model", "qwen2_5vl", "--eval-only"])
    assert result.exit_code == 0, result.output
    again = json.loads(Path("metrics/recon/qwen2_5vl.json").read_text())
    assert again["eval_only"] and again["test_loss"] == trained["test_loss"]

    result = runner.invoke(stage("recon_export"), ["--model", "qwen2_5vl"])
    assert result.exit_code == 0, result.output
    exported = VectorReader([Path("data/recon_vectors/qwen2_5vl/shard001")], sides=("pre",))
    assert exported.stems == names[40:] and exported.read("pre", [0]).shape == (1, 16, 3)
    assert not Path("data/recon_vectors/qwen2_5vl/shard001/post.safetensors").exists()  # E_post is not copied

    result = runner.invoke(stage("recon_eval"), ["--model", "qwen2_5vl"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv("data/recon_eval/qwen2_5vl/per_image.csv")
    assert table["stem"].tolist() == names and table["split"].tolist() == split
    report = json.loads(Path("metrics/recon_eval/qwen2_5vl.json").read_text())
    assert isinstance(report["beats_mean_baseline"], bool) and isinstance(report["beats_ridge_baseline"], bool)
    assert report[TEST]["mse_z"] == pytest.approx(table.loc[table.split == TEST, "mse_z"].mean(), rel=1e-4)
    assert report["linear"]["slots"] == 4  # the merge units' four patches, from the recorded layout
    maps = pd.read_csv("data/recon_eval/qwen2_5vl/patch_loss.csv")
    assert maps["image"].nunique() == 3 and len(maps) == 3 * 16
    assert Path("plots/recon/qwen2_5vl_patch_loss.png").stat().st_size > 1000
    # patch maps in raster order: the test mean at (row, col) is the mean error of the token the recorded
    # layout puts at raster position row * 4 + col
    test = [i for i, s in enumerate(split) if s == TEST]
    rebuilt = torch.cat([VectorReader([Path(f"data/recon_vectors/qwen2_5vl/shard{k:03d}")], sides=("pre",))
                         .read("pre", range(40)) for k in range(2)])
    token_error = token_mse(saved.pre_to_z(rebuilt[test]), saved.pre_to_z(pairs.pre[test])).mean(dim=0)
    shown = maps[maps["image"] == "test_mean"].sort_values(["row", "col"])["mse_z"].to_numpy()
    assert np.allclose(shown, token_error[layout["pre_raster"]].numpy(), rtol=1e-4)

    # wrong E_post width for the trained model: a clear error
    write_shard(Path("other/shard000"), names[:2], list(pairs.pre[:2]), list(pairs.post[:2, :, :5]))
    result = runner.invoke(stage("recon_export"), ["--model", "qwen2_5vl", "--vectors", "other", "--out", "o2"])
    assert result.exit_code != 0 and "retrain `dvc repro recon@qwen2_5vl`" in str(result.exception)


def test_data_parallel_training_equals_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 stages/recon.py` (gloo on the CPU): each rank reads and trains on its
    half of every batch; the losses are the one-process losses of the same global batches."""
    import shutil
    import subprocess

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["recon"].update(epochs=3, patience=3, batch_size=8, warmup=2, hidden_size=16, num_layers=1, num_heads=2,
                           model_type="mlp")
    pairs = affine_pairs(n=60, tokens=4, d=3)
    for k in range(2):
        sl = slice(30 * k, 30 * (k + 1))
        write_shard(tmp_path / f"data/vectors/m/shard{k:03d}", pairs.stems[sl], list(pairs.pre[sl]), list(pairs.post[sl]))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"recon": params["recon"], "models": params["models"],
                                                          "device": "cpu", "threads": None, "max_window_mb": 0.001}))
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "stages")}
    histories = {}
    for name, launcher in (("one", [sys.executable]),
                           ("two", [shutil.which("torchrun") or "torchrun", "--nproc-per-node", "2", "--standalone"])):
        proc = subprocess.run([*launcher, str(ROOT / "stages/recon.py"), "--model", "m", "--out", f"r_{name}",
                               "--metrics", f"m_{name}.json", "--live", f"live_{name}"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        histories[name] = json.loads((tmp_path / f"r_{name}/training.json").read_text())["history"]
    assert "2 processes" in proc.stdout
    for a, b in zip(histories["one"], histories["two"]):
        for key in ("train/loss", "val/loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert len(histories["one"]) == len(histories["two"]) == 3
