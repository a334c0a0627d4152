"""Stage report: every figure and table of the study from the upstream stages' outputs, no model needed.

    results/summary.csv, summary.md     per model: KNOR, erank, reconstruction vs baselines, caption
                                        scores, perturbation sensitivity
    results/question.csv, question.md   per model, Spearman rho [95% bootstrap CI], p of each geometry
                                        change with each caption instability, and the generated answer
    results/figures/*.png               the figures (README, Report)
    results/series/*.csv                the figures' series, declared as dvc plots
    results/connectors.csv, .md         with connector variants in the study: each connector kind on
                                        the same base against KNOR, reconstruction, accuracy, sensitivity

The quick path reads a committed sample in the same layout, with the params it was made with:
    python stages/report.py --inputs sample --out /tmp/report
"""

import json
import time
from pathlib import Path

import pandas as pd
import typer

from common import load_params
from conngeo.report import connectors, figures, tables

app = typer.Typer(add_completion=False)


@app.command()
def main(
    inputs: Path = typer.Option(Path("."), help="root holding params.yaml, data/ and metrics/ (the project, or sample/)"),
    out: Path = typer.Option(Path("results"), help="output folder"),
    bootstrap: int = typer.Option(None, help="bootstrap resamples (default: params report.bootstrap)"),
):
    """Figures, summary tables and the question's correlations from the knn, recon_eval and score outputs."""
    start = time.perf_counter()
    if not (inputs / "params.yaml").is_file():
        raise SystemExit(f"{inputs / 'params.yaml'}: not found; --inputs is the project root or a sample folder "
                         "made by scripts/make_sample.py")
    params = load_params(inputs / "params.yaml")
    cfg = params["report"]
    models = list(params["models"])
    modes, levels = params["perturb"]["modes"], params["perturb"]["levels"]
    n_boot = cfg["bootstrap"] if bootstrap is None else bootstrap
    split = cfg.get("split", "val")
    if split not in ("val", "train", "all"):
        raise SystemExit(f"params report.split is {split!r}; use val, train or all")
    split = None if split == "all" else split
    try:  # missing or stale inputs: say which and what to rerun, without a traceback
        data = {m: tables.load_model(inputs, m) for m in models}
        # the largest k the knn stage computed (it clips params' ks to N-1)
        k = cfg.get("k") or max(data[models[0]].knn_metrics["ks"])
        per_image = {m: tables.per_image(d, k) for m, d in data.items()}
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e))
    q = tables.question(per_image, n_boot=n_boot, seed=cfg["seed"], split=split)
    curves = tables.curves({m: d.score_summary for m, d in data.items()}, modes, levels)
    summary = pd.DataFrame([tables.summary_row(d, curves, modes) for d in data.values()])
    knor = pd.concat([tables.knor_table(d) for d in data.values()], ignore_index=True)
    means = pd.concat([tables.caption_means(d) for d in data.values()], ignore_index=True)
    images = pd.concat([t.assign(model=m) for m, t in per_image.items()], ignore_index=True)
    images = images[["model"] + [c for c in images.columns if c != "model"]]
    patch = pd.concat([d.patch_loss.assign(model=m) for m, d in data.items() if d.patch_loss is not None]
                      or [pd.DataFrame(columns=["model", "image", "row", "col", "mse_z"])], ignore_index=True)

    out.mkdir(parents=True, exist_ok=True)
    # `panel`: the column the dvc plots templates (.dvc/plots) draw one panel per value of
    series = {"caption_scores": means.assign(panel=means["score"]), "per_image": images.assign(panel=images["split"]),
              "knor": knor.assign(panel=knor["pair"]), "perturbation": curves.assign(panel=curves["mode"]),
              "patch_loss": patch[["model", "image", "row", "col", "mse_z"]]}
    (out / "series").mkdir(exist_ok=True)
    for name, table in series.items():
        table.to_csv(out / "series" / f"{name}.csv", index=False, float_format="%.6g")
    summary.to_csv(out / "summary.csv", index=False, float_format="%.6g")
    transposed = summary.set_index("model").T.reset_index().rename(columns={"index": "quantity"})
    (out / "summary.md").write_text(
        "# Summary per model\n\nKNOR on the dataset (chance k/(N-1) beside it), effective rank, reconstruction "
        "(validation images) against the mean and ridge baselines, caption scores of the post and recon captions, "
        "perturbation sensitivity (mean drop of the score over the levels).\n\n" + tables.markdown(transposed))
    q.to_csv(out / "question.csv", index=False, float_format="%.6g")
    (out / "question.md").write_text(tables.question_text(q, split, n_boot, k) + "\n" + tables.markdown(q))

    fig = out / "figures"
    figures.caption_scores(means, fig / "caption_scores.png")
    # the scatter plots show the images the correlations are computed over
    shown, which = (images, " (all images)") if split is None else (images[images["split"] == split], f" ({split} images)")
    figures.score_vs_error(shown, fig / "score_vs_error.png", which)
    figures.knor(knor, fig / "knor.png")
    figures.erank_clipscore(shown, fig / "erank_clipscore.png", which)
    for mode in modes:
        figures.perturbation(curves, mode, fig / f"perturbation_{mode}.png")
    figures.patch_loss(patch, fig / "patch_loss.png")
    figures.question_heatmap(q, fig / "question.png")
    kinds = connectors.connector_kinds(params)
    if kinds:  # connector experiments: each kind on its base's encoder and language model
        # held-out exact-caption rate from train_connector's metrics, which also score the base
        extra = {}
        for m in kinds:
            f = inputs / "metrics" / "connectors" / f"{m}.json"
            if f.is_file():
                trained = json.loads(f.read_text())
                extra[m] = {"heldout_exact": trained["accuracy"]["exact"]}
                extra[trained["base"]] = {"heldout_exact": trained["base_accuracy"]["exact"]}
        table = connectors.connector_table(summary, kinds, k, modes, extra)
        rho = connectors.geometry_vs_stability(table, k, modes)
        table.to_csv(out / "connectors.csv", index=False, float_format="%.6g")
        (out / "connectors.md").write_text(connectors.markdown(table, rho))
        connectors.connector_figure(table, k, modes, fig / "connectors.png")
    else:  # the outputs exist either way, as dvc.yaml declares them
        (out / "connectors.csv").write_text("base,model,kind\n")
        (out / "connectors.md").write_text("No connector variants in this study (params connectors.variants).\n")
    distinct = int(q["distinct"].sum())
    typer.echo(f"report: {len(models)} models from {inputs} -> {out}: {distinct} of {len(q)} correlations "
               f"distinguishable from zero ({n_boot} resamples) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    app()
