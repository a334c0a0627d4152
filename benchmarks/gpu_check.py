"""GPU check: the real study's four VLMs at their real architectures (random weights, bf16) on one GPU.

What the CPU rehearsal (tests/test_rehearsal.py) checks, at full depth and speed: each model is built
from the real checkpoint's values (tests/fixtures/real_checkpoints.yaml, conngeo.rehearsal)
directly on the GPU, with the real processor settings, chat template and stop tokens, wrapped in the
study's adapter at profiles/real.yaml's image size, and run on photographs of mixed sizes and aspect
ratios. Per model it asserts, and stops at the first failure:

  1. every image gives the token shapes of its image size (E_pre / E_post tokens x width);
  2. generation from the stored (bf16) E_post equals native generation from the pixels: the same token
     ids and bit-identical first-step logits;

and prints images/s and peak GPU memory for extraction (the stage's path: DataLoader workers, batches,
part files), generation (from pixels and from E_post) and one reconstructor epoch (the recon stage's
streaming loop, bf16 autocast).

    python benchmarks/gpu_check.py                           # all four on one GPU (a few minutes on an H200)
    python benchmarks/gpu_check.py --device cpu --layers 1   # the same steps at full width, one layer per
                                                             # tower, on the CPU: checks this script, not speed
"""

import gc
import tempfile
import time
from pathlib import Path

import torch
import typer
import yaml

from conngeo.data.images import load_image, scan
from conngeo.data.vectors import VectorReader, resolve_dtype
from conngeo.extraction import extract
from conngeo.families import adapter_class
from conngeo.families.base import same_generation
from conngeo.rehearsal import build_model, build_photos, real_checkpoints
from conngeo.recon import Normalizer, ReconConfig, TrainSettings, split_by_stem, train_reconstructor

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("llava", "idefics2", "qwen2_5vl", "qwen3_5")
SIZES = ((640, 480), (480, 640), (500, 375), (612, 612), (2048, 1536))
# profiles/real.yaml's image sizes -> (E_pre, E_post) tokens x width of every image
SHAPES = {"llava": ((576, 1024), (576, 4096)), "idefics2": ((576, 1152), (64, 4096)),
          "qwen2_5vl": ((576, 1280), (144, 3584)), "qwen3_5": ((576, 1024), (144, 2560))}


def adapter_for(name: str, spec: dict, folder: Path, layers: int | None, device: str, dtype: str):
    """The study's adapter around a random model of the real architecture, built in place on `device`."""
    cls = adapter_class(spec["family"])
    model = build_model(real_checkpoints()[name], folder, layers=layers, words=[spec["prompt"]], dtype=dtype,
                        device=device)
    adapter = cls(model.eval(), cls.load_processor(folder), prompt=spec["prompt"])
    adapter.set_image_size(spec["image_size"])
    return adapter


app = typer.Typer(add_completion=False)


@app.command()
def main(
    models: list[str] = typer.Option(list(MODELS), "--model", help="llava, idefics2, qwen2_5vl, qwen3_5 (repeatable)"),
    images: int = typer.Option(40, help="photographs (cycling through five sizes and aspect ratios)"),
    batch_size: int = typer.Option(8, help="images per batch"),
    new_tokens: int = typer.Option(16, help="greedy tokens per caption"),
    num_workers: int = typer.Option(4, help="DataLoader workers decoding images in the extraction path"),
    layers: int = typer.Option(None, help="cap every tower's depth (full widths); default: the real depths"),
    device: str = typer.Option("cuda"),
):
    """Build each real architecture with random weights, assert shapes and caption replay, print speed and memory."""
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise typer.BadParameter(f"unknown models {unknown}; choose from {list(MODELS)}")
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU and a CUDA build of torch; `--device cpu --layers 1` checks the "
                         "script without one")
    if not cuda and not layers:
        raise SystemExit(f"--device {device} runs the real architectures only with --layers (a CPU would take hours)")
    families = {m: e["family"] for m, e in yaml.safe_load((ROOT / "params.yaml").read_text())["models"].items()}
    real = yaml.safe_load((ROOT / "profiles/real.yaml").read_text())["models"]

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def phase(label):  # reset the peak, time the phase
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        return label, time.perf_counter()

    def done(started, n):
        sync()
        label, t0 = started
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:6.1f} GiB" if cuda else "n/a"
        return f"{label} {n / (time.perf_counter() - t0):7.1f} img/s (peak {peak})"

    print(f"{torch.cuda.get_device_name(device) if cuda else device}, torch {torch.__version__}, "
          f"{images} photographs of sizes {', '.join(f'{w}x{h}' for w, h in SIZES)}, batch {batch_size}"
          f"{f', towers capped at {layers} layers' if layers else ', real depths'}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_photos(tmp / "photos" / "shard000", [SIZES[i % len(SIZES)] for i in range(images)])
        items = scan(tmp / "photos").items
        for name in models:
            spec = {**real[name], "family": families[name]}
            start = time.perf_counter()
            adapter = adapter_for(name, spec, tmp / name, layers, device, spec["dtype"])
            built = time.perf_counter() - start
            params = sum(p.numel() for p in adapter.model.parameters())

            t = phase("extract")
            extract(adapter, items, tmp / "vectors" / name, spec, batch_size=batch_size, save_every=len(items),
                    num_workers=num_workers, store_dtype=resolve_dtype(spec["dtype"]))
            line = [done(t, len(items))]
            reader = VectorReader(sorted((tmp / "vectors" / name).iterdir()))
            got = ((reader.tokens("pre"), reader.width["pre"]), (reader.tokens("post"), reader.width["post"]))
            assert got == SHAPES[name], f"{name}: every image should give E_pre / E_post {SHAPES[name]}, got {got}"

            pixels = [load_image(it.path) for it in items[:batch_size]]
            t = phase("generate")
            native = adapter.generate_ids(pixels, max_new_tokens=new_tokens, with_logits=True)
            line.append(done(t, len(pixels)))
            t = phase("from E_post")
            replay = adapter.generate_ids(pixels, post=list(reader.read("post", range(len(pixels)))),
                                          max_new_tokens=new_tokens, with_logits=True)
            line.append(done(t, len(pixels)))
            assert same_generation(replay, native), (f"{name}: token ids or first-step logits from the stored E_post "
                                                     "differ from native generation")

            split = split_by_stem(reader.stems, 0.2, 0.2)
            train = [i for i, s in enumerate(split) if s == "train"]
            val = [i for i, s in enumerate(split) if s == "val"]
            norm = Normalizer.fit(reader, train)
            config = ReconConfig("transformer", *got[1], *got[0], hidden_size=256, num_layers=2, num_heads=4)
            settings = TrainSettings(epochs=1, batch_size=batch_size, lr=1e-3, warmup=1, weight_decay=0.01,
                                     patience=1, seed=0, device=device, window=len(train))
            t = phase("recon epoch")
            train_reconstructor(config, reader, train, val, norm, settings, tmp / "recon" / name)
            line.append(done(t, len(train)))
            print(f"{name:10s} {params / 1e9:5.2f} B built in {built:5.1f} s; shapes {got} ok; replay ok; "
                  + "; ".join(line))
            del adapter, reader
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    app()
