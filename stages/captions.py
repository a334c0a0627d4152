"""Stage captions: per image, the greedy caption from the original E_post and from connector(reconstructed
E_pre), into data/captions/<model>/captions.csv (stem, shard, post, recon, recon_post_mse_z). The last
is the error that reaches the language model: mean over tokens and features of
((connector(reconstructed E_pre) - E_post) / std)^2, in the z-units of E_post (the reconstructor's
training statistics). The reference captions stay beside the images (<stem>.txt);
metrics/captions/<model>.json records the generation settings. One generate batch of vectors and
images is in memory at a time.

    post   generated from E_post as extracted (data/vectors/<model>): the model's own caption
    recon  generated from adapter.connect(E_pre reconstructed from E_post) (data/recon_vectors/<model>,
           written by recon_export): what the language model says when the connector sees the reconstruction

Split over N processes (e.g. a Slurm array, scripts/slurm/): run `--worker i --workers N` for
i = 0..N-1, then once the plain command (as in dvc.yaml), which joins their parts
(conngeo.captions.parts), and `python stages/verify.py captions --model NAME`.
"""

import json
import shutil
import time
from pathlib import Path

import torch
import typer
from tqdm import tqdm

from common import LazyAdapter, load_model, load_params, model_spec, run, write_json, write_timings
from conngeo import interrupt, layout
from conngeo.captions import parts, write_table
from conngeo.captions.inputs import match_images
from conngeo.data.images import load_image, scan
from conngeo.data.vectors import VectorReader, is_complete, shard_folders
from conngeo.recon import Normalizer

app = typer.Typer(add_completion=False)
COLUMNS = ("stem", "shard", "post", "recon", "recon_post_mse_z")
GENERATION = "generation.json"  # the generation settings, kept beside the parts for the joining run


@app.command()
def main(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    root: Path = typer.Option(None, help="image root (default: params data.root)"),
    vectors: Path = typer.Option(None, help="extracted vector shards (default data/vectors/<model>)"),
    recon_vectors: Path = typer.Option(None, help="reconstructed E_pre shards (default data/recon_vectors/<model>)"),
    recon_dir: Path = typer.Option(None, help="the trained reconstructor, for E_post's z-units (default data/recon/<model>)"),
    recon: bool = typer.Option(True, help="--no-recon: no recon column (no reconstructor available)"),
    out: Path = typer.Option(None, help="output folder (default data/captions/<model>)"),
    metrics: Path = typer.Option(None, help="summary JSON (default metrics/captions/<model>.json)"),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: params device)"),
    dtype: str = typer.Option(None, help="float32, bfloat16, float16 (default: the model's)"),
    batch_size: int = typer.Option(None, help="images per generate call (default: params captions.batch_size)"),
    max_new_tokens: int = typer.Option(None, help="default: params captions.max_new_tokens"),
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's choice)"),
    worker: int = typer.Option(0, help="this process's number, 0..workers-1 (with --workers)"),
    workers: int = typer.Option(1, help="split the batches over this many processes: each writes only "
                                "<out>/parts/<shard>-<start>.csv; a plain run afterwards joins them"),
):
    """Greedy captions from E_post and from connector(reconstructed E_pre), for every image."""
    if threads:
        torch.set_num_threads(threads)
    if not 0 <= worker < workers:
        raise typer.BadParameter(f"--worker must be in 0..{workers - 1} for --workers {workers}, not {worker}")
    start = time.perf_counter()
    params = load_params()
    cfg, data = params["captions"], params["data"]
    spec = model_spec(model, params)
    if dtype:
        spec["dtype"] = dtype
    root = root or Path(data["root"])
    vectors = vectors or layout.data("vectors", model)
    recon_vectors = recon_vectors or layout.data("recon_vectors", model)
    recon_dir = recon_dir or layout.data("recon", model)
    out = out or layout.data("captions", model)
    batch_size = batch_size or cfg["batch_size"]
    max_new_tokens = max_new_tokens or cfg["max_new_tokens"]

    folder = scan(root)
    # loaded on first use: a run that only joins the workers' parts never needs the model
    adapter = LazyAdapter(lambda: load_model(spec, device or params["device"]))
    shard_list = shard_folders(vectors, f"dvc repro extract@{model}")
    posts = [VectorReader([f], sides=("post",)) for f in shard_list]
    recons = []
    if recon:
        for f, post_reader in zip(shard_list, posts):
            if not is_complete(recon_vectors / f.name, ("pre",)):
                raise SystemExit(f"{recon_vectors / f.name}: no reconstructed E_pre for shard {f.name}; run "
                                 f"`dvc repro recon_export@{model}` first (or pass --no-recon)")
            recons.append(VectorReader([recon_vectors / f.name], sides=("pre",)))
            if recons[-1].stems != post_reader.stems:
                raise SystemExit(f"{recon_vectors / f.name}: stems differ from {f}; rerun `dvc repro recon_export@{model}`")
        norm = Normalizer.load(recon_dir / "norm.safetensors")  # E_post's z-units, for the error that reaches the LM
    stems = [r.stems for r in posts]
    columns = COLUMNS if recon else COLUMNS[:3]

    # the work: generate batches, dealt to the workers; a plain run reuses finished parts
    settings = {"model": spec, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "recon": recon}
    inputs = [f / n for f in shard_list for n in ("index.csv", "post.safetensors")]
    inputs += [recon_vectors / f.name / n for f in shard_list if recon for n in ("index.csv", "pre.safetensors")]
    fp = parts.fingerprint(settings, inputs)
    todo = parts.my_units(parts.units([len(s) for s in stems], batch_size), worker, workers)
    done, ignored = parts.read_parts(out, fp)
    for path in ignored:
        typer.echo(f"captions: ignoring {path}: made from other inputs or settings")
    rows, computed = {}, 0
    settings_file = out / parts.PARTS / GENERATION
    by_stem = {it.stem: it for it in folder.items}
    for s, a, b in tqdm(todo, desc=f"captions {model}", unit="batch"):
        if all(stem in done for stem in stems[s][a:b]):
            rows.update({stem: done[stem] for stem in stems[s][a:b]})
            continue
        batch = match_images(folder, stems[s][a:b], str(shard_list[s]))
        images = [load_image(it.path) for it in batch]
        post = posts[s].read("post", range(a, b))
        got = {"stem": [it.stem for it in batch], "shard": [shard_list[s].name] * len(batch),
               "post": adapter.generate(images, post=list(post), max_new_tokens=max_new_tokens)}
        if recon:  # the LM sees connector(reconstructed E_pre): its captions, and how far it is from E_post
            post_hat = adapter.connect(list(recons[s].read("pre", range(a, b))))
            got["recon"] = adapter.generate(images, post=post_hat, max_new_tokens=max_new_tokens)
            error = [(norm.post_to_z(h) - norm.post_to_z(p)).pow(2).mean().item() for h, p in zip(post_hat, post)]
            got["recon_post_mse_z"] = [f"{e:.6g}" for e in error]
        rows.update({stem: {c: got[c][i] for c in columns} for i, stem in enumerate(got["stem"])})
        if not settings_file.is_file():  # how the captions were generated, for the joining run
            write_json(settings_file, adapter.generation_settings(max_new_tokens))
        parts.write_part(out, (s, a, b), fp, {c: got[c] for c in columns})
        computed += b - a
        interrupt.check(f"images {a}-{b} of {shard_list[s].name}")

    if workers > 1:  # the table and metrics belong to the joining run
        typer.echo(f"captions: {model}: worker {worker}/{workers}: {computed} images captioned -> {out / parts.PARTS} "
                   f"in {time.perf_counter() - start:.1f} s")
        return
    if not settings_file.is_file():
        write_json(settings_file, adapter.generation_settings(max_new_tokens))
    order = [stem for shard_stems in stems for stem in shard_stems]
    table = {c: [rows[st][c] for st in order] for c in columns}
    write_table(out / "captions.csv", table)
    generation = json.loads(settings_file.read_text())
    shutil.rmtree(out / parts.PARTS, ignore_errors=True)

    n = len(table["stem"])
    summary = {"model": spec, "images": n, "generation": generation,
               "missing_references": sum(not by_stem[st].references for st in order),
               "empty_post": sum(not c.strip() for c in table["post"])}
    if recon:
        summary["empty_recon"] = sum(not c.strip() for c in table["recon"])
        summary["recon_equals_post"] = sum(a == b for a, b in zip(table["post"], table["recon"])) / max(n, 1)
    metrics = metrics or layout.details("captions", model)
    write_json(metrics, summary)
    write_timings("captions", model, total=time.perf_counter() - start, load=adapter.load_seconds)
    typer.echo(f"captions: {model}: {n} images from {vectors}{' and ' + str(recon_vectors) if recon else ''} -> "
               f"{out / 'captions.csv'} ({computed} captioned now, {n - computed} kept from earlier parts) in "
               f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run(app)
