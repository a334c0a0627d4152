"""Stage captions: per image, the greedy caption from the original E_post and from connector(reconstructed
E_pre), into data/captions/<model>/captions.csv (stem, shard, post, recon). The reference captions stay
beside the images (<stem>.txt); metrics/captions/<model>.json records the generation settings.

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

from common import LazyAdapter, load_model, load_params, model_spec
from conngeo.captions import captions_from_recon, generate_captions, write_table
from conngeo.captions import parts
from conngeo.captions.inputs import match_images, shard_folders
from conngeo.data.images import scan
from conngeo.data.vectors import read_index, read_shard

app = typer.Typer(add_completion=False)
COLUMNS = ("stem", "shard", "post", "recon")
GENERATION = "generation.json"  # the generation settings, kept beside the parts for the joining run


@app.command()
def main(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    root: Path = typer.Option(None, help="image root (default: params data.root)"),
    vectors: Path = typer.Option(None, help="extracted vector shards (default data/vectors/<model>)"),
    recon_vectors: Path = typer.Option(None, help="reconstructed E_pre shards (default data/recon_vectors/<model>)"),
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
                                "<out>/parts/<worker>of<workers>.csv; a plain run afterwards joins them"),
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
    vectors = vectors or Path("data/vectors") / model
    recon_vectors = recon_vectors or Path("data/recon_vectors") / model
    out = out or Path("data/captions") / model
    batch_size = batch_size or cfg["batch_size"]
    max_new_tokens = max_new_tokens or cfg["max_new_tokens"]

    folder = scan(root, on_bad_image=data["on_bad_image"])
    # loaded on first use: a run that only joins the workers' parts never needs the model
    adapter = LazyAdapter(lambda: load_model(spec, device or params["device"]))
    shard_list = shard_folders(vectors, f"dvc repro extract@{model}")
    recon_list = [recon_vectors / f.name for f in shard_list] if recon else []
    for recon_folder in recon_list:
        if not recon_folder.is_dir():
            raise SystemExit(f"{recon_folder}: no reconstructed E_pre for shard {recon_folder.name}; run "
                             f"`dvc repro recon_export@{model}` first (or pass --no-recon)")
    stems = [[r[0] for r in read_index(f)] for f in shard_list]
    columns = COLUMNS if recon else COLUMNS[:-1]

    # the work: generate batches, dealt to the workers; a plain run reuses finished parts
    settings = {"model": spec, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "recon": recon}
    inputs = [f / n for f in shard_list for n in ("index.csv", "post.safetensors")]
    inputs += [f / n for f in recon_list for n in ("index.csv", "pre.safetensors")]
    fp = parts.fingerprint(settings, inputs)
    todo = parts.my_units(parts.units([len(s) for s in stems], batch_size), worker, workers)
    done, ignored = parts.read_parts(out, fp) if workers == 1 else ({}, [])
    for path in ignored:
        typer.echo(f"captions: ignoring {path}: made from other inputs or settings")
    rows = {}
    bar = tqdm(total=sum(b - a for _, a, b in todo), desc=f"captions {model}", unit="img")
    loaded = None  # (shard number, its E_post, recon E_pre, images): one shard in memory at a time
    for s, a, b in todo:
        bar.update(b - a)
        if all(stem in done for stem in stems[s][a:b]):
            rows.update({stem: done[stem] for stem in stems[s][a:b]})
            continue
        if loaded is None or loaded[0] != s:
            shard = read_shard(shard_list[s])
            recon_pre = None
            if recon:
                recon_shard = read_shard(recon_list[s])
                if recon_shard.stems != shard.stems:
                    raise SystemExit(f"{recon_list[s]}: stems differ from {shard_list[s]}; "
                                     f"rerun `dvc repro recon_export@{model}`")
                recon_pre = recon_shard.pre
            loaded = (s, shard.post, recon_pre, match_images(folder, shard.stems, str(shard_list[s])))
        _, post, recon_pre, items = loaded
        batch = items[a:b]
        paths = [it.path for it in batch]
        got = {"stem": [it.stem for it in batch], "shard": [shard_list[s].name] * len(batch),
               "post": generate_captions(adapter, paths, post[a:b], batch_size=batch_size,
                                         max_new_tokens=max_new_tokens)}
        if recon:
            got["recon"] = captions_from_recon(adapter, paths, recon_pre[a:b], batch_size=batch_size,
                                               max_new_tokens=max_new_tokens)
        rows.update({stem: {c: got[c][i] for c in columns} for i, stem in enumerate(got["stem"])})
    bar.close()
    settings_file = out / parts.PARTS / GENERATION
    if adapter.loaded:  # a run that generated anything records how (a joining run may have generated nothing)
        settings_file.parent.mkdir(parents=True, exist_ok=True)
        settings_file.write_text(json.dumps(adapter.generation_settings(max_new_tokens), indent=2) + "\n")

    if workers > 1:  # the table and metrics belong to the joining run
        order = [stem for s, a, b in todo for stem in stems[s][a:b]]
        path = parts.write_part(out, worker, workers, fp, {c: [rows[st][c] for st in order] for c in columns})
        typer.echo(f"captions: {model}: worker {worker}/{workers}: {len(order)} images -> {path} "
                   f"in {round(time.perf_counter() - start, 2)} s")
        return
    order = [stem for shard_stems in stems for stem in shard_stems]
    table = {c: [rows[st][c] for st in order] for c in columns}
    write_table(out / "captions.csv", table)
    generation = json.loads(settings_file.read_text())
    shutil.rmtree(out / parts.PARTS, ignore_errors=True)

    n = len(table["stem"])
    by_stem = {it.stem: it for it in folder.items}
    summary = {"model": spec, "images": n, "generation": generation,
               "missing_references": sum(not by_stem[st].references for st in order),
               "empty_post": sum(not c.strip() for c in table["post"])}
    if recon:
        summary["empty_recon"] = sum(not c.strip() for c in table["recon"])
        summary["recon_equals_post"] = sum(a == b for a, b in zip(table["post"], table["recon"])) / max(n, 1)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    metrics = metrics or Path("metrics/captions") / f"{model}.json"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps(summary, indent=2) + "\n")
    typer.echo(f"captions: {model}: {n} images from {vectors}"
               f"{' and ' + str(recon_vectors) if recon else ''} -> {out / 'captions.csv'} in {summary['seconds']} s")


if __name__ == "__main__":
    app()
