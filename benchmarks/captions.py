"""Benchmark: captions/s from a supplied E_post, batched (conngeo.captions.generate_captions) against a
per-image loop of the same adapter.

Baseline: `adapter.generate([image], post=[e_post])` one image at a time (what a simple script does).
Both paths generate greedily from the same stored E_post, with the same max_new_tokens, from decoded
images in memory; E_post comes from `adapter.encode` beforehand and is not timed. Models are tiny
random-init checkpoints of each family (speed does not depend on training). The script also checks
that both paths give the same captions.

    python benchmarks/captions.py --images 128 --batch-size 32 --threads 1
"""

import time

import torch
import typer

from conngeo.captions import generate_captions
from conngeo.data import toyworld
from conngeo.families import adapter_class
from conngeo.zoo.tokenizer import build_tokenizer

app = typer.Typer(add_completion=False)


@app.command()
def main(
    families: list[str] = typer.Option(["llava", "idefics2", "qwen2.5vl", "qwen3.5"], "--family"),
    images: int = typer.Option(128, help="images to caption"),
    batch_size: int = typer.Option(32),
    max_new_tokens: int = typer.Option(24),
    image_size: int = typer.Option(48),
    threads: int = typer.Option(1, help="torch threads (the machine is shared: 1 by default)"),
):
    """Print captions/s of both paths and the speed-up per family."""
    torch.set_num_threads(threads)
    pictures = [toyworld.make_image(0, "study", 0, i, image_size)[1] for i in range(images)]
    print(f"{images} toy images of {image_size}px, batch {batch_size}, max_new_tokens {max_new_tokens}, "
          f"{torch.get_num_threads()} threads")
    for family in families:
        cls = adapter_class(family)
        adapter = cls.tiny(build_tokenizer(toyworld.vocabulary(), cls.special_tokens), image_size)
        post = []
        for i in range(0, images, batch_size):
            post += adapter.encode(pictures[i:i + batch_size])[1]
        adapter.generate(pictures[:1], post=post[:1], max_new_tokens=max_new_tokens)  # warm-up
        start = time.perf_counter()
        single = [adapter.generate([im], post=[p], max_new_tokens=max_new_tokens)[0] for im, p in zip(pictures, post)]
        naive = images / (time.perf_counter() - start)
        start = time.perf_counter()
        batched_captions = generate_captions(adapter, pictures, post, batch_size=batch_size,
                                             max_new_tokens=max_new_tokens)
        batched = images / (time.perf_counter() - start)
        same = sum(a == b for a, b in zip(single, batched_captions)) / images
        print(f"{family:10s} per-image loop {naive:8.1f} captions/s   batched {batched:8.1f} captions/s   "
              f"x{batched / naive:.1f}   same captions {same:.0%}")


if __name__ == "__main__":
    app()
