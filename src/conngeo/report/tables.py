"""The report's tables, built from the upstream stages' files: per-image geometry change and caption
instability, the question (their rank correlations), the per-model summary and the perturbation curves.

Inputs live under one root in the pipeline's layout (the project itself, or a committed sample of it):

    data/knn/<model>/per_image.csv            knor_pre_post@k, erank_pre, erank_post, ...
    metrics/knn/<model>.json                  dataset KNOR per pair and k, chance levels, spectra
    data/recon_eval/<model>/per_image.csv     split, mse_z, cosine, ...   (+ patch_loss.csv)
    metrics/recon_eval/<model>.json           validation means and baselines
    data/scores/<model>/{post,recon}.csv      per caption: clipscore, bertscore_f1, stability_f1, truth_*
    data/scores/<model>/summary.csv           one row per caption set (post, recon, <mode>_<level>): the means

Every measure is oriented so that larger = more change (geometry) or more instability (captions):
a positive correlation then reads "images whose representation changes more get less stable captions".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .stats import spearman_ci

# name -> (what it is, unit); the columns of per_image() besides stem and split
GEOMETRY = {
    "knor_change": ("1 - KNOR@k of the image's pre/post neighbourhoods", "fraction"),
    "recon_mse": ("reconstruction MSE of E_pre from E_post", "z-units²"),
    "recon_cosine_loss": ("1 - cosine(reconstructed E_pre, E_pre), mean over tokens", "1 - cos"),
    "erank_drop": ("effective rank of E_pre minus that of E_post (token matrices; signed)", "erank"),
}
INSTABILITY = {
    "bertscore_instability": ("1 - BERTScore F1 of the recon caption against the post caption", "1 - F1"),
    "clipscore_drop": ("CLIPScore of the post caption minus that of the recon caption", "CLIPScore"),
    "attribute_error_change": ("toy-world attributes (kinds, counts, colours) wrong in the recon caption "
                               "minus those wrong in the post caption", "attributes"),
}
TRUTH_ATTRIBUTES = ("truth_kinds", "truth_counts", "truth_colours")


@dataclass
class ModelInputs:
    """Everything the report reads for one model."""
    name: str
    knn: pd.DataFrame
    knn_metrics: dict
    recon: pd.DataFrame
    recon_metrics: dict
    patch_loss: pd.DataFrame | None
    scores: dict[str, pd.DataFrame]     # "post", "recon" -> per-caption scores
    score_summary: pd.DataFrame         # one row per caption set


def _missing(path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{path}: not found; run the stage that writes it (`dvc repro`), or point --inputs "
                             "at a folder in the pipeline's layout")


def _csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise _missing(path)
    return pd.read_csv(path)


def _json(path: Path) -> dict:
    if not path.is_file():
        raise _missing(path)
    return json.loads(path.read_text())


def load_model(root: Path, model: str) -> ModelInputs:
    """Read one model's upstream outputs under `root` (layout in the module docstring)."""
    root = Path(root)
    patch = root / "data/recon_eval" / model / "patch_loss.csv"
    return ModelInputs(
        name=model,
        knn=_csv(root / "data/knn" / model / "per_image.csv"),
        knn_metrics=_json(root / "metrics/knn" / f"{model}.json"),
        recon=_csv(root / "data/recon_eval" / model / "per_image.csv"),
        recon_metrics=_json(root / "metrics/recon_eval" / f"{model}.json"),
        patch_loss=pd.read_csv(patch) if patch.is_file() else None,
        scores={s: _csv(root / "data/scores" / model / f"{s}.csv") for s in ("post", "recon")},
        score_summary=_csv(root / "data/scores" / model / "summary.csv"),
    )


def column(table: pd.DataFrame, name: str) -> pd.Series:
    """`table[name]`, or NaN throughout where the column is absent (toy truth in a study of natural images)."""
    return table[name] if name in table else pd.Series(np.nan, index=table.index)


def attribute_errors(scores: pd.DataFrame) -> pd.Series:
    """Toy-world attributes (of kinds, counts, colours) a caption gets wrong; NaN where the reference
    is not a toy-world caption or the study has no toy truth."""
    return sum(1.0 - column(scores, c) for c in TRUTH_ATTRIBUTES)


def per_image(m: ModelInputs, k: int) -> pd.DataFrame:
    """One row per image, in the knn table's order: stem, split, GEOMETRY and INSTABILITY columns, plus
    erank_post and the post caption's clipscore (for the effective-rank figure). Every input must cover
    the same images: a mismatch means a stale upstream output, and no image is dropped silently."""
    knn = m.knn.set_index("stem")
    recon = m.recon.set_index("stem")
    post = m.scores["post"].set_index("stem")
    rec = m.scores["recon"].set_index("stem")
    stems = list(knn.index)
    for name, table in (("recon_eval", recon), ("scores post", post), ("scores recon", rec)):
        if set(table.index) != set(stems):
            raise ValueError(f"{m.name}: {name} covers {len(table)} images, knn {len(stems)}, not the same ones; "
                             "rerun the stale upstream stages (`dvc repro`)")
    recon, post, rec = recon.loc[stems], post.loc[stems], rec.loc[stems]
    return pd.DataFrame({
        "stem": stems,
        "split": recon["split"].to_numpy(),
        "knor_change": 1.0 - knn[f"knor_pre_post@{k}"].to_numpy(),
        "recon_mse": recon["mse_z"].to_numpy(),
        "recon_cosine_loss": 1.0 - recon["cosine"].to_numpy(),
        "erank_drop": (knn["erank_pre"] - knn["erank_post"]).to_numpy(),
        "bertscore_instability": 1.0 - rec["stability_f1"].to_numpy(),
        "clipscore_drop": (post["clipscore"] - rec["clipscore"]).to_numpy(),
        "attribute_error_change": (attribute_errors(rec) - attribute_errors(post)).to_numpy(),
        "erank_post": knn["erank_post"].to_numpy(),
        "clipscore_post": post["clipscore"].to_numpy(),
    })


def question(tables: dict[str, pd.DataFrame], n_boot: int, seed: int, split: str | None = "val") -> pd.DataFrame:
    """Spearman rho, its bootstrap CI and p-value for every (model, geometry, instability) triple,
    over the images of `split` (None: all images). Each pair gets the same seed, so its resamples
    are the same images wherever both measures are defined."""
    rows = []
    for model, table in tables.items():
        if split is not None:
            table = table[table["split"] == split]
        for g in GEOMETRY:
            for c in INSTABILITY:
                r = spearman_ci(table[g].to_numpy(float), table[c].to_numpy(float), n_boot=n_boot, seed=seed)
                rows.append({"model": model, "geometry": g, "instability": c, **r})
    return pd.DataFrame(rows)


def verdict(row) -> str:
    """One sentence on one correlation, never without its interval."""
    if math.isnan(row["rho"]):
        return "undefined (a measure is constant over these images)"
    if math.isnan(row["low"]):
        return f"rho {row['rho']:+.3f} (no bootstrap interval)"
    ci = f"rho {row['rho']:+.3f}, 95% CI [{row['low']:+.3f}, {row['high']:+.3f}], p = {row['p']:.2g}, n = {row['n']}"
    return f"{ci}: {'distinguishable from zero' if row['distinct'] else 'not distinguishable from zero'}"


def question_text(q: pd.DataFrame, split: str | None, n_boot: int, k: int) -> str:
    """The generated answer: per model, which correlations are distinguishable from zero (the 95%
    bootstrap interval excludes 0) and which are not, each with its interval."""
    lines = ["# Does geometry change predict caption instability?", "",
             f"Spearman rank correlation per image ({'images of split ' + split if split else 'all images'}), "
             f"95% percentile bootstrap intervals over images ({n_boot} resamples), p-values from the "
             "t-approximation. A correlation is *distinguishable from zero* when its interval excludes 0. "
             f"Positive rho: images whose representation changes more get less stable captions. KNOR at k = {k}.", ""]
    for model, rows in q.groupby("model", sort=False):
        distinct = rows[rows["distinct"]]
        defined = int(rows["rho"].notna().sum())
        lines += [f"## {model}", "",
                  f"{len(distinct)} of {len(rows)} correlations are distinguishable from zero"
                  f" ({defined} defined; with no association at all, about {0.05 * defined:.1f} of {defined} "
                  "would exclude 0 by chance, since the intervals are not corrected for multiple comparisons)."
                  + ("" if len(distinct) else " None of the geometry measures predicts caption instability here."),
                  ""]
        for _, row in rows.iterrows():
            lines.append(f"- {row['geometry']} vs {row['instability']}: {verdict(row)}")
        lines.append("")
    lines += ["## Measures", ""] + [f"- `{k}`: {d} ({u})" for k, (d, u) in {**GEOMETRY, **INSTABILITY}.items()]
    return "\n".join(lines) + "\n"


def curves(summaries: dict[str, pd.DataFrame], modes: list[str], levels: list,
           scores=("clipscore", "stability_f1", "truth_exact")) -> pd.DataFrame:
    """Score against perturbation level per model and mode (long: model, mode, level, <scores>).
    Level 0 is the unperturbed post caption (perturbations at level 0 return E_post exactly), whose
    stability against itself is 1 by definition."""
    rows = []
    for model, s in summaries.items():
        s = s.set_index("set")
        missing = [f"{m}_{lv}" for m in modes for lv in levels if f"{m}_{lv}" not in s.index]
        if missing:
            raise ValueError(f"{model}: the score summary has no caption set {missing[:3]}; rerun "
                             f"`dvc repro score@{model}` after the perturb stages of these levels")
        for mode in modes:
            post = s.loc["post"]
            rows.append({"model": model, "mode": mode, "level": 0.0,
                         **{c: (1.0 if c.startswith("stability") else float(post.get(c, np.nan))) for c in scores}})
            for level in levels:
                row = s.loc[f"{mode}_{level}"]
                rows.append({"model": model, "mode": mode, "level": float(level),
                             **{c: float(row.get(c, np.nan)) for c in scores}})
    return pd.DataFrame(rows)


def sensitivity(curve: pd.DataFrame, score: str) -> float:
    """Perturbation sensitivity: the area between the unperturbed score and the score-vs-level curve,
    per unit level, (1/L) * integral_0^L (s(0) - s(l)) dl by the trapezoid rule over the measured
    levels (L the largest). 0: no effect; it is the mean drop of the score over [0, L]."""
    c = curve.sort_values("level")
    level, s = c["level"].to_numpy(float), c[score].to_numpy(float)
    if len(level) < 2 or level[-1] <= 0:
        return math.nan
    drop = s[0] - s
    return float(np.sum((drop[1:] + drop[:-1]) / 2 * np.diff(level)) / level[-1])


def knor_table(m: ModelInputs) -> pd.DataFrame:
    """Dataset KNOR per pair and k with its chance level (long: model, pair, k, knor, chance)."""
    rows = []
    for pair, entry in m.knn_metrics["pairs"].items():
        for k in m.knn_metrics["ks"]:
            rows.append({"model": m.name, "pair": pair, "k": k, "knor": entry[f"knor@{k}"],
                         "chance": entry[f"chance@{k}"]})
    return pd.DataFrame(rows)


def summary_row(m: ModelInputs, curve: pd.DataFrame, modes: list[str]) -> dict:
    """One model's line of the summary table (the quantities in README's Report section)."""
    row = {"model": m.name, "images": m.knn_metrics["images"]}
    for _, r in knor_table(m).iterrows():
        row[f"knor_{r['pair']}@{r['k']}"] = r["knor"]
    for k in m.knn_metrics["ks"]:
        row[f"chance@{k}"] = m.knn_metrics["pairs"]["pre_post"][f"chance@{k}"]
    spectra = m.knn_metrics.get("spectra", {})
    for key in ("erank_pre_mean", "erank_post_mean", "erank_pre_dataset", "erank_post_dataset"):
        row[key] = spectra.get(key, math.nan)
    val = m.recon_metrics["val"]
    for key in ("mse_z", "mean_mse_z", "pooled_mse_z", "ridge_pooled_mse_z", "cosine", "mean_cosine",
                "pooled_cosine", "ridge_pooled_cosine"):
        row[f"recon_{key}"] = val[key]
    row["recon_beats_mean"] = m.recon_metrics["beats_mean_baseline"]
    row["recon_beats_ridge"] = m.recon_metrics["beats_ridge_baseline"]
    s = m.score_summary.set_index("set")
    for name in ("post", "recon"):
        for key in ("clipscore", "refclipscore", "bertscore_f1", "truth_exact"):
            row[f"{name}_caption_{key}"] = float(s.loc[name].get(key, np.nan))
    row["recon_caption_stability_f1"] = float(s.loc["recon", "stability_f1"])
    row["recon_caption_same_as_post"] = float(s.loc["recon", "same_as_post"])
    for mode in modes:
        c = curve[(curve["model"] == m.name) & (curve["mode"] == mode)]
        for score in ("clipscore", "stability_f1"):
            row[f"sensitivity_{mode}_{score}"] = sensitivity(c, score)
    return row


def caption_means(m: ModelInputs, scores=("clipscore", "bertscore_f1", "truth_exact")) -> pd.DataFrame:
    """Mean of each caption score for the post and recon sets with a normal 95% interval
    (mean +- 1.96 standard errors over images; long: model, set, score, mean, low, high, n)."""
    rows = []
    for name in ("post", "recon"):
        for score in scores:
            v = column(m.scores[name], score).to_numpy(float)
            v = v[np.isfinite(v)]
            mean = float(v.mean()) if len(v) else math.nan
            half = 1.96 * float(v.std(ddof=1)) / math.sqrt(len(v)) if len(v) > 1 else math.nan
            rows.append({"model": m.name, "set": name, "score": score, "mean": mean, "low": mean - half,
                         "high": mean + half, "n": len(v)})
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub markdown table of `df` (numbers to `digits` significant digits)."""
    def cell(v):
        if isinstance(v, (bool, np.bool_)):
            return "yes" if v else "no"
        if isinstance(v, (float, np.floating)):
            return "" if math.isnan(v) else f"{v:.{digits}g}"
        return str(v)
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    return "\n".join([head, rule] + ["| " + " | ".join(cell(v) for v in row) + " |"
                                     for row in df.itertuples(index=False)]) + "\n"
