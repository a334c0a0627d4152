"""Stage perturb: captions from perturbed E_post for one model, every mode and level, one model load.

For each mode (mask, lowrank) and level of params perturb, every image's E_post is perturbed
(conngeo.captions.perturb: a larger level is a stronger perturbation in both modes) and captioned,
into data/perturb/<model>/<mode>/<level>/captions.csv (stem, shard, caption, changed, fraction,
relative_change, reused_from): `changed` is the number of tokens masked or singular directions removed
in that image, `fraction` its share of the image's tokens or of min(tokens, width), `relative_change`
= ||E_post - perturbed||^2 / ||E_post||^2.

Each (mode, level) is one part, written atomically and recorded with a fingerprint of the model, the
settings and the vector files in data/perturb/<model>/parts.json, so an interrupted run redoes at
most the part it was in; the ledger is removed once every part is done. An image whose perturbed E_post equals (bit for bit) the one of an earlier
(mode, level) is not captioned again: with few tokens several nominal levels mask the same tokens.
`reused_from` names that earlier part, and the metrics count the reuse.
"""

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch
import typer
from tqdm import tqdm

from common import LazyAdapter, load_model, load_params, model_spec, run, write_json
from conngeo import interrupt, layout
from conngeo.captions import (MODES, generate_captions, perturb, perturbation_size, read_table, relative_change,
                              write_table)
from conngeo.captions import parts
from conngeo.captions.inputs import match_images
from conngeo.data.images import scan
from conngeo.data.vectors import VectorReader, images_within, shard_folders, windows

app = typer.Typer(add_completion=False)
DONE = "parts.json"


def digest(matrix: torch.Tensor) -> str:
    """A hash of the matrix's bytes: equal digests, the same perturbed E_post."""
    return hashlib.sha1(matrix.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@app.command()
def main(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    root: Path = typer.Option(None, help="image root (default: params data.root)"),
    vectors: Path = typer.Option(None, help="extracted vector shards (default data/vectors/<model>)"),
    out: Path = typer.Option(None, help="output folder (default data/perturb/<model>)"),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: params device)"),
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's choice)"),
):
    """Perturb every image's E_post at every mode and level of params perturb, and caption it."""
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    params = load_params()
    cfg, pcfg, data = params["captions"], params["perturb"], params["data"]
    unknown = sorted(set(pcfg["modes"]) - set(MODES))
    if unknown:
        raise SystemExit(f"params.yaml perturb.modes: unknown {unknown}; choose from {MODES}")
    bad = [lv for lv in pcfg["levels"] if not 0 < float(lv) <= 1]
    if bad:
        raise SystemExit(f"params.yaml perturb.levels: {bad} not in (0, 1]")
    spec = model_spec(model, params)
    root = root or Path(data["root"])
    vectors = vectors or layout.data("vectors", model)
    out = out or layout.data("perturb", model)

    folder = scan(root)
    adapter = LazyAdapter(lambda: load_model(spec, device or params["device"]))  # not loaded if all parts are done
    shard_list = shard_folders(vectors, f"dvc repro extract@{model}")
    readers = [VectorReader([f], sides=("post",)) for f in shard_list]
    paths = [[it.path for it in match_images(folder, r.stems, str(f))] for r, f in zip(readers, shard_list)]
    window = images_within(params["max_window_mb"], readers[0].image_bytes(), at_least=cfg["batch_size"])
    inputs = [f / n for f in shard_list for n in ("index.csv", "post.safetensors")]
    done_file = out / DONE
    done = json.loads(done_file.read_text()) if done_file.is_file() else {}
    captioned: dict[tuple[str, str], tuple[str, str]] = {}  # (stem, digest of perturbed E_post) -> (part, caption)
    counts = {}
    for mode in pcfg["modes"]:
        for level in pcfg["levels"]:
            part = f"{mode}/{level}"
            settings = {"model": spec, "mode": mode, "level": level, "fill": pcfg["mask_fill"], "seed": pcfg["seed"],
                        "max_new_tokens": cfg["max_new_tokens"], "batch_size": cfg["batch_size"]}
            fp = parts.fingerprint(settings, inputs)
            path = out / mode / str(level) / "captions.csv"
            kept = read_table(path, required=("caption",))["caption"] if done.get(part) == fp and path.is_file() else None
            table = {k: [] for k in ("stem", "shard", "caption", "changed", "fraction", "relative_change",
                                     "reused_from")}
            new = 0
            bar = tqdm(total=sum(map(len, readers)), desc=f"perturb {model} {part}", unit="img")
            for reader, shard_folder, shard_paths in zip(readers, shard_list, paths):
                for images in windows(list(range(len(reader))), window):
                    posts = reader.read("post", images)
                    todo = []  # (row, key, image path, perturbed E_post) of the images that need a caption
                    for i, post in zip(images, posts):
                        stem = reader.stems[i]
                        matrix = perturb(post, mode, level, stem, seed=pcfg["seed"], fill=pcfg["mask_fill"])
                        changed = perturbation_size(post, mode, level)
                        key = (stem, digest(matrix))
                        source, caption = captioned.get(key, ("", None))
                        if not source:
                            todo.append((len(table["stem"]), key, shard_paths[i], matrix))
                        table["stem"].append(stem)
                        table["shard"].append(shard_folder.name)
                        table["caption"].append(caption)
                        table["changed"].append(changed)
                        table["fraction"].append(f"{changed / (post.shape[0] if mode == 'mask' else min(post.shape)):.6g}")
                        table["relative_change"].append(f"{relative_change(post, matrix):.6g}")
                        table["reused_from"].append(source)
                    if kept is not None:  # finished by an earlier, interrupted run
                        captions = [kept[row] for row, *_ in todo]
                    else:
                        captions = generate_captions(adapter, [p for *_, p, _ in todo], [m for *_, m in todo],
                                                     batch_size=cfg["batch_size"], max_new_tokens=cfg["max_new_tokens"])
                    for (row, key, _, _), caption in zip(todo, captions):
                        table["caption"][row] = caption
                        captioned[key] = (part, caption)
                    new += len(todo)
                    bar.update(len(images))
            bar.close()
            if kept is None:
                write_table(path, table)
                done[part] = fp
                write_json(done_file, done)
            counts[part] = {"captioned": new, "reused": len(table["stem"]) - new}
            typer.echo(f"perturb: {model} {part}: {'kept from an interrupted run' if kept is not None else 'captioned'}; "
                       f"{new} images captioned, {counts[part]['reused']} reused (the same perturbed E_post as an "
                       "earlier level)")
            interrupt.check(f"{part} of {out}")
    done_file.unlink(missing_ok=True)  # all parts done: the ledger (its fingerprints carry file times) goes
    wanted = {f"{mode}/{level}" for mode in pcfg["modes"] for level in pcfg["levels"]}
    for stale in sorted(p.parent for p in out.glob("*/*/captions.csv") if f"{p.parent.parent.name}/{p.parent.name}" not in wanted):
        shutil.rmtree(stale)  # a mode or level no longer in params
    typer.echo(f"perturb: {model}: {len(counts)} parts -> {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run(app)
