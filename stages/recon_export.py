"""Stage recon_export: the reconstructed E_pre of every image, in the extraction's shard format.

    data/recon_vectors/<model>/<shard>/pre.safetensors    the reconstruction of E_pre (from E_post)
    data/recon_vectors/<model>/<shard>/index.csv          stem, pre_tokens (row order = token order)
    data/recon_vectors/<model>/<shard>/fingerprint.json   the reconstructor and vectors it came from

Same shards, stems, token order and dtype as data/vectors/<model>'s E_pre, so everything that reads
vectors reads these (e.g. `connect` of the reconstruction). The E_post they came from stays in
data/vectors (not copied). Written a batch of images at a time (params recon.batch_size, within
max_window_mb), so memory does not grow with the number of images. A shard finished by an interrupted
run of the same reconstructor on the same vectors is kept.
"""

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch
import typer
from tqdm import tqdm

from common import load_params, run
from conngeo import interrupt, layout
from conngeo.data.vectors import (TensorWriter, VectorReader, dtype_of, images_within, is_complete, shard_folders,
                                  write_index)
from conngeo.recon import Normalizer, load_reconstructor, reconstruct

app = typer.Typer(add_completion=False)


@app.command()
def main(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    vectors: Path = typer.Option(None, help="vector shards (default data/vectors/<model>)"),
    recon: Path = typer.Option(None, help="trained reconstructor (default data/recon/<model>)"),
    out: Path = typer.Option(None, help="output shards (default data/recon_vectors/<model>)"),
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's choice)"),
):
    """Reconstruct E_pre from E_post for every image of every shard."""
    if threads:
        torch.set_num_threads(threads)
    params = load_params()
    device = params["device"]
    vectors = vectors or layout.data("vectors", model)
    recon = recon or layout.data("recon", model)
    out = out or layout.data("recon_vectors", model)
    start = time.perf_counter()
    norm = Normalizer.load(recon / "norm.safetensors")
    net, config = load_reconstructor(recon, device)
    folders = shard_folders(vectors, f"dvc repro extract@{model}")
    for stale in sorted(p for p in out.iterdir() if p.is_dir() and p.name not in {f.name for f in folders}) \
            if out.is_dir() else []:
        shutil.rmtree(stale)  # a shard the vectors no longer have
    model_bytes = b"".join((recon / name).read_bytes() for name in ("model.safetensors", "config.json", "norm.safetensors"))
    images = done = 0
    for folder in folders:
        reader = VectorReader([folder])
        if (reader.tokens("post"), reader.width["post"]) != (config.n_post, config.d_post):
            raise SystemExit(f"{folder / 'post.safetensors'}: E_post is {reader.tokens('post')}x{reader.width['post']} "
                             f"per image but {recon} was trained on {config.n_post}x{config.d_post}; retrain "
                             "`dvc repro recon`")
        # a shard exported by an interrupted run of the same reconstructor from the same vectors is kept
        source = b"".join(p.read_bytes() for p in (folder / "index.csv", folder / "fingerprint.json") if p.is_file())
        fp = hashlib.sha256(model_bytes + source).hexdigest()[:16]
        stamp = out / folder.name / "fingerprint.json"
        if is_complete(out / folder.name, ("pre",)) and stamp.is_file() and json.loads(stamp.read_text())["fingerprint"] == fp:
            done += 1
            continue
        window = min(params["recon"]["batch_size"], images_within(params["max_window_mb"], reader.image_bytes()))
        shard_out = out / folder.name
        shard_out.mkdir(parents=True, exist_ok=True)
        (shard_out / "index.csv").unlink(missing_ok=True)  # incomplete while the file is written
        writer = TensorWriter(shard_out / "pre.safetensors", "vectors", (len(reader) * config.n_pre, config.d_pre),
                              dtype_of(reader.dtype["pre"]))
        for start_at in tqdm(range(0, len(reader), window), desc=f"recon_export {folder.name}"):
            part = list(range(start_at, min(start_at + window, len(reader))))
            pre = reconstruct(net, reader.read("post", part), norm, device=device)
            writer.write(pre.reshape(-1, config.d_pre))
        writer.close()
        write_index(shard_out, reader.stems, [config.n_pre] * len(reader))
        stamp.write_text(json.dumps({"fingerprint": fp}) + "\n")
        images += len(reader)
        interrupt.check(f"shard {folder.name}")
    typer.echo(f"recon_export: {model}: {images} images in {len(folders) - done} shards -> {out} ({done} shards "
               f"kept from an interrupted run) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run(app)
