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
import time
from pathlib import Path

import torch
import typer

from common import LazyAdapter, load_model, load_params, model_spec
from conngeo.captions import MODES, PerturbedPosts, generate_captions, perturbation_size, read_table, write_table
from conngeo.captions import parts
from conngeo.captions.inputs import match_images, shard_folders
from conngeo.data.images import scan
from conngeo.data.vectors import read_shard

app = typer.Typer(add_completion=False)
DONE = "parts.json"


def digest(matrix: torch.Tensor) -> str:
    """A hash of the matrix's bytes: equal digests, the same perturbed E_post."""
    return hashlib.sha1(matrix.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


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
    vectors = vectors or Path("data/vectors") / model
    out = out or Path("data/perturb") / model

    folder = scan(root, on_bad_image=data["on_bad_image"])
    adapter = LazyAdapter(lambda: load_model(spec, device or params["device"]))  # not loaded if all parts are done
    shard_list = shard_folders(vectors, f"dvc repro extract@{model}")
    inputs = [f / n for f in shard_list for n in ("index.csv", "post.safetensors")]
    done_file = out / DONE
    done = json.loads(done_file.read_text()) if done_file.is_file() else {}
    shards = [read_shard(f) for f in shard_list]
    items = [match_images(folder, s.stems, str(f)) for s, f in zip(shards, shard_list)]
    captioned: dict[tuple[str, str], tuple[str, str]] = {}  # (stem, digest of perturbed E_post) -> (part, caption)
    counts = {}
    for mode in pcfg["modes"]:
        for level in pcfg["levels"]:
            part = f"{mode}/{level}"
            settings = {"model": spec, "mode": mode, "level": level, "fill": pcfg["mask_fill"], "seed": pcfg["seed"],
                        "max_new_tokens": cfg["max_new_tokens"], "batch_size": cfg["batch_size"]}
            fp = parts.fingerprint(settings, inputs)
            table = {k: [] for k in ("stem", "shard", "caption", "changed", "fraction", "relative_change",
                                     "reused_from")}
            todo = []  # (row, key, image path, perturbed E_post) of the images that need a caption
            for shard, shard_items, shard_folder in zip(shards, items, shard_list):
                perturbed = PerturbedPosts(shard.post, shard.stems, mode, level, seed=pcfg["seed"],
                                           fill=pcfg["mask_fill"])
                for i, (stem, it) in enumerate(zip(shard.stems, shard_items)):
                    matrix, post = perturbed[i], shard.post[i]
                    changed = perturbation_size(post, mode, level)
                    key = (stem, digest(matrix))
                    source, caption = captioned.get(key, ("", None))
                    if not source:
                        todo.append((len(table["stem"]), key, it.path, matrix))
                    table["stem"].append(stem)
                    table["shard"].append(shard_folder.name)
                    table["caption"].append(caption)
                    table["changed"].append(changed)
                    table["fraction"].append(f"{changed / (post.shape[0] if mode == 'mask' else min(post.shape)):.6g}")
                    table["relative_change"].append(f"{perturbed.relative_changes[i]:.6g}")
                    table["reused_from"].append(source)
            path = out / mode / str(level) / "captions.csv"
            if done.get(part) == fp and path.is_file():  # finished by an earlier, interrupted run
                new = [read_table(path, required=("caption",))["caption"][row] for row, *_ in todo]
                status = "kept"
            else:
                new = generate_captions(adapter, [p for *_, p, _ in todo], [m for *_, m in todo],
                                        batch_size=cfg["batch_size"], max_new_tokens=cfg["max_new_tokens"],
                                        desc=f"perturb {model} {part}")
                status = "captioned"
            for (row, key, _, _), caption in zip(todo, new):
                table["caption"][row] = caption
                captioned[key] = (part, caption)
            if status == "captioned":
                write_table(path, table)
                done[part] = fp
                write_json(done_file, done)
            counts[part] = {"captioned": len(todo), "reused": len(table["stem"]) - len(todo)}
            typer.echo(f"perturb: {model} {part}: {status}; {len(todo)} images captioned, "
                       f"{counts[part]['reused']} with the same perturbed E_post as an earlier level reused")
    done_file.unlink(missing_ok=True)  # all parts done: the ledger (its fingerprints carry file times) goes
    typer.echo(f"perturb: {model}: {len(counts)} parts -> {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    app()
