"""The report's tables, built from the upstream stages' files: the per-image measures, the two questions
(their rank correlations, with permutation verdicts), the per-model summary, the perturbation curves on
the actual fraction changed, and the probes.

Inputs live under one root in the pipeline's layout (the project itself, or a committed sample of it):

    data/geometry/<model>/per_image.csv       knor_pre_post@k, distortion@k, erank_pre, erank_post, ...
    data/geometry/<model>/probes.csv          linear probes of the ground truth from pooled E_pre / E_post
    metrics/geometry/<model>.json             dataset KNOR per pair and k, chance levels, spectra
    data/recon_eval/<model>/per_image.csv     split, mse_z, cosine, linear_mse_z, ...   (+ patch_loss.csv)
    metrics/recon_eval/<model>.json           the means per split and the baselines' verdicts
    data/captions/<model>/captions.csv        recon_post_mse_z: the error that reaches the language model
    data/scores/<model>/<set>.csv             per caption: clipscore, bertscore_f1, stability_f1, truth_*;
                                              the perturbation sets also the image's actual fraction changed
    data/refs/<space>/probes.csv              the probes of each reference space

Every measure is one entry of `measures()` (name, kind, the questions it enters, description, unit, and how it
is computed from a model's tables), oriented so that larger = more change (geometry) or more instability
(captions): a positive correlation then reads "images whose representation changes more get less stable
captions". The report's per-image series, both questions, the summary and the figures all come from it:
a new measure is one entry.

The two questions:
  reconstruction  geometry change, the reconstruction errors included, against the instability of the
                  caption generated from connector(reconstructed E_pre), on the test images (never trained
                  or selected on); the errors are a mechanical cause of that instability, so this question
                  alone is circular, hence
  perturbation    geometry change that involves no reconstructor (1 - KNOR, erank drop, the connector's
                  local distortion) against how unstable the image's caption is under controlled
                  perturbations of E_post, on all images.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import layout
from .examples import anchor
from .stats import (bh_cutoff, bh_qvalues, changed_count, spearman_ci, spearman_permutation, strata_ids,
                    verdict_rule, weakest_drop)

QUESTIONS = {"reconstruction": "test", "perturbation": None}  # question -> the split it is asked on (None: all)
TRUTH_ATTRIBUTES = ("truth_kinds", "truth_counts", "truth_colours")
FAMILIES = ("finding", "circular")  # a circular correlation never counts as a finding (Measure.circular)


@dataclass
class ModelInputs:
    """Everything the report reads for one model."""
    name: str
    geometry: pd.DataFrame
    geometry_metrics: dict
    probes: pd.DataFrame
    recon: pd.DataFrame
    recon_metrics: dict
    patch_loss: pd.DataFrame | None
    captions: pd.DataFrame
    scores: dict[str, pd.DataFrame]     # "post", "recon", "<mode>_<level>" -> per-caption scores, by stem
    score_summary: pd.DataFrame         # one row per caption set


def _missing(path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{path}: not found; run the stage that writes it (`dvc repro`), or point --inputs "
                             "at a folder in the pipeline's layout")


def read_csv(path: Path, index: str | None = "stem") -> pd.DataFrame:
    if not path.is_file():
        raise _missing(path)
    table = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"stem": str})
    return table.set_index(index) if index else table


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise _missing(path)
    return json.loads(path.read_text())


def load_model(root: Path, model: str, sets: list[str]) -> ModelInputs:
    """Read one model's upstream outputs under `root` (layout in the module docstring); `sets`: the
    caption sets to read besides post and recon (the perturbations, "<mode>_<level>")."""
    root = Path(root)
    patch = layout.data("recon_eval", model, root) / "patch_loss.csv"
    return ModelInputs(
        name=model,
        geometry=read_csv(layout.data("geometry", model, root) / "per_image.csv"),
        geometry_metrics=read_json(layout.details("geometry", model, root)),
        probes=read_csv(layout.data("geometry", model, root) / "probes.csv", index=None),
        recon=read_csv(layout.data("recon_eval", model, root) / "per_image.csv"),
        recon_metrics=read_json(layout.details("recon_eval", model, root)),
        patch_loss=read_csv(patch, index=None) if patch.is_file() else None,
        captions=read_csv(layout.data("captions", model, root) / "captions.csv"),
        scores={s: read_csv(layout.data("scores", model, root) / f"{s}.csv") for s in ("post", "recon", *sets)},
        score_summary=read_csv(layout.data("scores", model, root) / "summary.csv", index=None),
    )


def column(table: pd.DataFrame, name: str) -> pd.Series:
    """`table[name]`, or NaN throughout where the column is absent (toy truth in a study of natural images)."""
    return table[name] if name in table else pd.Series(np.nan, index=table.index)


def attribute_errors(scores: pd.DataFrame) -> pd.Series:
    """Toy-world attributes (of kinds, counts, colours) a caption gets wrong; NaN where the reference
    is not a toy-world caption or the study has no toy truth."""
    return sum(1.0 - column(scores, c) for c in TRUTH_ATTRIBUTES)


# -- perturbations on the actual fraction -----------------------------------------------------------------

def fraction_curve(fractions, scores, start: float) -> tuple[np.ndarray, np.ndarray]:
    """(fraction, score) points of one image or one mean curve: (0, `start`) then the measured points in
    order of the actual fraction; levels that changed the same fraction (the same perturbation) are one
    point, their scores averaged."""
    return fraction_curves(pd.DataFrame([list(fractions)]), pd.DataFrame([list(scores)]), start)[0]


def fraction_curves(fractions: pd.DataFrame, scores: pd.DataFrame, start: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """`fraction_curve` of every row (image) of two [images x levels] frames, in row order: one groupby for
    all rows, not one per row."""
    f, s = fractions.to_numpy(float), scores.to_numpy(float)
    rows = np.repeat(np.arange(len(f)), f.shape[1])
    f, s = f.ravel(), s.ravel()
    keep = np.isfinite(f) & np.isfinite(s)
    points = pd.DataFrame({"row": rows[keep], "f": np.round(f[keep], 9), "s": s[keep]}).groupby(
        ["row", "f"], sort=True)["s"].mean()
    points = points[points.index.get_level_values("f") > 0]
    row, at, value = (points.index.get_level_values("row").to_numpy(),
                      points.index.get_level_values("f").to_numpy(), points.to_numpy())
    bounds = np.searchsorted(row, np.arange(len(fractions) + 1))
    return [(np.concatenate([[0.0], at[a:b]]), np.concatenate([[start], value[a:b]]))
            for a, b in zip(bounds[:-1], bounds[1:])]


def area_drop(f: np.ndarray, s: np.ndarray, upto: float) -> float:
    """(1/F) * integral_0^F (s(0) - s(f)) df of the piecewise-linear curve through (f, s), F = `upto`: the
    mean drop of the score over the actual fraction [0, F]; NaN where the curve does not reach F."""
    if len(f) < 2 or f[-1] < upto - 1e-9 or upto <= 0:
        return math.nan
    grid = np.union1d(f[f < upto], [upto])
    drop = s[0] - np.interp(grid, f, s)
    return float(np.sum((drop[1:] + drop[:-1]) / 2 * np.diff(grid)) / upto)


def perturbation_frame(m: ModelInputs, mode: str, levels: list, score: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(fraction [images x levels], score [images x levels]) of one model and mode, by stem."""
    fractions = pd.concat({lv: m.scores[f"{mode}_{lv}"]["fraction"] for lv in levels}, axis=1)
    scores = pd.concat({lv: m.scores[f"{mode}_{lv}"][score] for lv in levels}, axis=1)
    return fractions, scores


def image_instability(m: ModelInputs, mode: str, levels: list, upto: float) -> pd.Series:
    """Per image: the mean of 1 - BERTScore F1 (vs its post caption) over the actual fraction [0, upto]
    of `mode`'s perturbations (fraction_curves, area_drop with s(0) = 1: the unperturbed caption)."""
    fractions, scores = perturbation_frame(m, mode, levels, "stability_f1")
    curves = fraction_curves(fractions, scores.loc[fractions.index, fractions.columns], 1.0)
    return pd.Series([area_drop(f, s, upto) for f, s in curves], index=fractions.index)


def image_dose(m: ModelInputs, mode: str, levels: list, upto: float) -> pd.Series:
    """Per image: the mean over the actual fraction [0, upto] of the share of E_post's energy the
    perturbation moved (relative_change = ||E_post - perturbed||^2 / ||E_post||^2, 0 at fraction 0).
    The fraction counts tokens or directions; how much of the image's E_post they carry differs per image."""
    fractions, change = perturbation_frame(m, mode, levels, "relative_change")
    curves = fraction_curves(fractions, change.loc[fractions.index, fractions.columns], 0.0)
    return pd.Series([-area_drop(f, s, upto) for f, s in curves], index=fractions.index)


def common_fraction(data: dict[str, ModelInputs], mode: str, levels: list, cap: float) -> float:
    """The largest actual fraction every image of every model reaches in `mode`, at most `cap`: where
    models (and connectors) are compared at matched fractions."""
    reach = [max(float(m.scores[f"{mode}_{lv}"]["fraction"].min()) for lv in levels) for m in data.values()]
    return float(min([cap, *reach]))


def curves(data: dict[str, ModelInputs], modes: list, levels: list,
           scores=("clipscore", "stability_f1", "truth_exact")) -> pd.DataFrame:
    """Mean score against the actual fraction changed, per model and mode (long: model, mode, fraction,
    levels, <scores>): (0, the post caption's score; stability 1 by definition), then one row per distinct
    actual fraction (the nominal levels that changed it are listed; duplicates are one row)."""
    rows = []
    for model, m in data.items():
        for mode in modes:
            post = m.scores["post"]
            rows.append({"model": model, "mode": mode, "fraction": 0.0, "levels": "0",
                         **{c: (1.0 if c == "stability_f1" else float(column(post, c).mean())) for c in scores}})
            by_fraction: dict[float, list] = {}
            for lv in levels:
                by_fraction.setdefault(round(float(m.scores[f"{mode}_{lv}"]["fraction"].mean()), 9), []).append(lv)
            for f, lvs in sorted(by_fraction.items()):
                rows.append({"model": model, "mode": mode, "fraction": f, "levels": " ".join(map(str, lvs)),
                             **{c: float(pd.Series([column(m.scores[f"{mode}_{lv}"], c).mean() for lv in lvs]).mean())
                                for c in scores}})
    return pd.DataFrame(rows)


def sensitivity(curve: pd.DataFrame, score: str, upto: float) -> float:
    """Perturbation sensitivity: the mean drop of the score over the actual fraction [0, upto]
    (area_drop of the curve's points, which start at the unperturbed caption)."""
    c = curve.sort_values("fraction")
    return area_drop(c["fraction"].to_numpy(float), c[score].to_numpy(float), upto)


# -- the measures -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Measure:
    """One per-image measure: everything the report needs to know of it."""
    name: str
    kind: str                               # "geometry" (larger = more change) | "instability" (larger = less
                                            # stable) | "dose" (how strongly an image was perturbed)
    questions: tuple[str, ...]              # the questions it enters (QUESTIONS)
    description: str
    unit: str
    compute: Callable[["ModelInputs", dict], pd.Series]   # (model inputs, context) -> per image, by stem
    circular: bool = False                  # a reconstruction's own error: against the instability of the
                                            # caption made from that reconstruction it is a cause, not a finding
    adjust_for: tuple[str, ...] = ()        # measures (doses) its correlations are stratified by, besides content


def measures(modes: list, levels: list) -> list[Measure]:
    """The study's measures; the perturbation ones per mode. `context` carries k (KNOR@k) and the
    common fraction of each mode."""
    both = ("reconstruction", "perturbation")
    table = [
        Measure("knor_change", "geometry", both, "1 - KNOR@k of the image's pre/post neighbourhoods", "fraction",
                lambda m, c: 1.0 - m.geometry[f"knor_pre_post@{c['k']}"]),
        Measure("erank_drop", "geometry", both, "effective rank of E_pre minus that of E_post (token matrices; signed)",
                "erank", lambda m, c: m.geometry["erank_pre"] - m.geometry["erank_post"]),
        Measure("distortion", "geometry", ("perturbation",), "the connector's local distortion: std over the image's k "
                "nearest E_pre neighbours of log(post distance / pre distance)", "log ratio",
                lambda m, c: m.geometry[f"distortion@{c['k']}"]),
        Measure("recon_mse", "geometry", ("reconstruction",), "reconstruction MSE of E_pre from E_post", "z-units²",
                lambda m, c: m.recon["mse_z"], circular=True),
        Measure("lm_error", "geometry", ("reconstruction",), "MSE of connector(reconstructed E_pre) against E_post: the "
                "error that reaches the language model", "z-units² of E_post",
                lambda m, c: m.captions["recon_post_mse_z"], circular=True),
        Measure("recon_cosine_loss", "geometry", ("reconstruction",),
                "1 - cosine(reconstructed E_pre, E_pre), mean over tokens", "1 - cos", lambda m, c: 1.0 - m.recon["cosine"],
                circular=True),
        Measure("bertscore_instability", "instability", ("reconstruction",),
                "1 - BERTScore F1 of the recon caption against the post caption", "1 - F1",
                lambda m, c: 1.0 - m.scores["recon"]["stability_f1"]),
        Measure("clipscore_drop", "instability", ("reconstruction",),
                "CLIPScore of the post caption minus that of the recon caption", "CLIPScore",
                lambda m, c: m.scores["post"]["clipscore"] - m.scores["recon"]["clipscore"]),
        Measure("attribute_error_change", "instability", ("reconstruction",),
                "toy-world attributes (kinds, counts, colours) wrong in the recon caption minus those wrong in the post "
                "caption", "attributes",
                lambda m, c: attribute_errors(m.scores["recon"]) - attribute_errors(m.scores["post"])),
    ]
    for mode in modes:
        table.append(Measure(f"{mode}_instability", "instability", ("perturbation",),
                             f"mean over the actual {mode} fraction [0, F] of 1 - BERTScore F1 against the post caption "
                             "(F: the largest fraction every model reaches)", "1 - F1",
                             lambda m, c, mode=mode: image_instability(m, mode, levels, c["fractions"][mode]),
                             adjust_for=(f"{mode}_dose",)))
        table.append(Measure(f"{mode}_dose", "dose", ("perturbation",),
                             f"mean over the same fraction [0, F] of the share of E_post's energy {mode} moved", "share",
                             lambda m, c, mode=mode: image_dose(m, mode, levels, c["fractions"][mode])))
    return table


def per_image(m: ModelInputs, table: list[Measure], context: dict, covariates: pd.DataFrame) -> pd.DataFrame:
    """One row per image, in the geometry table's order: stem, split, every measure, the content covariates
    (`covariates`, by stem: what the image shows), plus erank_post and the post caption's clipscore (for
    the effective-rank figure). Every input must cover the same images: a mismatch means a stale upstream
    output, and no image is dropped silently."""
    stems = list(m.geometry.index)
    frames = {"recon_eval": m.recon, "captions": m.captions, "covariates": covariates,
              **{f"scores {s}": t for s, t in m.scores.items()}}
    for name, frame in frames.items():
        if not set(stems) <= set(frame.index) or (name != "covariates" and len(frame) != len(stems)):
            raise ValueError(f"{m.name}: {name} covers {len(frame)} images, geometry {len(stems)}, not the same ones; "
                             "rerun the stale upstream stages (`dvc repro`)")
    out = pd.DataFrame({"stem": stems, "split": m.recon.loc[stems, "split"].to_numpy()})
    for measure in table:
        try:
            values = measure.compute(m, context)
        except KeyError as err:  # an input written before the measure existed, or by a stage that was changed
            raise ValueError(f"{m.name}: measure {measure.name!r} ({measure.description}) needs {err.args[0]!r}, which "
                             "its inputs lack; rerun the stages that write them (`dvc repro`; for a sample folder, "
                             "`python scripts/make_sample.py . --out sample` after it)") from None
        out[measure.name] = pd.to_numeric(values.reindex(stems), errors="coerce").to_numpy()
    for name in covariates.columns:
        out[name] = covariates.loc[stems, name].to_numpy()
    out["erank_post"] = m.geometry.loc[stems, "erank_post"].to_numpy()
    out["clipscore_post"] = m.scores["post"].loc[stems, "clipscore"].to_numpy()
    return out


# -- the questions ------------------------------------------------------------------------------------------

def question(tables: dict[str, pd.DataFrame], table: list[Measure], covariates: list[str], n_perm: int, n_boot: int,
             seed: int, alpha: float = 0.05, max_levels: int = 8, bins: int = 4) -> pd.DataFrame:
    """Every (question, model, geometry, instability) correlation over the question's images, raw and adjusted.

    raw       Spearman rho_raw and its permutation p_raw, q_raw (BH within the family);
    adjusted  strata of the content `covariates` (columns of the per-image tables) and of the instability's
              own `adjust_for` doses (stats.strata_ids with max_levels, bins): the within-strata rho, its
              stratified permutation p, q (BH within the family) and a stratified bootstrap interval (a
              description only); `strata`: strata of two or more images;
    m         images whose instability is not zero (the evidence);
    p_drop    the adjusted p without the changed image whose removal weakens rho most (stats.weakest_drop),
              for the rows with q <= alpha;
    verdict   stats.verdict_rule on q and on p_drop <= the family's BH cutoff.

    Families: a circular row (a reconstruction's error against the instability of the caption made from it,
    Measure.circular) is a family of its own, never counted among the findings.
    """
    by_name = {x.name: x for x in table}
    cells = []  # (row, x, y, strata) of every correlation, over its finite pairs
    for name, split in QUESTIONS.items():
        geometry = [x for x in table if x.kind == "geometry" and name in x.questions]
        instability = [x for x in table if x.kind == "instability" and name in x.questions]
        for model, t in tables.items():
            if split is not None:
                t = t[t["split"] == split]
            for g in geometry:
                for c in instability:
                    x, y = t[g.name].to_numpy(float), t[c.name].to_numpy(float)
                    strata = strata_ids([t[v].to_numpy() for v in covariates]
                                        + [t[d].to_numpy(float) for d in c.adjust_for], max_levels, bins)
                    keep = np.isfinite(x) & np.isfinite(y)
                    if not len(strata):
                        strata = np.zeros(len(x), dtype=np.int64)
                    row = {"question": name, "family": "circular" if g.circular else "finding", "split": split or "all",
                           "model": model, "geometry": g.name, "instability": c.name,
                           "adjusted_for": " ".join([*covariates, *c.adjust_for]), "m": changed_count(y[keep])}
                    cells.append((row, x[keep], y[keep], strata[keep]))
    # each correlation draws from its own seeded generator, so the processes change nothing but the wall time
    with ProcessPoolExecutor(max(1, min(os.cpu_count() or 1, len(cells)))) as pool:
        tests = list(pool.map(_correlation_tests, [(x, y, s, n_perm, n_boot, seed) for _, x, y, s in cells], chunksize=4))
        q = pd.DataFrame([{**row, **test} for (row, *_), test in zip(cells, tests)],
                         columns=["question", "family", "split", "model", "geometry", "instability", "adjusted_for",
                                  "n", "m", "strata", "rho_raw", "p_raw", "rho", "p", "low", "high"])
        q["q_raw"], q["q"], q["p_drop"] = np.nan, np.nan, np.nan
        for family in FAMILIES:
            rows = q["family"] == family
            q.loc[rows, "q_raw"] = bh_qvalues(q.loc[rows, "p_raw"].to_numpy(float))
            q.loc[rows, "q"] = bh_qvalues(q.loc[rows, "p"].to_numpy(float))
        found = np.flatnonzero(q["q"].to_numpy(float) <= alpha)
        drops = pool.map(_drop_test, [(*cells[i][1:], n_perm, seed) for i in found])
        q.loc[q.index[found], "p_drop"] = list(drops)
    cutoff = {f: bh_cutoff(q.loc[q["family"] == f, "p"].to_numpy(float), alpha) for f in FAMILIES}
    stable = [p_drop <= cutoff[f] for p_drop, f in zip(q["p_drop"], q["family"])]
    q["verdict"] = [verdict_rule(a, b, alpha) for a, b in zip(q["q"], stable)]
    return q[["question", "family", "split", "model", "geometry", "instability", "adjusted_for", "n", "m", "strata",
              "rho_raw", "p_raw", "q_raw", "rho", "low", "high", "p", "q", "p_drop", "verdict"]]


def _correlation_tests(args) -> dict:
    x, y, strata, n_perm, n_boot, seed = args
    raw = spearman_permutation(x, y, n_perm=n_perm, seed=seed)
    adjusted = spearman_permutation(x, y, n_perm=n_perm, seed=seed, strata=strata)
    boot = spearman_ci(x, y, n_boot=n_boot, seed=seed, strata=strata)
    sizes = np.bincount(np.unique(strata, return_inverse=True)[1]) if len(strata) else np.zeros(0, dtype=int)
    return {"n": raw["n"], "strata": int((sizes > 1).sum()), "rho_raw": raw["rho"], "p_raw": raw["p"],
            "rho": adjusted["rho"], "p": adjusted["p"], "low": boot["low"], "high": boot["high"]}


def _drop_test(args) -> float:
    x, y, strata, n_perm, seed = args
    i = weakest_drop(x, y, strata)
    if i is None:
        return math.nan
    keep = np.arange(len(x)) != i
    return spearman_permutation(x[keep], y[keep], n_perm=n_perm, seed=seed, strata=strata[keep])["p"]


def example_sections(rows: pd.DataFrame) -> list[str]:
    """The examples page's sections (conngeo.report.examples) that show the images behind `rows`: the
    reconstruction section, or each perturbation mode whose instability the rows correlate with."""
    if (rows["question"] == "reconstruction").all():
        return ["reconstruction"]
    return list(dict.fromkeys(c.removesuffix("_instability") for c in rows["instability"]))


def verdict_line(row) -> str:
    """One sentence on one correlation, never without its m, p, q and interval."""
    if math.isnan(row["rho"]):
        return f"rho undefined (a measure is constant within every stratum), n = {row['n']}, m = {row['m']}: **{row['verdict']}**"
    drop = "" if math.isnan(row["p_drop"]) else f", p without the weakest changed image = {row['p_drop']:.2g}"
    return (f"adjusted rho {row['rho']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}], p = {row['p']:.2g}, "
            f"q = {row['q']:.2g}{drop} (raw rho {row['rho_raw']:+.3f}, q = {row['q_raw']:.2g}); n = {row['n']}, "
            f"m = {row['m']}, {row['strata']} strata: **{row['verdict']}**")


def question_text(q: pd.DataFrame, table: list[Measure], n_perm: int, n_boot: int, k: int, alpha: float) -> str:
    """The generated answers: per question and model, every correlation with its verdict; circular rows apart."""
    findings, circular = q[q["family"] == "finding"], q[q["family"] == "circular"]
    found = findings[findings["verdict"] == "distinguishable"]
    adjusted = sorted({v for a in q["adjusted_for"] for v in a.split()})
    lines = ["# Does geometry change predict caption instability?", "",
             "Spearman rank correlation per image, raw and adjusted. Adjusted: ranks compared only within strata of "
             f"what the image shows and, under perturbation, of how much of E_post the perturbation moved "
             f"({', '.join(adjusted) or 'no covariates'}); the verdict is the adjusted one: a permutation test within "
             f"strata ({n_perm} permutations), Benjamini-Hochberg q-values within each family below, "
             f"*distinguishable* where q <= {alpha} and the test without the one changed image whose removal weakens "
             f"rho most still passes BH's cutoff (*rests on one image* where it does not). m: images whose "
             f"instability moved. The 95% stratified bootstrap intervals ({n_boot} resamples) describe, they do not "
             f"decide. Positive rho: images whose representation changes more get less stable captions. KNOR and "
             f"distortion at k = {k}.", "",
             f"**{len(found)} of {len(findings)}** correlations between geometry and caption instability are "
             f"distinguishable after adjustment ({int((findings['verdict'] == 'rests on one image').sum())} rest on one "
             f"image, {int((findings['verdict'] == 'undefined').sum())} are undefined). The {len(circular)} circular "
             "correlations (a reconstruction's error against the instability of the caption made from that very "
             f"reconstruction: a cause, not a finding) are listed apart, {int((circular['verdict'] == 'distinguishable').sum())} "
             "of them distinguishable.", ""]
    intro = {"reconstruction": "Geometry change against the instability of the caption generated from "
                               "connector(reconstructed E_pre), on the test images.",
             "perturbation": "Geometry change with no reconstructor involved against how unstable the image's caption "
                             "is under masking and low-rank truncation of E_post (area over the actual fraction), "
                             "on all images."}
    sections = [(f"The {name} question", q[(q["question"] == name) & (q["family"] == "finding")], intro[name])
                for name in QUESTIONS]
    sections.append(("Circular: a reconstruction's error against the caption made from it", circular,
                     "The reconstruction errors cause the recon caption's instability mechanically; lm_error is the "
                     "part that reaches the language model. Consistency checks, not findings about geometry."))
    for title, rows, text in sections:
        if rows.empty:
            continue
        lines += [f"## {title}", "", text, ""]
        for model, r in rows.groupby("model", sort=False):
            links = ", ".join(f"[{name}](examples/index.html#{anchor(model, name)})" for name in example_sections(r))
            lines += [f"### {model}", "", f"{int((r['verdict'] == 'distinguishable').sum())} of {len(r)} distinguishable "
                      f"(examples: {links}).", ""]
            lines += [f"- {row['geometry']} vs {row['instability']}: {verdict_line(row)}" for _, row in r.iterrows()]
            lines.append("")
    lines += ["## Measures", ""] + [f"- `{x.name}`: {x.description} ({x.unit})" for x in table]
    return "\n".join(lines) + "\n"


# -- the summary --------------------------------------------------------------------------------------------

def knor_table(m: ModelInputs) -> pd.DataFrame:
    """Dataset KNOR per pair and k with its chance level (long: model, pair, k, knor, chance)."""
    rows = []
    for pair, entry in m.geometry_metrics["pairs"].items():
        for k in m.geometry_metrics["ks"]:
            rows.append({"model": m.name, "pair": pair, "k": k, "knor": entry[f"knor@{k}"],
                         "chance": entry[f"chance@{k}"]})
    return pd.DataFrame(rows)


PROBE_COLUMNS = ["model", "target", "metric", "pre", "pre_sd", "post", "post_sd", "drop", "drop_sd", "chance"]


def _per_seed(probes: pd.DataFrame) -> pd.DataFrame:
    """Probe scores of E_pre and E_post side by side, one row per (target, metric, fold seed), and their drop."""
    wide = probes.pivot_table(index=["target", "metric", "seed"], columns="space", values="score", sort=False)
    return wide.assign(drop=wide["pre"] - wide["post"]).reset_index()


def _mean_sd(per_seed: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean and standard deviation over the fold seeds of pre, post and drop (sd NaN with one seed)."""
    g = per_seed.groupby(keys, sort=False)[["pre", "post", "drop"]]
    return g.mean().join(g.std(ddof=1).add_suffix("_sd")).reset_index()


def probe_table(m: ModelInputs, references: pd.DataFrame) -> pd.DataFrame:
    """Readability of the ground truth per target: how well a linear probe reads it from E_pre and from
    E_post (balanced accuracy for classes, R^2 for numbers; the mean over the fold seeds, with its sd), the
    drop pre - post (what the connector makes less readable; negative: more readable), chance, and each
    reference space (long: model, target, metric, pre, pre_sd, post, post_sd, drop, drop_sd, chance, <ref>...)."""
    if m.probes.empty:
        return pd.DataFrame(columns=PROBE_COLUMNS)
    out = _mean_sd(_per_seed(m.probes), ["target", "metric"]).assign(model=m.name)
    out["chance"] = out["target"].map(m.probes.groupby("target", sort=False)["chance"].first())
    if not references.empty:
        refs = references.pivot_table(index="target", columns="space", values="score", aggfunc="mean", sort=False)
        out = out.join(refs, on="target")
    return out[PROBE_COLUMNS + [c for c in out.columns if c not in PROBE_COLUMNS]]


def readability(m: ModelInputs) -> dict[str, float]:
    """The probes grouped as the summary reads them, readability_{pre,post,drop,drop_sd,chance}_<group>:
    the per-kind / per-object presence probes averaged ("kinds", "objects_present": balanced accuracy), the
    others as they are ("count": R^2, "colour", "plate"); means over the fold seeds of each seed's group
    mean, drop_sd their spread. Groups never mix balanced accuracy with R^2."""
    if m.probes.empty:
        return {}
    per_seed = _per_seed(m.probes)
    chance = m.probes.groupby("target", sort=False)["chance"].first()
    group = per_seed["target"].map(lambda t: {"kind": "kinds", "object": "objects_present"}.get(t.split(":")[0], t)
                                   if ":" in t else t)
    per_seed = per_seed.assign(group=group, chance=per_seed["target"].map(chance))
    by_seed = per_seed.groupby(["group", "seed"], sort=False)[["pre", "post", "drop", "chance"]].mean().reset_index()
    out = {}
    for name, rows in by_seed.groupby("group", sort=False):
        for side in ("pre", "post", "drop", "chance"):
            out[f"readability_{side}_{name}"] = float(rows[side].mean())
        out[f"readability_drop_sd_{name}"] = float(rows["drop"].std(ddof=1)) if len(rows) > 1 else math.nan
    return out


def mean_interval(v, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the finite values of v: the percentile bootstrap interval of the mean over the
    values (images), numpy PCG64 from `seed`; NaN bounds with fewer than two values or n_boot < 1."""
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2 or n_boot < 1:
        return (float(v.mean()) if len(v) else math.nan), math.nan, math.nan
    means = v[np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(low), float(high)


def summary_row(m: ModelInputs, curve: pd.DataFrame, modes: list, fractions: dict, n_boot: int = 1000,
                seed: int = 0) -> dict:
    """One model's line of the summary table. Two caption sets side by side are scored on the same images:
    the post caption on the test images beside the recon caption (post_caption_<score>_test), and on all
    images for the model's own quality (post_caption_<score>). The reconstructor's margin over the linear
    baseline is the mean over test images of linear_mse_z - mse_z with a bootstrap interval (n_boot, seed):
    recon_vs_linear "beats" where the interval lies above 0, "underfit" where below, "tie" otherwise."""
    row = {"model": m.name, "images": m.geometry_metrics["images"]}
    for _, r in knor_table(m).iterrows():
        row[f"knor_{r['pair']}@{r['k']}"] = r["knor"]
    for k in m.geometry_metrics["ks"]:
        row[f"chance@{k}"] = m.geometry_metrics["pairs"]["pre_post"][f"chance@{k}"]
    spectra = m.geometry_metrics.get("spectra", {})
    for key in ("erank_pre_mean", "erank_post_mean", "erank_pre_dataset", "erank_post_dataset"):
        row[key] = spectra.get(key, math.nan)
    test = m.recon_metrics["test"]
    for key in ("mse_z", "mean_mse_z", "linear_mse_z", "pooled_mse_z", "ridge_pooled_mse_z", "cosine",
                "pooled_cosine"):
        row[f"recon_{key}"] = test[key]
    split = m.recon["split"]
    tested = m.recon[split == "test"]
    margin = mean_interval(tested["linear_mse_z"] - tested["mse_z"], n_boot, seed)
    row["recon_linear_margin"], row["recon_linear_margin_low"], row["recon_linear_margin_high"] = margin
    if math.isnan(margin[0]):  # no linear baseline (its inputs exceed recon.linear_max_features)
        row["recon_vs_linear"], row["recon_underfit"] = None, None
    else:
        row["recon_vs_linear"] = "beats" if margin[1] > 0 else "underfit" if margin[2] < 0 else "tie"
        row["recon_underfit"] = row["recon_vs_linear"] == "underfit"
    for key in ("beats_mean_baseline", "beats_ridge_baseline"):
        row[f"recon_{key}"] = m.recon_metrics[key]
    row["lm_error"] = float(m.captions.loc[split.index[split == "test"], "recon_post_mse_z"].mean())
    for score in ("clipscore", "refclipscore", "bertscore_f1", "truth_exact"):
        row[f"post_caption_{score}"] = float(column(m.scores["post"], score).mean())
        row[f"post_caption_{score}_test"] = float(column(m.scores["post"], score)[split == "test"].mean())
        row[f"recon_caption_{score}"] = float(column(m.scores["recon"], score)[split == "test"].mean())
    post = m.scores["post"]
    row["clip_retrieval_top1"] = float(column(post, "clip_retrieval").mean())  # the scoring CLIP's sanity check
    row["clip_retrieval_chance"] = float(column(post, "clip_retrieval_chance").mean())
    recon = m.scores["recon"][split == "test"]
    row["recon_caption_stability_f1"] = float(recon["stability_f1"].mean())
    row["recon_caption_same_as_post"] = float((recon["caption"] == m.scores["post"].loc[recon.index, "caption"]).mean())
    for mode in modes:
        c = curve[(curve["model"] == m.name) & (curve["mode"] == mode)]
        for score in ("clipscore", "stability_f1"):
            row[f"sensitivity_{mode}_{score}"] = sensitivity(c, score, fractions[mode])
    return row | readability(m)


# The numbers the study is about, one small metrics file per model (results/metrics/<model>.json, what
# `dvc exp show` and `dvc metrics diff` list): name -> the summary column it is ({k}: the report's k,
# {mode}: each perturbation mode).
HEADLINE = {
    "knor_pre_post": "knor_pre_post@{k}", "chance": "chance@{k}",        # E_pre vs E_post neighbourhoods
    "erank_pre": "erank_pre_mean", "erank_post": "erank_post_mean",       # spectra
    "recon_mse_z": "recon_mse_z", "recon_linear_mse_z": "recon_linear_mse_z",  # recoverability (test images)
    "recon_mean_mse_z": "recon_mean_mse_z", "recon_underfit": "recon_underfit",
    "lm_error": "lm_error",                                               # the error that reaches the LM
    "post_clipscore": "post_caption_clipscore", "post_bertscore_f1": "post_caption_bertscore_f1",
    "post_exact": "post_caption_truth_exact",                             # caption quality
    "recon_stability_f1": "recon_caption_stability_f1",                   # recon caption vs post caption
    "sensitivity_{mode}": "sensitivity_{mode}_stability_f1",              # perturbation (area over fraction)
    "readability_drop_kinds": "readability_drop_kinds",                   # what the connector makes less
    "readability_drop_count": "readability_drop_count",                   # readable (toy world; each its own
    "readability_drop_objects_present": "readability_drop_objects_present",  # metric, never averaged together)
    "readability_drop_objects": "readability_drop_objects",               # (COCO)
}


def headline(row: dict, k: int, modes: list) -> dict:
    """The HEADLINE numbers of one summary row; a number that is undefined for this study (NaN or None, e.g.
    no toy truth, or no linear baseline when its inputs exceed recon.linear_max_features) is left out."""
    out = {}
    for name, column_name in HEADLINE.items():
        for mode in modes if "{mode}" in name else [None]:
            value = row.get(column_name.format(k=k, mode=mode), math.nan)
            out[name.format(mode=mode)] = value
    return {n: (bool(v) if isinstance(v, (bool, np.bool_)) else float(v)) for n, v in out.items()
            if isinstance(v, (bool, np.bool_)) or (v is not None and not math.isnan(v))}


def caption_means(m: ModelInputs, scores=("clipscore", "bertscore_f1", "truth_exact")) -> pd.DataFrame:
    """Mean of each caption score for the post and the recon caption, on the same (test) images, with a
    normal 95% interval (mean +- 1.96 standard errors; long: model, set, score, mean, low, high, n)."""
    rows = []
    test = m.recon["split"] == "test"
    for name, table in (("post", m.scores["post"][test]), ("recon", m.scores["recon"][test])):
        for score in scores:
            v = column(table, score).to_numpy(float)
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
        return "" if v is None else str(v)
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    return "\n".join([head, rule] + ["| " + " | ".join(cell(v) for v in row) + " |"
                                     for row in df.itertuples(index=False)]) + "\n"
