"""Connector experiments in the report: connector kind against geometry and caption behaviour, on the
same base encoder and language model.

Input: the per-model summary rows the report builds (tables.summary_row: knor_pre_post@k,
recon_mse_z, post_caption_truth_exact, sensitivity_<mode>_stability_f1, ...) and which model is
which connector on which base (`connector_kinds(params)`: the connector variants of
params connectors.variants, plus each base itself with its native connector, whose kind the
extraction recorded). Output: one table
row per (base, connector) and a figure. The question per base, across its connectors: does the
one that keeps E_pre's neighbourhoods better (higher KNOR, lower reconstruction error) give more
stable captions (lower perturbation sensitivity)? With a handful of connectors the rank
correlation is descriptive, not a test; the table says n beside it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from . import figures
from .stats import spearman_permutation

def connector_kinds(params: dict, native: dict[str, str]) -> dict[str, dict]:
    """model -> {base, kind} for every connector variant in params and each of their bases; `native`: a
    base's own connector kind as its extraction recorded it (model -> kind, e.g. "mlp")."""
    variants = (params.get("connectors") or {}).get("variants") or {}
    models = params.get("models") or {}
    kinds = {}
    for name, v in variants.items():
        if name not in models:
            continue  # trained but not in the study
        base = v["base"]
        if base in models:
            kinds[base] = {"base": base, "kind": f"{native.get(base) or 'connector'} (native)"}
        kinds[name] = {"base": base, "kind": v["kind"]}
    return kinds


def columns(summary: pd.DataFrame, k: int, modes: list[str]) -> dict[str, str]:
    """summary column -> name in the connector table (those that exist in `summary`)."""
    want = {f"knor_pre_post@{k}": f"knor@{k}", f"chance@{k}": f"chance@{k}", "recon_mse_z": "recon_mse_z",
            "recon_linear_mse_z": "linear_mse_z", "recon_underfit": "underfit", "lm_error": "lm_error",
            "recon_cosine": "recon_cosine", "readability_drop_kinds": "readability_drop_kinds",
            "readability_drop_count": "readability_drop_count", "post_caption_truth_exact": "caption_exact",
            "post_caption_clipscore": "caption_clipscore"}
    for mode in modes:
        want[f"sensitivity_{mode}_stability_f1"] = f"sensitivity_{mode}"
    return {c: n for c, n in want.items() if c in summary.columns}


def connector_table(summary: pd.DataFrame, kinds: dict[str, dict], k: int, modes: list[str]) -> pd.DataFrame:
    """One row per model in `kinds` that `summary` has: base, model, kind, then KNOR@k (pre vs
    post) with chance, reconstruction error (test images; every connector with the same reconstructor
    class) beside the linear baseline and whether the reconstructor is underfit, the error that reaches
    the language model, the probes' readability drop, caption accuracy (toy truth, exact) and perturbation
    sensitivity per mode (mean drop of BERTScore F1 against the post caption over the same actual
    fraction for every connector). Rows by base, then kind as in `kinds`."""
    cols = columns(summary, k, modes)
    rows = []
    by_model = summary.set_index("model")
    for model, what in kinds.items():
        if model not in by_model.index:
            continue
        r = by_model.loc[model]
        rows.append({"base": what["base"], "model": model, "kind": what["kind"],
                     **{name: r[c] for c, name in cols.items()}})
    table = pd.DataFrame(rows)
    if len(table):
        order = list(dict.fromkeys(table["base"]))
        table = table.sort_values("base", key=lambda s: s.map(order.index), kind="stable").reset_index(drop=True)
    return table


def geometry_vs_stability(table: pd.DataFrame, k: int, modes: list[str]) -> pd.DataFrame:
    """Per base and mode, across its connectors: Spearman rho of each geometry measure with the
    perturbation sensitivity, its exact permutation p (every ordering of n connectors) and n. Read:
    rho(knor, sensitivity) < 0 and rho(recon_mse_z, sensitivity) > 0 both say that a connector that
    preserves geometry better gives steadier captions; with four connectors the smallest p is 1/12."""
    rows = []
    for base, d in table.groupby("base", sort=False):
        for mode in modes:
            y = f"sensitivity_{mode}"
            for x in (f"knor@{k}", "recon_mse_z"):
                if x not in d or y not in d:
                    continue
                pair = d[[x, y]].dropna()
                test = spearman_permutation(pair[x], pair[y], n_perm=40320)  # exact up to 8 connectors
                rows.append({"base": base, "mode": mode, "geometry": x, "rho": test["rho"], "p": test["p"],
                             "n": len(pair)})
    return pd.DataFrame(rows, columns=["base", "mode", "geometry", "rho", "p", "n"])


def answer(rho: pd.DataFrame, alpha: float = 0.05) -> str:
    """One sentence per (base, mode, geometry) in plain words; an association is named only where the exact
    p is at most `alpha`."""
    lines = []
    for r in rho.itertuples(index=False):
        if math.isnan(r.rho):
            lines.append(f"- {r.base}, {r.mode}: fewer than 3 connectors, or a constant measure: no correlation")
            continue
        head = f"- {r.base}, {r.mode}: rho({r.geometry}, sensitivity) = {r.rho:+.2f} over {r.n} connectors, exact p = {r.p:.2g}"
        if r.p > alpha:
            lines.append(f"{head}: no association shown (too few connectors to tell)")
            continue
        better = -r.rho if r.geometry.startswith("knor") else r.rho  # > 0: better geometry, steadier captions
        word = "more stable" if better > 0 else "less stable"
        lines.append(f"{head}: connectors that preserve geometry better give {word} captions")
    return "\n".join(lines) + "\n"


def connector_figure(table: pd.DataFrame, k: int, modes: list[str], path: Path) -> None:
    """Perturbation sensitivity against KNOR@k and against reconstruction error, one point per
    connector, one colour per kind, one panel per (geometry, mode)."""
    plt = figures.plt
    kinds = list(dict.fromkeys(table["kind"]))
    styles = figures.style(kinds)
    xs = ((f"knor@{k}", f"KNOR@{k}, E_pre vs E_post (fraction shared)"),
          ("recon_mse_z", "reconstruction MSE of E_pre (z-units²)"))
    fig, axes = plt.subplots(len(modes), 2, figsize=(7.5, 3 * len(modes)), squeeze=False, constrained_layout=True)
    for i, mode in enumerate(modes):
        for j, (x, label) in enumerate(xs):
            ax = axes[i, j]
            for d in table.to_dict("records"):
                colour, marker = styles[d["kind"]]
                ax.scatter(d.get(x, math.nan), d.get(f"sensitivity_{mode}", math.nan), color=colour, marker=marker,
                           s=40, label=f"{d['kind']} ({d['base']})")
            ax.set_xlabel(label)
            ax.set_ylabel(f"{mode} sensitivity (mean drop of\nBERTScore F1 vs post caption)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    axes[0, 0].legend(handles, labels, fontsize=7)
    fig.suptitle("Connector kind: geometry kept against caption stability under perturbation", fontsize=9)
    figures._save(fig, path)


def markdown(table: pd.DataFrame, rho: pd.DataFrame) -> str:
    """The report section: the table and the answer."""
    from .tables import markdown as md
    return ("# Connector experiments\n\nOne row per connector on the same base encoder and language model "
            "(the base's own row is its native connector), every one reconstructed by the same reconstructor class. "
            "recon_mse_z and linear_mse_z: test images; underfit: the learned reconstructor loses to the "
            "token-level linear one (the 95% bootstrap interval of the margin lies below 0). Sensitivity: mean drop of BERTScore F1 against the post caption over the same "
            "actual fraction [0, F] for every connector (lower = steadier).\n\n" + md(table) +
            "\n## Does a connector that preserves geometry better give more stable captions?\n\n" + answer(rho))
