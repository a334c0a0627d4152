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

from conngeo.data.vectors import read_shard, write_shard
from conngeo.recon import (Normalizer, Pairs, ReconConfig, TrainSettings, build_reconstructor, choose_model_type,
                           evaluate, fit_ridge, image_cosine, image_mse, load_pairs, load_reconstructor,
                           mean_baseline, pool_tokens, pooled_cosine, pooled_mse, predict_ridge,
                           reconstruction_report, save_reconstructor, split_by_stem, stack_tokens, token_cosine,
                           token_mse, train_reconstructor)
from conngeo.recon.data import TRAIN, VAL
from conngeo.recon.train import STATE

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


def split_pairs(pairs, val_fraction=0.2):
    is_train = torch.tensor([s == TRAIN for s in split_by_stem(pairs.stems, val_fraction)])
    return pairs.select(is_train), pairs.select(~is_train)


def config_for(pairs, model_type, **kw):
    return ReconConfig(model_type, pairs.post.shape[1], pairs.post.shape[2], pairs.pre.shape[1], pairs.pre.shape[2], **kw)


# -- recovery of known connectors -----------------------------------------------------------------

def test_mlp_recovers_an_invertible_affine_connector(tmp_path):
    train, val = split_pairs(affine_pairs())
    norm = Normalizer.fit(train)
    settings = TrainSettings(epochs=60, batch_size=32, lr=3e-3, warmup=20, weight_decay=0.0, patience=60)
    summary = train_reconstructor(config_for(train, "mlp", hidden_size=64), train, val, norm, settings, tmp_path)
    model, _ = load_reconstructor(tmp_path)
    val_loss = evaluate(model, val, norm)["loss"]
    mean_loss = (norm.pre_to_z(val.pre) - mean_baseline(norm.pre_to_z(train.pre))).pow(2).mean().item()
    assert mean_loss > 0.9  # predicting the mean is about 1 z-unit^2: the task is not trivial
    assert val_loss < 0.01 and summary["best_val_loss"] < 0.01


def test_transformer_recovers_a_token_merging_connector(tmp_path):
    train, val = split_pairs(merge_pairs())
    norm = Normalizer.fit(train)
    settings = TrainSettings(epochs=40, batch_size=32, lr=5e-3, warmup=20, weight_decay=0.0, patience=40)
    config = config_for(train, "transformer", hidden_size=64, num_layers=1, num_heads=4)
    train_reconstructor(config, train, val, norm, settings, tmp_path)
    model, _ = load_reconstructor(tmp_path)
    assert evaluate(model, val, norm)["loss"] < 0.02


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
    split = dict(zip(names, split_by_stem(names, 0.2)))
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    assert dict(zip(shuffled, split_by_stem(shuffled, 0.2))) == split
    subset = names[::7]
    assert dict(zip(subset, split_by_stem(subset, 0.2))) == {s: split[s] for s in subset}  # others don't matter
    for s in names[:50]:  # the documented rule
        h = int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big") / 2**64
        assert split[s] == (VAL if h < 0.2 else TRAIN)
    assert 0.15 < list(split.values()).count(VAL) / len(names) < 0.25
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_stem(names, 0.0)
    with pytest.raises(ValueError, match="none of 1 images"):
        split_by_stem(names[:1], 0.5)


def test_normalizer_statistics_and_round_trip(tmp_path):
    pairs = affine_pairs(n=20)
    pairs.pre[:, :, 0] = 5.0  # a constant feature: std 1, maps to 0
    norm = Normalizer.fit(pairs)
    flat = pairs.pre.reshape(-1, pairs.pre.shape[2]).double().numpy()
    assert np.allclose(norm.pre_mean.numpy(), flat.mean(axis=0), atol=1e-5)
    assert np.allclose(norm.pre_std.numpy()[1:], flat.std(axis=0)[1:], rtol=1e-5)
    assert norm.pre_std[0] == 1 and torch.all(norm.pre_to_z(pairs.pre)[:, :, 0] == 0)
    assert torch.allclose(norm.pre_from_z(norm.pre_to_z(pairs.pre)), pairs.pre, atol=1e-5)
    norm.save(tmp_path / "norm.safetensors")
    again = Normalizer.load(tmp_path / "norm.safetensors")
    assert all(torch.equal(getattr(norm, k), getattr(again, k)) for k in ("pre_mean", "pre_std", "post_mean", "post_std"))
    with pytest.raises(FileNotFoundError, match="train the reconstructor first"):
        Normalizer.load(tmp_path / "missing.safetensors")


# -- checkpoints: eval-only and resume --------------------------------------------------------------

def quick_run(tmp_path, **settings):
    train, val = split_pairs(affine_pairs(n=120))
    norm = Normalizer.fit(train)
    config = config_for(train, "mlp", hidden_size=16, dropout=0.1)
    settings = TrainSettings(**{"epochs": 6, "batch_size": 16, "lr": 3e-3, "warmup": 5, "patience": 10, **settings})
    return config, train, val, norm, settings


def test_saved_best_model_reloads_with_the_same_validation_loss(tmp_path):
    config, train, val, norm, settings = quick_run(tmp_path)
    summary = train_reconstructor(config, train, val, norm, settings, tmp_path / "a")
    best = min(row["val/loss"] for row in summary["history"])
    model, loaded = load_reconstructor(tmp_path / "a")
    assert loaded == config
    assert evaluate(model, val, norm)["loss"] == best == summary["best_val_loss"]
    torch.manual_seed(123)
    assert evaluate(build_reconstructor(config), val, norm)["loss"] != best  # the weights did come from disk
    assert not (tmp_path / "a" / STATE).exists()  # removed once training finished


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    config, train, val, norm, settings = quick_run(tmp_path)
    straight = train_reconstructor(config, train, val, norm, settings, tmp_path / "straight")

    def crash(epoch, values):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_reconstructor(config, train, val, norm, settings, tmp_path / "resumed", log=crash)
    assert (tmp_path / "resumed" / STATE).is_file()
    resumed = train_reconstructor(config, train, val, norm, settings, tmp_path / "resumed")
    assert resumed["resumed_from_epoch"] == 3
    assert [r["val/loss"] for r in resumed["history"]] == [r["val/loss"] for r in straight["history"]]
    a, b = load_file(str(tmp_path / "straight/model.safetensors")), load_file(str(tmp_path / "resumed/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a state from other settings is not reused
    with pytest.raises(KeyboardInterrupt):
        train_reconstructor(config, train, val, norm, settings, tmp_path / "other", log=crash)
    settings.lr = 1e-3
    assert train_reconstructor(config, train, val, norm, settings, tmp_path / "other")["resumed_from_epoch"] is None


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
    with pytest.raises(ValueError, match=r"s0/pre.safetensors: 1 of 3 images contain NaN.*\['b'\].*rerun"):
        load_pairs([tmp_path / "s0"])
    write_shard(tmp_path / "s1", ["d"], [torch.randn(4, 3)], [torch.randn(2, 5)])
    write_shard(tmp_path / "s2", ["e"], [torch.randn(6, 3)], [torch.randn(2, 5)])
    with pytest.raises(ValueError, match="pre.safetensors: token matrix shape differs between shards"):
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


def test_report_columns_and_verdicts_against_direct_computation():
    pairs = affine_pairs(n=60, tokens=4, d=3)
    split = split_by_stem(pairs.stems, 0.3)
    is_train = np.array([s == TRAIN for s in split])
    norm = Normalizer.fit(pairs.select(torch.tensor(is_train)))
    good = pairs.pre + 0.01 * torch.randn(pairs.pre.shape, generator=torch.Generator().manual_seed(1))
    cols, summary, patch = reconstruction_report(good, pairs.pre, pairs.post, split, norm, alphas=[1.0], chunk=7)
    z = ((pairs.pre - norm.pre_mean) / norm.pre_std).numpy()
    zg = ((good - norm.pre_mean) / norm.pre_std).numpy()
    assert np.allclose(cols["mse_z"].numpy(), ((zg - z) ** 2).mean(axis=(1, 2)), rtol=1e-4)
    assert np.allclose(patch.numpy(), ((zg - z) ** 2).mean(axis=2), rtol=1e-4)
    mean_z = z[is_train].mean(axis=0)
    assert np.allclose(cols["mean_mse_z"].numpy(), ((mean_z - z) ** 2).mean(axis=(1, 2)), rtol=1e-4)
    raw = pairs.pre.numpy()
    assert np.allclose(cols["mean_mse_raw"].numpy(), ((raw[is_train].mean(axis=0) - raw) ** 2).mean(axis=(1, 2)), rtol=1e-4)
    assert summary["images"] == {TRAIN: int(is_train.sum()), VAL: int((~is_train).sum())}
    assert summary[VAL]["mse_z"] == pytest.approx(((zg - z) ** 2).mean(axis=(1, 2))[~is_train].mean(), rel=1e-4)
    assert summary["beats_mean_baseline"] and summary["beats_ridge_baseline"]
    # the mean itself as "reconstruction" beats neither
    mean_raw = norm.pre_from_z(torch.from_numpy(mean_z)).expand_as(pairs.pre)
    _, bad, _ = reconstruction_report(mean_raw, pairs.pre, pairs.post, split, norm, alphas=[1.0])
    assert not bad["beats_mean_baseline"] and not bad["beats_ridge_baseline"]


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
                           val_fraction=0.25, patch_maps=2)
    Path("params.yaml").write_text(yaml.safe_dump({"recon": params["recon"], "models": params["models"],
                                                   "device": params["device"]}))
    pairs = merge_pairs(n=80, side=4, d=3)
    names = [f"study_{i // 40:03d}_{i % 40:05d}" for i in range(80)]
    split = split_by_stem(names, 0.25)
    val = torch.tensor([s == VAL for s in split])
    pairs.pre[val] += 100.0  # validation images far off: statistics that saw them would show it
    pairs.post[val] += 100.0
    for k in range(2):
        sl = slice(40 * k, 40 * (k + 1))
        write_shard(Path(f"data/vectors/qwen2_5vl/shard{k:03d}"), names[sl], list(pairs.pre[sl]), list(pairs.post[sl]))
    runner = CliRunner()

    result = runner.invoke(stage("recon"), ["--model", "qwen2_5vl"])
    assert result.exit_code == 0, result.output
    out = Path("data/recon/qwen2_5vl")
    assert ReconConfig.load(out).model_type == "transformer"  # auto: 16 pre tokens, 4 post tokens
    saved = Normalizer.load(out / "norm.safetensors")
    train_pre = pairs.pre[~val].reshape(-1, 3).double()
    assert torch.allclose(saved.pre_mean.double(), train_pre.mean(dim=0), atol=1e-5)
    assert torch.allclose(saved.pre_std.double(), train_pre.std(dim=0, unbiased=False), atol=1e-5)
    assert torch.allclose(saved.post_mean.double(), pairs.post[~val].reshape(-1, 12).double().mean(dim=0), atol=1e-5)
    assert pd.read_csv(out / "split.csv")["split"].tolist() == split
    trained = json.loads(Path("metrics/recon/qwen2_5vl.json").read_text())
    assert trained["images"] == {"train": int((~val).sum()), "val": int(val.sum())} and trained["epochs_run"] == 4
    assert (Path("dvclive/recon/qwen2_5vl/plots/metrics/val/loss.tsv")).is_file()

    result = runner.invoke(stage("recon"), ["--model", "qwen2_5vl", "--eval-only"])
    assert result.exit_code == 0, result.output
    again = json.loads(Path("metrics/recon/qwen2_5vl.json").read_text())
    assert again["eval_only"] and again["val_loss"] == trained["val_loss"]

    result = runner.invoke(stage("recon_export"), ["--model", "qwen2_5vl"])
    assert result.exit_code == 0, result.output
    exported = read_shard(Path("data/recon_vectors/qwen2_5vl/shard001"))
    assert exported.stems == names[40:] and exported.pre[0].shape == (16, 3)
    assert all(torch.equal(a, b) for a, b in zip(exported.post, pairs.post[40:]))  # post is the original E_post

    result = runner.invoke(stage("recon_eval"), ["--model", "qwen2_5vl"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv("data/recon_eval/qwen2_5vl/per_image.csv")
    assert table["stem"].tolist() == names and table["split"].tolist() == split
    report = json.loads(Path("metrics/recon_eval/qwen2_5vl.json").read_text())
    assert isinstance(report["beats_mean_baseline"], bool) and isinstance(report["beats_ridge_baseline"], bool)
    assert report[VAL]["mse_z"] == pytest.approx(table.loc[table.split == VAL, "mse_z"].mean(), rel=1e-4)
    maps = pd.read_csv("data/recon_eval/qwen2_5vl/patch_loss.csv")
    assert maps["image"].nunique() == 3 and len(maps) == 3 * 16
    assert Path("plots/recon/qwen2_5vl_patch_loss.png").stat().st_size > 1000

    # wrong E_post width for the trained model: a clear error
    write_shard(Path("other/shard000"), names[:2], list(pairs.pre[:2]), list(pairs.post[:2, :, :5]))
    result = runner.invoke(stage("recon_export"), ["--model", "qwen2_5vl", "--vectors", "other", "--out", "o2"])
    assert result.exit_code != 0 and "retrain" in result.output


def test_patch_maps_follow_raster_order():
    stage("recon_eval")
    recon_eval = sys.modules["recon_eval"]
    # token value = its raster index (row * 4 + col), stored the Qwen way (merge unit by merge unit)
    raster = torch.arange(16.0).reshape(4, 4)
    stored = raster.reshape(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(1, 16)
    assert torch.equal(recon_eval.to_raster(stored, "qwen2.5vl")[0], raster)
    assert torch.equal(recon_eval.to_raster(raster.reshape(1, 16), "llava")[0], raster)
    assert recon_eval.to_raster(torch.zeros(1, 15), "llava") is None
