"""Stage recon_eval: how well E_pre is recovered from E_post, per image, against the baselines.

Writes data/recon_eval/<model>/per_image.csv (one row per image, its split and every metric of
conngeo.recon.evaluate), data/recon_eval/<model>/patch_loss.csv (per-patch z-MSE on the patch grid,
raster order, for the mean over validation images and a few validation images from best to worst),
plots/recon/<model>_patch_loss.png, and metrics/recon_eval/<model>.json (validation and training
means, the baselines, beats_mean_baseline / beats_ridge_baseline).
"""

import json
import math
import time
from pathlib import Path

import pandas as pd
import torch
import typer

from common import load_params
from conngeo.recon import Normalizer, ReconConfig, load_pairs, read_split, reconstruction_report
from conngeo.recon.data import VAL
from conngeo.recon.figures import note_figure, patch_loss_figure

app = typer.Typer(add_completion=False)

# Families whose E_pre is stored merge unit by merge unit (see conngeo.models.qwen2_5_vl), with
# their merge size; every other family stores patches in raster order already.
MERGE_UNIT_ORDER = {"qwen2.5vl": 2, "qwen3.5": 2}


def shard_folders(root: Path, what: str) -> list[Path]:
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not folders:
        raise SystemExit(f"{root}: no shards; run `dvc repro {what}` first")
    return folders


def to_raster(patch: torch.Tensor, family: str) -> torch.Tensor | None:
    """[N, side, side] patch maps from per-token values [N, n_pre] in stored order; None if not square."""
    side = math.isqrt(patch.shape[1])
    if side * side != patch.shape[1]:
        return None
    if family in MERGE_UNIT_ORDER:
        from conngeo.models.qwen2_5_vl import raster_order
        patch = patch[:, raster_order((1, side, side), MERGE_UNIT_ORDER[family])]
    return patch.reshape(-1, side, side)


@app.command()
def main(
    model: str = typer.Option(..., help="a name from params.yaml `models`"),
    vectors: Path = typer.Option(None, help="original shards (default data/vectors/<model>)"),
    recon_vectors: Path = typer.Option(None, help="reconstructions (default data/recon_vectors/<model>)"),
    recon: Path = typer.Option(None, help="trained reconstructor: norm, split (default data/recon/<model>)"),
    out: Path = typer.Option(None, help="per-image CSV folder (default data/recon_eval/<model>)"),
    metrics: Path = typer.Option(None, help="default metrics/recon_eval/<model>.json"),
    plot: Path = typer.Option(None, help="default plots/recon/<model>_patch_loss.png"),
):
    """Per-image MSE (z and raw) and cosine of the reconstructions, the baselines, patch-loss maps."""
    params = load_params()
    cfg = params["recon"]
    family = params["models"][model]["family"]
    vectors = vectors or Path("data/vectors") / model
    recon_vectors = recon_vectors or Path("data/recon_vectors") / model
    recon = recon or Path("data/recon") / model
    start = time.perf_counter()
    original = load_pairs(shard_folders(vectors, "extract"))
    rebuilt = load_pairs(shard_folders(recon_vectors, "recon_export"))
    if rebuilt.stems != original.stems:
        raise SystemExit(f"{recon_vectors} does not hold the images of {vectors} in the same order; "
                         "rerun `dvc repro recon_export`")
    saved_split = read_split(recon / "split.csv")
    missing = [s for s in original.stems if s not in saved_split]
    if missing:
        raise SystemExit(f"{recon / 'split.csv'} has no split for {len(missing)} images (e.g. {missing[:3]}); "
                         "the reconstructor was trained on other images: rerun `dvc repro recon`")
    split = [saved_split[s] for s in original.stems]
    norm = Normalizer.load(recon / "norm.safetensors")
    columns, summary, patch = reconstruction_report(rebuilt.pre, original.pre, original.post, split, norm,
                                                    alphas=cfg.get("ridge_alphas", (0.01, 0.1, 1, 10, 100, 1000)))
    summary = {"model_type": ReconConfig.load(recon).model_type, **summary}

    out = out or Path("data/recon_eval") / model
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"stem": original.stems, "split": split, **{k: v.numpy() for k, v in columns.items()}})
    table.to_csv(out / "per_image.csv", index=False, float_format="%.6g")

    maps = to_raster(patch, family)
    plot = plot or Path("plots/recon") / f"{model}_patch_loss.png"
    if maps is None:
        note = f"{model}: {patch.shape[1]} E_pre tokens are not a square patch grid; no patch-loss maps"
        typer.echo(f"recon_eval: {note}")
        note_figure(plot, note)
    else:
        val_idx = [i for i, s in enumerate(split) if s == VAL]
        ranked = sorted(val_idx, key=lambda i: float(columns["mse_z"][i]))
        k = min(cfg.get("patch_maps", 3), len(ranked))
        picks = [ranked[round(j * (len(ranked) - 1) / max(k - 1, 1))] for j in range(k)]  # best .. worst
        shown = torch.cat([maps[val_idx].mean(dim=0, keepdim=True), maps[picks]])
        names = ["val_mean"] + [original.stems[i] for i in picks]
        rows = [(name, r, c, float(m[r, c])) for name, m in zip(names, shown)
                for r in range(m.shape[0]) for c in range(m.shape[1])]
        pd.DataFrame(rows, columns=["image", "row", "col", "mse_z"]).to_csv(out / "patch_loss.csv", index=False,
                                                                            float_format="%.6g")
        titles = [f"mean of {len(val_idx)} val images"] + [
            f"{original.stems[i]}\nimage MSE {float(columns['mse_z'][i]):.3g}" for i in picks]
        patch_loss_figure(shown, titles, plot, f"{model} ({summary['model_type']}): E_pre reconstruction error "
                                               "per patch, validation images, best to worst")
    metrics = metrics or Path("metrics/recon_eval") / f"{model}.json"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps(summary, indent=2) + "\n")
    val = summary[VAL]
    typer.echo(f"recon_eval: {model}: val z-MSE {val['mse_z']:.4f} (mean baseline {val['mean_mse_z']:.4f}), "
               f"pooled z-MSE {val['pooled_mse_z']:.4f} (ridge {val['ridge_pooled_mse_z']:.4f}); "
               f"beats mean: {summary['beats_mean_baseline']}, beats ridge: {summary['beats_ridge_baseline']}; "
               f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    app()
