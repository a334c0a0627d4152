"""Benchmark the reconstructor's training: images held in memory against read every epoch (the baseline).

    .venv/bin/python benchmarks/recon.py                    # the default study's Qwen shape (about a minute)
    .venv/bin/python benchmarks/recon.py --pre 9x128        # LLaVA's shape

Random vectors in vector shards (bf16, as the real extraction stores them) of the default study's size
and split (2,000 images in 2 shards, 60/20/20 by stem hash), the default reconstructor (transformer,
width 128, 2 layers, batch 64), a few epochs. Both runs train the same weights (tests/test_recon.py);
what differs is where an epoch's images come from:

  baseline   as before issue #17: every epoch reads its training images and every validation pass its
             validation images from the memory-mapped shards (`in_memory` turned off)
  in memory  now: when the training and validation images fit in one window (params max_window_mb)
             they are read once (`in_memory`)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import conngeo.recon.train as recon_train
from conngeo.data.vectors import VectorReader, write_shard
from conngeo.recon import SPLITS, TRAIN, VAL, Normalizer, ReconConfig, TrainSettings, split_by_stem


def shape(text: str) -> tuple[int, int]:
    tokens, width = text.split("x")
    return int(tokens), int(width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--pre", type=shape, default=(36, 96), help="E_pre tokens x width (default: Qwen's)")
    parser.add_argument("--post", type=shape, default=(9, 128), help="E_post tokens x width")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        generator = torch.Generator().manual_seed(0)
        stems = [f"img{i:05d}" for i in range(args.images)]
        half = args.images // 2
        for k, part in enumerate((slice(0, half), slice(half, None))):
            names = stems[part]
            pre = [torch.randn(*args.pre, generator=generator).bfloat16() for _ in names]
            post = [torch.randn(*args.post, generator=generator).bfloat16() for _ in names]
            write_shard(Path(tmp) / f"shard{k:03d}", names, pre, post)
        reader = VectorReader([Path(tmp) / "shard000", Path(tmp) / "shard001"])
        split = split_by_stem(reader.stems, 0.2, 0.2)
        index = {side: [i for i, s in enumerate(split) if s == side] for side in SPLITS}
        norm = Normalizer.fit(reader, index[TRAIN])
        config = ReconConfig("transformer", args.post[0], args.post[1], args.pre[0], args.pre[1],
                             hidden_size=128, num_layers=2, num_heads=4, dropout=0.0)
        settings = TrainSettings(epochs=args.epochs, batch_size=64, lr=0.003, warmup=100, weight_decay=0.01,
                                 patience=10, seed=0, device="cpu", window=10**6)

        def timed(name: str) -> float:
            start = time.perf_counter()
            recon_train.train_reconstructor(config, reader, index[TRAIN], index[VAL], norm, settings,
                                            Path(tmp) / name)
            return time.perf_counter() - start

        held = recon_train.in_memory
        recon_train.in_memory = lambda source, train, val: (source, train, val)  # the baseline: no holding
        baseline = timed("baseline")
        recon_train.in_memory = held
        now = timed("in_memory")
    print(f"{args.images} images, E_post {args.post[0]}x{args.post[1]} -> E_pre {args.pre[0]}x{args.pre[1]}, "
          f"{args.epochs} epochs ({len(index[TRAIN])} train, {len(index[VAL])} val images)")
    print(f"baseline (read every epoch)  {baseline:6.2f} s   {baseline / args.epochs:5.2f} s/epoch   1.00x")
    print(f"in memory                    {now:6.2f} s   {now / args.epochs:5.2f} s/epoch   "
          f"{baseline / now:.2f}x faster")


if __name__ == "__main__":
    main()
