"""The whole report from one root in the pipeline's layout (the project, or a committed sample of it):
`write_report` reads every model's upstream files (conngeo.report.tables), answers both questions, and writes

    <out>/summary.csv, summary.md     per model: KNOR, erank, reconstruction (test) vs its baselines, the error
                                      that reaches the LM, probes, caption scores, perturbation sensitivity on
                                      the actual fraction, and the reference spaces' probes
    <out>/question.csv, question.md   both questions: Spearman rho raw and adjusted, permutation p, BH q within
                                      each family, m, bootstrap CI, verdict; the answer in words
    <out>/metrics/<model>.json        the dozen headline numbers per model (the DVC metrics)
    <out>/figures/*.png               the figures
    <out>/series/*.csv                the figures' series (dvc plots)
    <out>/connectors.csv, .md         with connector variants: each connector kind on the same base
    <out>/examples/index.html         the images behind the numbers (conngeo.report.examples)
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .. import layout
from ..recon.figures import note_figure
from ..resume import write_json
from . import connectors, examples, figures, tables


def read_inputs(params: dict, inputs: Path) -> dict:
    """Every model's upstream tables under `inputs`, the per-image measures and the covariates; a missing or
    stale input raises an error naming the file (or measure) and what to rerun."""
    cfg, models = params["report"], list(params["models"])
    modes, levels = params["perturb"]["modes"], params["perturb"]["levels"]
    data = {m: tables.load_model(inputs, m, [f"{mode}_{lv}" for mode in modes for lv in levels]) for m in models}
    references = pd.concat([tables.read_csv(layout.data("refs", space, inputs) / "probes.csv", index=None)
                            for space in params["references"]["spaces"]] or [pd.DataFrame()], ignore_index=True)
    k = cfg["k"] or max(data[models[0]].geometry_metrics["ks"])  # the largest k the geometry stage computed (clipped)
    fractions = {mode: tables.common_fraction(data, mode, levels, cfg["max_fraction"]) for mode in modes}
    measures = tables.measures(modes, levels)
    covariates = tables.read_csv(layout.covariates(inputs))
    per_image = {m: tables.per_image(d, measures, {"k": k, "fractions": fractions}, covariates) for m, d in data.items()}
    return {"data": data, "references": references, "k": k, "fractions": fractions, "measures": measures,
            "covariates": covariates, "per_image": per_image, "modes": modes, "levels": levels}


def summary_text(summary: pd.DataFrame, references: pd.DataFrame, fractions: dict) -> str:
    transposed = summary.set_index("model").T.reset_index().rename(columns={"index": "quantity"})
    refs_md = ""
    if not references.empty:
        refs = references.pivot_table(index=["target", "metric"], columns="space", values="score", sort=False)
        refs["chance"] = references.groupby("target", sort=False)["chance"].first().reindex(
            refs.index.get_level_values(0)).to_numpy()
        refs_md = ("\n## Reference spaces\n\nHow well linear probes read the ground truth from each reference space, "
                   "beside chance: a reference that carries little of it says little when E_pre or E_post is compared "
                   "with it (KNOR against it above).\n\n" + tables.markdown(refs.reset_index()))
    return ("# Summary per model\n\nKNOR on the dataset (chance k/(N-1) beside it), effective rank, reconstruction on the "
            "test images against the mean, token-level linear and pooled ridge baselines (recon_linear_margin: linear - "
            "learned z-MSE, mean over the test images with a 95% bootstrap interval; underfit where it lies below 0), the "
            "error that reaches the language model (lm_error), readability of the ground truth by linear probes from "
            "E_pre and E_post (balanced accuracy for classes, R² for counts, the mean over the fold seeds; drop = pre - "
            "post), caption scores of the post caption (all images; _test: the test images) and the recon caption (test "
            "images), perturbation sensitivity (mean drop of the score over the actual fraction changed, up to "
            f"{', '.join(f'{m} {f:.3g}' for m, f in fractions.items())}).\n\n" + tables.markdown(transposed) + refs_md)


def write_report(params: dict, inputs: Path, out: Path, n_boot: int, n_perm: int) -> str:
    """Every table, figure and page of the report from the files under `inputs` (params: that root's params.yaml)
    into `out`, with `n_boot` bootstrap resamples and `n_perm` permutations per test (both stated in
    question.md); the line that sums it up."""
    cfg = params["report"]
    r = read_inputs(params, inputs)
    data, per_image, k, fractions, modes = r["data"], r["per_image"], r["k"], r["fractions"], r["modes"]
    q = tables.question(per_image, r["measures"], list(r["covariates"].columns), n_perm=n_perm, n_boot=n_boot,
                        seed=cfg["seed"], alpha=cfg["alpha"], max_levels=cfg["strata_levels"], bins=cfg["strata_bins"])
    curves = tables.curves(data, modes, r["levels"])
    probes = pd.concat([tables.probe_table(d, r["references"]) for d in data.values()], ignore_index=True)
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
    (out / "summary.md").write_text(summary_text(summary, r["references"], fractions))
    for row in summary.to_dict("records"):  # the DVC metrics: a dozen numbers per model
        write_json(out / "metrics" / f"{row['model']}.json", tables.headline(row, k, modes))
    q.to_csv(out / "question.csv", index=False, float_format="%.6g")
    (out / "question.md").write_text(tables.question_text(q, r["measures"], n_perm, n_boot, k, cfg["alpha"]))

    fig = out / "figures"
    figures.caption_scores(means, fig / "caption_scores.png")
    figures.score_vs_error(images[images["split"] == "test"], fig / "score_vs_error.png", " (test images)")
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
    write_connectors(params, data, summary, k, modes, out)
    neighbours = {m: examples.read_neighbours(inputs, m) for m in data}
    examples.write_page(out / "examples", data, per_image, neighbours, inputs / params["data"]["root"], modes,
                        r["levels"], fractions, k, cfg["examples"])
    findings = q[q["family"] == "finding"]
    return (f"{len(data)} models from {inputs} -> {out}: {int((findings['verdict'] == 'distinguishable').sum())} of "
            f"{len(findings)} correlations distinguishable after adjustment ({n_perm} permutations, BH within each "
            f"family; {len(q) - len(findings)} circular ones apart)")


def write_connectors(params: dict, data: dict, summary: pd.DataFrame, k: int, modes: list, out: Path) -> None:
    """With connector variants in the study, each kind on its base's encoder and language model; the files exist
    either way, as dvc.yaml declares them."""
    kinds = connectors.connector_kinds(params, {m: d.geometry_metrics.get("connector") for m, d in data.items()})
    if not kinds:
        (out / "connectors.csv").write_text("base,model,kind\n")
        (out / "connectors.md").write_text("No connector variants in this study (params connectors.variants).\n")
        return
    table = connectors.connector_table(summary, kinds, k, modes)
    table.to_csv(out / "connectors.csv", index=False, float_format="%.6g")
    (out / "connectors.md").write_text(connectors.markdown(table, connectors.geometry_vs_stability(table, k, modes)))
    connectors.connector_figure(table, k, modes, out / "figures" / "connectors.png")
