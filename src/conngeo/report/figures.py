"""The report's figures: each takes plain tables (pandas, as conngeo.report.tables builds them) and
writes one PNG. Okabe-Ito colours per model (distinguishable with every common colour-vision
deficiency), markers as a second cue, labelled axes with units, Agg backend (files only)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LABELS = {
    "clipscore": "CLIPScore (0-2.5)",
    "bertscore_f1": "BERTScore F1 vs reference",
    "truth_exact": "exact toy-world caption (fraction)",
    "stability_f1": "BERTScore F1 vs post caption",
}
DPI = 150


def style(models) -> dict:
    """model -> (colour, marker), stable in the order given."""
    return {m: (OKABE_ITO[i % len(OKABE_ITO)], MARKERS[i % len(MARKERS)]) for i, m in enumerate(models)}


def _save(fig, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # fixed metadata so the same tables give byte-identical files
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    plt.close(fig)


def caption_scores(means: pd.DataFrame, path: Path) -> None:
    """Grouped bars: each caption score for the post and the recon caption, per model, with the 95%
    interval of the mean (means: model, set, score, mean, low, high, n)."""
    scores = list(dict.fromkeys(means["score"]))
    models = list(dict.fromkeys(means["model"]))
    fig, axes = plt.subplots(1, len(scores), figsize=(3.4 * len(scores), 3.2), squeeze=False, constrained_layout=True)
    x = np.arange(len(models))
    for ax, score in zip(axes[0], scores):
        for j, (name, colour, hatch, label) in enumerate((
                ("post", OKABE_ITO[0], "", "post: from E_post"),
                ("recon", OKABE_ITO[1], "//", "recon: from connector(reconstructed E_pre), test images"))):
            d = means[(means["score"] == score) & (means["set"] == name)].set_index("model").reindex(models)
            err = np.vstack([d["mean"] - d["low"], d["high"] - d["mean"]])
            ax.bar(x + (j - 0.5) * 0.38, d["mean"], width=0.38, color=colour, hatch=hatch, edgecolor="black",
                   linewidth=0.5, yerr=np.nan_to_num(err), capsize=2, label=label)
        s = means[means["score"] == score]
        if (s["low"].fillna(0) >= 0).all():  # scores >= 0 start at 0 (rescaled BERTScore can be < 0)
            ax.set_ylim(0, max(float(s["high"].max()) * 1.1, 1e-3) if s["high"].notna().any() else 1)
        ax.set_xticks(x, models, rotation=20, fontsize=8)
        ax.set_xlabel("model")
        ax.set_ylabel(LABELS.get(score, score))
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Caption scores of the post (all images) and recon (test images) captions per model; bars: mean, "
                 "whiskers: 95% interval of the mean", fontsize=9)
    _save(fig, path)


def _scatter_by_model(ax, table, x, y, styles):
    for model, d in table.groupby("model", sort=False):
        colour, marker = styles[model]
        ax.scatter(d[x], d[y], s=12, color=colour, marker=marker, alpha=0.7, linewidths=0, label=model)


def score_vs_error(table: pd.DataFrame, path: Path, which: str = "") -> None:
    """Per image: caption instability against the reconstruction error in E_pre and against the error that
    reaches the language model, one colour per model (table: model, recon_mse, lm_error,
    bertscore_instability, clipscore_drop; `which` names the images in the title)."""
    styles = style(dict.fromkeys(table["model"]))
    xs = (("recon_mse", "reconstruction MSE of E_pre (z-units²)"),
          ("lm_error", "MSE of connector(recon E_pre) vs E_post (z-units²)"))
    ys = (("bertscore_instability", "1 - BERTScore F1\n(recon vs post caption)"),
          ("clipscore_drop", "CLIPScore drop\n(post - recon)"))
    fig, axes = plt.subplots(2, 2, figsize=(8, 6), constrained_layout=True)
    for i, (y, ylabel) in enumerate(ys):
        for j, (x, xlabel) in enumerate(xs):
            ax = axes[i, j]
            _scatter_by_model(ax, table, x, y, styles)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
    axes[0, 0].legend(fontsize=7, markerscale=1.5)
    fig.suptitle(f"Caption instability against reconstruction error, one point per image{which}", fontsize=9)
    _save(fig, path)


def knor(table: pd.DataFrame, path: Path) -> None:
    """KNOR against k per model, one panel per pair of spaces, chance k/(N-1) dashed
    (table: model, pair, k, knor, chance)."""
    pairs = list(dict.fromkeys(table["pair"]))
    styles = style(dict.fromkeys(table["model"]))
    cols = min(len(pairs), 4)
    rows = -(-len(pairs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.7 * rows), squeeze=False, sharey=True,
                             constrained_layout=True)
    for i, (ax, pair) in enumerate(zip(axes.flat, pairs)):
        d = table[table["pair"] == pair]
        for model, dm in d.groupby("model", sort=False):
            colour, marker = styles[model]
            ax.plot(dm["k"], dm["knor"], color=colour, marker=marker, markersize=4, label=model)
            ax.plot(dm["k"], dm["chance"], color=colour, linestyle=":", linewidth=1)
        ax.set_title(pair.replace("_", " vs "), fontsize=9)
        ax.set_xlabel("k (neighbours)")
        if i % cols == 0:
            ax.set_ylabel("KNOR@k (fraction shared)")
        ax.set_ylim(0, 1.02)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    axes.flat[0].plot([], [], color="grey", linestyle=":", label="chance k/(N-1)")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("kNN overlap (KNOR) per model and k; dotted: chance level", fontsize=9)
    _save(fig, path)


def erank_clipscore(table: pd.DataFrame, path: Path, which: str = "") -> None:
    """Per image: CLIPScore of the post caption against the effective rank of E_post
    (table: model, erank_post, clipscore_post; `which` names the images in the title)."""
    styles = style(dict.fromkeys(table["model"]))
    fig, ax = plt.subplots(figsize=(4.6, 3.4), constrained_layout=True)
    _scatter_by_model(ax, table, "erank_post", "clipscore_post", styles)
    ax.set_xlabel("effective rank of E_post (Roy & Vetterli; tokens x d matrix)")
    ax.set_ylabel(LABELS["clipscore"])
    ax.legend(fontsize=7, markerscale=1.5)
    ax.set_title(f"CLIPScore of the post caption against effective rank,\none point per image{which}", fontsize=9)
    _save(fig, path)


def perturbation(curves: pd.DataFrame, mode: str, path: Path, upto: float,
                 scores=("clipscore", "stability_f1")) -> None:
    """Score against the actual fraction changed, one line per model, the common fraction `upto` dotted
    (curves: model, mode, fraction, <scores>; one point per distinct fraction)."""
    d = curves[curves["mode"] == mode]
    styles = style(dict.fromkeys(d["model"]))
    what = {"mask": "fraction of E_post tokens masked", "lowrank": "fraction of singular directions removed"}
    fig, axes = plt.subplots(1, len(scores), figsize=(3.8 * len(scores), 3.2), squeeze=False, constrained_layout=True)
    for ax, score in zip(axes[0], scores):
        for model, dm in d.groupby("model", sort=False):
            colour, marker = styles[model]
            dm = dm.sort_values("fraction")
            ax.plot(dm["fraction"], dm[score], color=colour, marker=marker, markersize=4, label=model)
        ax.axvline(upto, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(f"actual {what.get(mode, mode)}")
        ax.set_ylabel(LABELS.get(score, score))
    axes[0][0].plot([], [], color="grey", linestyle=":", label=f"compared up to {upto:.3g}")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Caption scores under {mode} perturbation of E_post, on the fraction each image actually had "
                 "changed (0: unperturbed)", fontsize=9)
    _save(fig, path)


def patch_loss(table: pd.DataFrame, path: Path) -> None:
    """Per-patch reconstruction error maps, one row per model: the validation mean, then images from
    best to worst (table: model, image, row, col, mse_z); one shared colour scale (viridis)."""
    models = list(dict.fromkeys(table["model"]))
    width = max(table[table["model"] == m]["image"].nunique() for m in models) if models else 1
    fig, axes = plt.subplots(max(len(models), 1), width, figsize=(2.1 * width + 1.2, 2.1 * max(len(models), 1)),
                             squeeze=False, constrained_layout=True)
    vmax = float(table["mse_z"].max()) if len(table) else 1.0
    image = None
    for ax in axes.flat:
        ax.axis("off")
    for r, model in enumerate(models):
        d = table[table["model"] == model]
        for c, name in enumerate(dict.fromkeys(d["image"])):
            di = d[d["image"] == name]
            grid = np.full((di["row"].max() + 1, di["col"].max() + 1), np.nan)
            grid[di["row"], di["col"]] = di["mse_z"]
            ax = axes[r][c]
            ax.axis("on")
            image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_title(f"{model}: {'mean of val' if name == 'val_mean' else name}", fontsize=7)
            ax.set_xlabel("patch column", fontsize=7)
            ax.set_ylabel("patch row", fontsize=7)
            ax.tick_params(labelsize=6)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="reconstruction MSE per patch (z-units²)")
    else:
        fig.text(0.5, 0.5, "no model has a square patch grid: no patch-loss maps", ha="center", fontsize=9)
    fig.suptitle("Where E_pre is hard to recover: per-patch error, validation images (best to worst)", fontsize=9)
    _save(fig, path)


def question_heatmap(q: pd.DataFrame, path: Path, title: str) -> None:
    """Adjusted Spearman rho of each geometry measure (rows) with each instability measure (columns), one
    panel per model; each cell shows rho, its bootstrap interval and the verdict: bold where
    distinguishable (stratified permutation test, BH q, drop-one check), "one image" where it rests on one
    image; circular rows are labelled (q: model, family, geometry, instability, rho, low, high, verdict).
    Diverging PuOr, fixed to [-1, 1]."""
    models = list(dict.fromkeys(q["model"]))
    geometry = list(dict.fromkeys(q["geometry"]))
    instability = list(dict.fromkeys(q["instability"]))
    cols = min(len(models), 4)
    rows = -(-len(models) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols + 1.5, (0.75 * len(geometry) + 1.6) * rows + 0.6),
                             squeeze=False, constrained_layout=True)
    image = None
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    for i, (ax, model) in enumerate(zip(axes.flat, models)):
        d = q[q["model"] == model].set_index(["geometry", "instability"])
        rho = np.array([[d.loc[(g, c), "rho"] for c in instability] for g in geometry], dtype=float)
        image = ax.imshow(np.ma.masked_invalid(rho), cmap="PuOr", vmin=-1, vmax=1, aspect="auto")
        for a, g in enumerate(geometry):
            for b, c in enumerate(instability):
                r = d.loc[(g, c)]
                if np.isnan(r["rho"]):
                    text = "n/a"
                else:
                    text = f"{r['rho']:+.2f}\n[{r['low']:+.2f}, {r['high']:+.2f}]"
                    if r["verdict"] == "rests on one image":
                        text += "\none image"
                ax.text(b, a, text, ha="center", va="center", fontsize=6.5,
                        color="white" if abs(r["rho"]) > 0.6 else "black",  # legible on the dark ends
                        fontweight="bold" if r["verdict"] == "distinguishable" else "normal")
        ax.set_xticks(range(len(instability)), [c.replace("_", "\n") for c in instability], fontsize=7)
        circular = set(q.loc[q["family"] == "circular", "geometry"])
        labels = [f"{g} (circular)" if g in circular else g for g in geometry]
        ax.set_yticks(range(len(geometry)), labels if i % cols == 0 else [""] * len(geometry), fontsize=7)
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("caption instability", fontsize=8)
        if i % cols == 0:
            ax.set_ylabel("geometry change", fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="Spearman rho (per image)")
    fig.suptitle(f"{title}: rho adjusted for what the image shows [95% stratified bootstrap CI]; bold: "
                 "distinguishable (stratified permutation test, BH q <= 0.05, no single image carries it)", fontsize=9)
    _save(fig, path)


def probes(table: pd.DataFrame, path: Path) -> None:
    """Readability per target: the linear probes' scores from E_pre and E_post of each model as bars with their
    spread over the fold seeds (1 sd), each reference space as a marker, chance as a line (table: tables.probe_table)."""
    from .tables import PROBE_COLUMNS

    models = list(dict.fromkeys(table["model"]))
    targets = list(dict.fromkeys(table["target"]))
    refs = [c for c in table.columns if c not in PROBE_COLUMNS]
    fig, axes = plt.subplots(len(models), 1, figsize=(max(6.0, 0.55 * len(targets) + 2), 2.4 * len(models)),
                             squeeze=False, constrained_layout=True)
    x = np.arange(len(targets))
    for ax, model in zip(axes[:, 0], models):
        d = table[table["model"] == model].set_index("target").reindex(targets)
        ax.bar(x - 0.2, d["pre"], width=0.4, yerr=d["pre_sd"], color=OKABE_ITO[0], edgecolor="black", linewidth=0.5,
               error_kw={"elinewidth": 0.8}, label="E_pre")
        ax.bar(x + 0.2, d["post"], width=0.4, yerr=d["post_sd"], color=OKABE_ITO[1], edgecolor="black", linewidth=0.5,
               hatch="//", error_kw={"elinewidth": 0.8}, label="E_post")
        ax.scatter(x, d["chance"], marker="_", s=300, color="black", label="chance", zorder=3)
        for j, ref in enumerate(refs):
            ax.scatter(x, d[ref], marker=MARKERS[(j + 1) % len(MARKERS)], s=18, color=OKABE_ITO[(j + 2) % 8],
                       label=f"reference {ref}", zorder=3)
        ax.set_xticks(x, targets, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(f"{model}\nheld-out score", fontsize=8)
        ax.set_ylim(min(0.0, float(np.nanmin(d[["pre", "post"]].to_numpy(float), initial=0.0))), 1.02)
    axes[0, 0].legend(fontsize=7, ncol=3)
    fig.suptitle("How readable the ground truth is: linear probes (balanced accuracy for classes, R² for counts), "
                 "cross-validated, mean and sd over the fold seeds", fontsize=9)
    _save(fig, path)
