"""Benchmark: extraction images/s, batched (conngeo.extraction) against a naive per-image loop.

Baseline: the same adapter called on one image at a time (what a simple script does). Both paths
include image decoding from PNG. Models are tiny random-init checkpoints of each family (speed does
not depend on training); pass --source to time a real checkpoint instead.

    python benchmarks/extract.py --images 256 --batch-size 32
"""

import tempfile
import time
from pathlib import Path

import torch
import typer

from conngeo.data import toyworld
from conngeo.data.images import load_image, scan
from conngeo.extraction import extract
from conngeo.families import adapter_class, load_adapter
from conngeo.zoo.tokenizer import build_tokenizer

app = typer.Typer(add_completion=False)


@app.command()
def main(
    families: list[str] = typer.Option(["llava", "idefics2", "qwen2.5vl", "qwen3.5"], "--family"),
    images: int = typer.Option(256, help="images to extract"),
    batch_size: int = typer.Option(32),
    image_size: int = typer.Option(48),
    source: str = typer.Option(None, help="a checkpoint to time instead of a tiny random model (one family)"),
    device: str = typer.Option("cpu"),
    threads: int = typer.Option(None, help="torch threads (default: torch's choice)"),
):
    """Print images/s of both paths and the speed-up per family."""
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "world"
        toyworld.generate(root, split="study", seed=0, shards=1, images_per_shard=images, size=image_size)
        items = scan(root).items
        print(f"{images} toy images of {image_size}px, batch {batch_size}, device {device}, "
              f"{torch.get_num_threads()} threads")
        for family in families:
            cls = adapter_class(family)
            if source:
                adapter = load_adapter(family, source, device=device)
            else:
                adapter = cls.tiny(build_tokenizer(toyworld.vocabulary(), cls.special_tokens), image_size)
                adapter.model.to(device)
            adapter.encode([load_image(items[0].path)])  # warm-up
            start = time.perf_counter()
            for it in items:
                adapter.encode([load_image(it.path)])
            naive = images / (time.perf_counter() - start)
            start = time.perf_counter()
            extract(adapter, items, Path(tmp) / family, {"family": family}, batch_size=batch_size, save_every=10**9)
            batched = images / (time.perf_counter() - start)
            print(f"{family:10s} per-image loop {naive:8.1f} img/s   batched {batched:8.1f} img/s   "
                  f"speed-up x{batched / naive:.1f}")


if __name__ == "__main__":
    app()
