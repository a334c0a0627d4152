"""Recoverability: how much of E_pre a learned map can recover from E_post.

A reconstructor (per-token MLP where the connector keeps the token count, or a transformer whose
E_pre-position queries cross-attend to the E_post tokens) learns z(E_post) -> z(E_pre) on a
train / val / test split by image stem, with z-scores fitted on the training images only, reading the
vector shards a window at a time. Its reconstructions are judged per token, per image and pooled
against three baselines (training mean; token-level linear map; ridge on pooled vectors), on the test
images. The library never imports DVC: training reports through a `log(epoch, values)` callback.
"""

from conngeo.recon.baselines import TokenLinear, fit_ridge, mean_baseline, predict_ridge
from conngeo.recon.data import (SPLITS, TEST, TRAIN, VAL, Normalizer, Pairs, load_pairs, read_split, split_by_stem,
                                stack_tokens, write_split)
from conngeo.recon.evaluate import reconstruction_report
from conngeo.recon.metrics import (image_cosine, image_mse, pool_tokens, pooled_cosine, pooled_mse, token_cosine,
                                   token_mse)
from conngeo.recon.models import (ReconConfig, build_reconstructor, choose_model_type, load_reconstructor,
                                  save_reconstructor)
from conngeo.recon.train import TrainSettings, evaluate, predict_z, reconstruct, train_reconstructor

__all__ = [
    "Normalizer", "Pairs", "ReconConfig", "SPLITS", "TEST", "TRAIN", "TokenLinear", "TrainSettings", "VAL",
    "build_reconstructor", "choose_model_type", "evaluate", "fit_ridge", "image_cosine", "image_mse", "load_pairs",
    "load_reconstructor", "mean_baseline", "pool_tokens", "pooled_cosine", "pooled_mse", "predict_ridge", "predict_z",
    "read_split", "reconstruct", "reconstruction_report", "save_reconstructor", "split_by_stem", "stack_tokens",
    "token_cosine", "token_mse", "train_reconstructor", "write_split",
]
