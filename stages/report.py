"""Stage report: every figure and table of the study from the upstream stages' outputs, no model needed.

    results/summary.csv, summary.md     per model: KNOR, erank, reconstruction (test) vs its baselines, the
                                        error that reaches the LM, probes, caption scores, perturbation
                                        sensitivity on the actual fraction, and the reference spaces' probes
    results/question.csv, question.md   both questions (reconstruction, perturbation): Spearman rho, permutation
                                        p, BH q over the family, m, bootstrap CI, verdict; the answer in words
    results/figures/*.png               the figures (README, Report)
    results/series/*.csv                the figures' series, declared as dvc plots
    results/connectors.csv, .md         with connector variants in the study: each connector kind on
                                        the same base against KNOR, reconstruction, accuracy, sensitivity
    results/examples/index.html         the images behind the numbers, per model (conngeo.report.examples):
                                        thumbnails from the image root (params data.root under --inputs)

The quick path reads a committed sample in the same layout, with the params it was made with:
    python stages/report.py --inputs sample --out /tmp/report
"""

import time
from pathlib import Path

import pandas as pd
import typer

from common import load_params, run, write_json
from conngeo import layout
from conngeo.recon.figures import note_figure
from conngeo.report import connectors, examples, figures, tables

app = typer.Typer(add_completion=False)


@app.command()
def main(
    inputs: Path = typer.Option(Path("."), help="root holding params.yaml, data/ and metrics/ (the project, or sample/)"),
    out: Path = typer.Option(Path("results"), help="output folder"),
    bootstrap: int = typer.Option(None, help="bootstrap resamples (default: params report.bootstrap)"),
    permutations: int = typer.Option(None, help="permutations per test (default: params report.permutations)"),
):
    """Figures, summary tables and the two questions' correlations from the geometry, recon_eval, captions and score outputs."""
    start = time.perf_counter()
    if not (inputs / "params.yaml").is_file():
        raise SystemExit(f"{inputs / 'params.yaml'}: not found; --inputs is the project root or a sample folder "
                         "made by scripts/make_sample.py")
    params = load_params(inputs / "params.yaml")
    cfg = params["report"]
    models = list(params["models"])
    modes, levels = params["perturb"]["modes"], params["perturb"]["levels"]
    n_boot = cfg["bootstrap"] if bootstrap is None else bootstrap
    n_perm = cfg["permutations"] if permutations is None else permutations
    try:  # missing or stale inputs: say which and what to rerun, without a traceback
        data = {m: tables.load_model(inputs, m, [f"{mode}_{lv}" for mode in modes for lv in levels]) for m in models}
        references = pd.concat([tables.read_csv(layout.data("refs", space, inputs) / "probes.csv", index=None)
                                for space in params["references"]["spaces"]] or [pd.DataFrame()], ignore_index=True)
        k = cfg["k"] or max(data[models[0]].geometry_metrics["ks"])  # the largest k the geometry stage computed (clipped)
        fractions = {mode: tables.common_fraction(data, mode, levels, cfg["max_fraction"]) for mode in modes}
        measures = tables.measures(modes, levels)
        covariates = tables.read_csv(layout.covariates(inputs))
        per_image = {m: tables.per_image(d, measures, {"k": k, "fractions": fractions}, covariates)
                     for m, d in data.items()}
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise SystemExit(str(e))
    q = tables.question(per_image, measures, list(covariates.columns), n_perm=n_perm, n_boot=n_boot, seed=cfg["seed"],
                        alpha=cfg["alpha"], max_levels=cfg["strata_levels"], bins=cfg["strata_bins"])
    curves = tables.curves(data, modes, levels)
    probes = pd.concat([tables.probe_table(d, references) for d in data.values()], ignore_index=True)
    summary = pd.DataFrame([tables.summary_row(d, curves, modes, fractions, n_boot, cfg["seed"]) for d in data.values()])
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
              "patch_loss": patch[["model", "image", "row", "col", "mse_z"]], "probes": probes}
    (out / "series").mkdir(exist_ok=True)
    for name, table in series.items():
        table.to_csv(out / "series" / f"{name}.csv", index=False, float_format="%.6g")
    summary.to_csv(out / "summary.csv", index=False, float_format="%.6g")
    transposed = summary.set_index("model").T.reset_index().rename(columns={"index": "quantity"})
    refs_md = ""
    if not references.empty:
        refs = references.pivot_table(index=["target", "metric"], columns="space", values="score", sort=False)
        refs["chance"] = references.groupby("target", sort=False)["chance"].first().reindex(refs.index.get_level_values(0)).to_numpy()
        refs_md = ("\n## Reference spaces\n\nHow well linear probes read the ground truth from each reference space, "
                   "beside chance: a reference that carries little of it says little when E_pre or E_post is compared "
                   "with it (KNOR against it above).\n\n" + tables.markdown(refs.reset_index()))
    (out / "summary.md").write_text(
        "# Summary per model\n\nKNOR on the dataset (chance k/(N-1) beside it), effective rank, reconstruction on the "
        "test images against the mean, token-level linear and pooled ridge baselines (recon_linear_margin: linear - "
        "learned z-MSE, mean over the test images with a 95% bootstrap interval; underfit where it lies below 0), the "
        "error that reaches the language model (lm_error), readability of the ground truth by linear probes from E_pre "
        "and E_post (balanced accuracy for classes, R² for counts, the mean over the fold seeds; drop = pre - post), "
        "caption scores of the post caption (all images; _test: the test images) and the recon caption (test images), "
        "perturbation sensitivity (mean drop of the score "
        f"over the actual fraction changed, up to {', '.join(f'{m} {f:.3g}' for m, f in fractions.items())}).\n\n"
        + tables.markdown(transposed) + refs_md)
    for row in summary.to_dict("records"):  # the DVC metrics: a dozen numbers per model
        write_json(out / "metrics" / f"{row['model']}.json", tables.headline(row, k, modes))
    q.to_csv(out / "question.csv", index=False, float_format="%.6g")
    (out / "question.md").write_text(tables.question_text(q, measures, n_perm, n_boot, k, cfg["alpha"]))

    fig = out / "figures"
    figures.caption_scores(means, fig / "caption_scores.png")
    test = images[images["split"] == "test"]  # the reconstruction question's images
    figures.score_vs_error(test, fig / "score_vs_error.png", " (test images)")
    figures.knor(knor, fig / "knor.png")
    figures.erank_clipscore(images, fig / "erank_clipscore.png", " (all images)")
    for mode in modes:
        figures.perturbation(curves, mode, fig / f"perturbation_{mode}.png", fractions[mode])
    figures.patch_loss(patch, fig / "patch_loss.png")
    figures.question_heatmap(q[q["question"] == "reconstruction"], fig / "question.png",
                             "Reconstruction question (test images)")
    figures.question_heatmap(q[q["question"] == "perturbation"], fig / "question_perturbation.png",
                             "Perturbation question (all images, no reconstructor)")
    if len(probes):
        figures.probes(probes, fig / "probes.png")
    else:
        note_figure(fig / "probes.png", "no ground truth for this image root (attributes.csv / objects.csv): no probes")
    kinds = connectors.connector_kinds(params, {m: d.geometry_metrics.get("connector") for m, d in data.items()})
    if kinds:  # connector experiments: each kind on its base's encoder and language model
        table = connectors.connector_table(summary, kinds, k, modes)
        rho = connectors.geometry_vs_stability(table, k, modes)
        table.to_csv(out / "connectors.csv", index=False, float_format="%.6g")
        (out / "connectors.md").write_text(connectors.markdown(table, rho))
        connectors.connector_figure(table, k, modes, fig / "connectors.png")
    else:  # the outputs exist either way, as dvc.yaml declares them
        (out / "connectors.csv").write_text("base,model,kind\n")
        (out / "connectors.md").write_text("No connector variants in this study (params connectors.variants).\n")
    neighbours = {m: examples.read_neighbours(inputs, m) for m in models}
    examples.write_page(out / "examples", data, per_image, neighbours, inputs / params["data"]["root"], modes, levels,
                        fractions, k, cfg["examples"])
    findings = q[q["family"] == "finding"]
    found = int((findings["verdict"] == "distinguishable").sum())
    typer.echo(f"report: {len(models)} models from {inputs} -> {out}: {found} of {len(findings)} correlations "
               f"distinguishable after adjustment ({n_perm} permutations, BH within each family; "
               f"{len(q) - len(findings)} circular ones apart) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run(app)
