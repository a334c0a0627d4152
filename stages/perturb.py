"""Stage perturb: captions from perturbed E_post, one model x mode x level per run, into
data/perturb/<model>/<mode>/<level>/captions.csv (stem, shard, reference, caption, changed, fraction,
relative_change).

Modes and level semantics are in conngeo.captions.perturb (a larger level is a stronger perturbation
in both modes: mask = fraction of tokens masked, lowrank = fraction of singular values removed).
`changed` is the number of tokens masked or singular directions removed in that image, `fraction` its
share, `relative_change` = ||E_post - perturbed||^2 / ||E_post||^2.
"""

import time
from pathlib import Path

import torch
import typer

from common import load_params, model_spec
from conngeo.captions import MODES, PerturbedPosts, generate_captions, perturbation_size, write_table
from conngeo.captions.inputs import match_images, shard_folders
from conngeo.data.images import scan
from conngeo.data.vectors import read_shard
from conngeo.models import load_adapter

app = typer.Typer(add_completion=False)


@app.command()
def main(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    mode: str = typer.Option(..., help=f"one of {', '.join(MODES)}"),
    level: float = typer.Option(..., help="0..1; mask: fraction of tokens masked, lowrank: of singular values removed"),
    root: Path = typer.Option(None, help="image root (default: params data.root)"),
    vectors: Path = typer.Option(None, help="extracted vector shards (default data/vectors/<model>)"),
    out: Path = typer.Option(None, help="output folder (default data/perturb/<model>/<mode>/<level>)"),
    fill: str = typer.Option(None, help="mask fill: zeros or mean (default: params perturb.mask_fill)"),
    seed: int = typer.Option(None, help="which tokens are masked (default: params perturb.seed)"),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: params captions.device)"),
    batch_size: int = typer.Option(None, help="images per generate call (default: params captions.batch_size)"),
    max_new_tokens: int = typer.Option(None, help="default: params captions.max_new_tokens"),
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's choice)"),
):
    """Perturb every image's E_post and caption it."""
    if mode not in MODES:
        raise SystemExit(f"unknown perturbation mode {mode!r}; choose one of {MODES}")
    if not 0 <= level <= 1:
        raise SystemExit(f"--level must be in [0, 1], not {level}")
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    params = load_params()
    cfg, pcfg, data = params["captions"], params["perturb"], params["data"]
    spec = model_spec(model, params)
    fill = fill or pcfg.get("mask_fill", "zeros")
    seed = pcfg.get("seed", 0) if seed is None else seed
    root = root or Path(data["root"])
    vectors = vectors or Path("data/vectors") / model
    out = out or Path("data/perturb") / model / mode / str(level)

    folder = scan(root, on_bad_image=data["on_bad_image"])
    adapter = load_adapter(spec["family"], spec["source"], revision=spec["revision"],
                           device=device or cfg.get("device", "cpu"), dtype=spec["dtype"], prompt=spec["prompt"])
    table = {k: [] for k in ("stem", "shard", "reference", "caption", "changed", "fraction", "relative_change")}
    for shard_folder in shard_folders(vectors, f"dvc repro extract@{model}"):
        shard = read_shard(shard_folder)
        items = match_images(folder, shard.stems, str(shard_folder))
        perturbed = PerturbedPosts(shard.post, shard.stems, mode, level, seed=seed, fill=fill)
        table["stem"] += shard.stems
        table["shard"] += [shard_folder.name] * len(items)
        table["reference"] += [it.caption or "" for it in items]
        table["caption"] += generate_captions(adapter, [it.path for it in items], perturbed,
                                              batch_size=batch_size or cfg["batch_size"],
                                              max_new_tokens=max_new_tokens or cfg["max_new_tokens"],
                                              desc=f"perturb {model} {mode} {level} {shard_folder.name}")
        for p, change in zip(shard.post, perturbed.relative_changes):
            changed = perturbation_size(p, mode, level)
            table["changed"].append(changed)
            table["fraction"].append(f"{changed / (p.shape[0] if mode == 'mask' else min(p.shape)):.6g}")
            table["relative_change"].append(f"{change:.6g}")
    write_table(out / "captions.csv", table)
    how = f" (fill {fill}, seed {seed})" if mode == "mask" else ""
    typer.echo(f"perturb: {model} {mode} {level}{how}: {len(table['stem'])} images -> "
               f"{out / 'captions.csv'} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    app()
