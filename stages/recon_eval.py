"""Stage recon_eval: how well E_pre is recovered from E_post, per image, against the baselines.

Writes data/recon_eval/<model>/per_image.csv (one row per image, its split and every metric of
conngeo.recon.evaluate), data/recon_eval/<model>/patch_loss.csv (per-patch z-MSE on the patch grid,
raster order, for the mean over test images and a few test images from best to worst),
plots/recon/<model>_patch_loss.png, and metrics/recon_eval/<model>.json (the means per split, the
baselines, and the verdicts on test: beats_mean_baseline, beats_linear_baseline / underfit,
beats_ridge_baseline). Reads a window of images at a time (params max_window_mb). The token layout
(which E_post token each E_pre token goes into, the raster order of the patches) is the one the
extraction recorded: no family is named here (conngeo.recon.study.evaluate_reconstructions).
"""

import time
from pathlib import Path

import typer

from common import load_params, run, use_threads, write_json
from conngeo import layout
from conngeo.data.vectors import VectorReader, shard_folders
from conngeo.recon.study import evaluate_reconstructions

app = typer.Typer(add_completion=False)


@app.command()
def main(model: str = typer.Option(..., help="a name from params.yaml `models`")):
    """Per-image MSE (z and raw) and cosine of the reconstructions, the baselines, patch-loss maps."""
    params = load_params()
    use_threads(params["threads"])
    cfg, start = params["recon"], time.perf_counter()
    vectors, recon_vectors = layout.data("vectors", model), layout.data("recon_vectors", model)
    original = VectorReader(shard_folders(vectors, f"dvc repro extract@{model}"))
    rebuilt = VectorReader(shard_folders(recon_vectors, f"dvc repro recon_export@{model}"), sides=("pre",))
    if rebuilt.stems != original.stems:
        raise SystemExit(f"{recon_vectors} does not hold the images of {vectors} in the same order; "
                         f"rerun `dvc repro recon_export@{model}`")
    summary, note = evaluate_reconstructions(
        original, rebuilt, layout.data("recon", model), layout.data("recon_eval", model),
        Path("plots/recon") / f"{model}_patch_loss.png", alphas=cfg["ridge_alphas"],
        linear_max_features=cfg["linear_max_features"], patch_maps=cfg["patch_maps"],
        max_window_mb=params["max_window_mb"], title=model, remedy="rerun `dvc repro recon`")
    if note:
        typer.echo(f"recon_eval: {note}")
    write_json(layout.details("recon_eval", model), summary)
    test = summary["test"]
    typer.echo(f"recon_eval: {model}: test z-MSE {test['mse_z']:.4f} (mean baseline {test['mean_mse_z']:.4f}, linear "
               f"{test['linear_mse_z']:.4f}), pooled z-MSE {test['pooled_mse_z']:.4f} (ridge "
               f"{test['ridge_pooled_mse_z']:.4f}); underfit: {summary['underfit']}; "
               f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run(app)
