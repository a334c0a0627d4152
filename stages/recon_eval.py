"""Stage recon_eval: how well E_pre is recovered from E_post, per image, against the baselines.

Writes data/recon_eval/<model>/per_image.csv (one row per image, its split and every metric of
conngeo.recon.evaluate), data/recon_eval/<model>/patch_loss.csv (per-patch z-MSE on the patch grid,
raster order, for the mean over test images and a few test images from best to worst),
plots/recon/<model>_patch_loss.png, and metrics/recon_eval/<model>.json (the means per split, the
baselines, and the verdicts on test: beats_mean_baseline, beats_linear_baseline / underfit,
beats_ridge_baseline). Reads a window of images at a time (params max_window_mb). The token layout
(which E_post token each E_pre token goes into, the raster order of the patches) is the one the
extraction recorded: no family is named here.
"""

import time
from pathlib import Path

import pandas as pd
import torch
import typer

from common import load_params, run, write_json
from conngeo import layout
from conngeo.data.vectors import VectorReader, images_within, shard_folders
from conngeo.recon import TEST, Normalizer, ReconConfig, read_split, reconstruction_report
from conngeo.recon.figures import note_figure, patch_loss_figure

app = typer.Typer(add_completion=False)


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
    vectors = vectors or layout.data("vectors", model)
    recon_vectors = recon_vectors or layout.data("recon_vectors", model)
    recon = recon or layout.data("recon", model)
    start = time.perf_counter()
    original = VectorReader(shard_folders(vectors, f"dvc repro extract@{model}"))
    rebuilt = VectorReader(shard_folders(recon_vectors, f"dvc repro recon_export@{model}"), sides=("pre",))
    if rebuilt.stems != original.stems:
        raise SystemExit(f"{recon_vectors} does not hold the images of {vectors} in the same order; "
                         f"rerun `dvc repro recon_export@{model}`")
    saved_split = read_split(recon / "split.csv")
    missing = [s for s in original.stems if s not in saved_split]
    if missing:
        raise SystemExit(f"{recon / 'split.csv'} has no split for {len(missing)} images (e.g. {missing[:3]}); "
                         "the reconstructor was trained on other images: rerun `dvc repro recon`")
    split = [saved_split[s] for s in original.stems]
    norm = Normalizer.load(recon / "norm.safetensors")
    tokens = original.layout  # the token layout the extraction recorded
    columns, summary, patch = reconstruction_report(
        original, rebuilt, split, norm, tokens.get("pre_to_post"), alphas=cfg["ridge_alphas"],
        window=images_within(params["max_window_mb"], original.image_bytes() + rebuilt.image_bytes()),
        linear_max_features=cfg["linear_max_features"])
    summary = {"model_type": ReconConfig.load(recon).model_type, **summary}

    out = out or layout.data("recon_eval", model)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"stem": original.stems, "split": split, **{k: v.numpy() for k, v in columns.items()}})
    table.to_csv(out / "per_image.csv", index=False, float_format="%.6g")

    raster = tokens.get("pre_raster")
    plot = plot or Path("plots/recon") / f"{model}_patch_loss.png"
    if raster is None:
        note = f"{model}: {patch.shape[1]} E_pre tokens are not a square patch grid; no patch-loss maps"
        typer.echo(f"recon_eval: {note}")
        note_figure(plot, note)
    else:
        side = int(len(raster) ** 0.5)
        maps = patch[:, torch.tensor(raster)].reshape(-1, side, side)
        test_idx = [i for i, s in enumerate(split) if s == TEST]
        ranked = sorted(test_idx, key=lambda i: float(columns["mse_z"][i]))
        k = min(cfg["patch_maps"], len(ranked))
        picks = [ranked[round(j * (len(ranked) - 1) / max(k - 1, 1))] for j in range(k)]  # best .. worst
        shown = torch.cat([maps[test_idx].mean(dim=0, keepdim=True), maps[picks]])
        names = ["test_mean"] + [original.stems[i] for i in picks]
        rows = [(name, r, c, float(m[r, c])) for name, m in zip(names, shown)
                for r in range(m.shape[0]) for c in range(m.shape[1])]
        pd.DataFrame(rows, columns=["image", "row", "col", "mse_z"]).to_csv(out / "patch_loss.csv", index=False,
                                                                            float_format="%.6g")
        titles = [f"mean of {len(test_idx)} test images"] + [
            f"{original.stems[i]}\nimage MSE {float(columns['mse_z'][i]):.3g}" for i in picks]
        patch_loss_figure(shown, titles, plot, f"{model} ({summary['model_type']}): E_pre reconstruction error "
                                               "per patch, test images, best to worst")
    metrics = metrics or layout.details("recon_eval", model)
    write_json(metrics, summary)
    test = summary[TEST]
    typer.echo(f"recon_eval: {model}: test z-MSE {test['mse_z']:.4f} (mean baseline {test['mean_mse_z']:.4f}, linear "
               f"{test['linear_mse_z']:.4f}), pooled z-MSE {test['pooled_mse_z']:.4f} (ridge "
               f"{test['ridge_pooled_mse_z']:.4f}); underfit: {summary['underfit']}; "
               f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run(app)
