"""The report: Spearman against scipy, the bootstrap's reproducibility, the generated answer, every
figure from fixture tables, and the stage end to end on the committed sample/."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.stats import rankdata, spearmanr

from conngeo.report import figures, spearman, spearman_ci, tables
from page_helpers import browser_check

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample"


# --- statistics ------------------------------------------------------------------------------

@pytest.mark.parametrize("n,ties", [(4, False), (12, True), (50, False), (300, True)])
def test_spearman_equals_scipy(n, ties):
    rng = np.random.default_rng(n)
    x = rng.normal(size=n)
    y = 0.5 * x + rng.normal(size=n)
    if ties:  # repeated values get average ranks in both
        x = np.round(x, 0)
        y = np.round(y, 0)
    rho, p = spearman(x, y)
    ref = spearmanr(x, y)
    assert rho == pytest.approx(ref.statistic, abs=1e-12)
    assert p == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300)


def test_spearman_drops_nan_pairs_and_handles_degenerate_cases():
    x = np.array([1.0, 2.0, np.nan, 4.0, 5.0, 3.0])
    y = np.array([2.0, 1.0, 7.0, np.nan, 6.0, 4.0])
    keep = [0, 1, 4, 5]
    ref = spearmanr(x[keep], y[keep])
    assert spearman(x, y) == pytest.approx((ref.statistic, ref.pvalue))
    assert math.isnan(spearman([1, 1, 1, 1], [1, 2, 3, 4])[0])      # constant: undefined
    assert math.isnan(spearman([1, 2], [2, 1])[0])                  # too few pairs
    assert spearman([1, 2, 3, 4], [2, 4, 6, 8]) == (1.0, 0.0)      # perfect
    out = spearman_ci([1, 1, 1, 1], [1, 2, 3, 4], n_boot=50)
    assert math.isnan(out["rho"]) and math.isnan(out["low"]) and not out["distinct"]


def test_bootstrap_is_reproducible_and_contains_the_estimate():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = 0.3 * x + rng.normal(size=200)
    a = spearman_ci(x, y, n_boot=300, seed=7)
    assert a == spearman_ci(x, y, n_boot=300, seed=7)
    assert a != spearman_ci(x, y, n_boot=300, seed=8)
    assert a["low"] <= a["rho"] <= a["high"]
    assert a["rho"] == pytest.approx(spearmanr(x, y).statistic)
    # the percentile interval, recomputed independently: scipy's spearmanr on each resample
    idx = np.random.default_rng(7).integers(0, 200, size=(300, 200))
    boot = [spearmanr(x[i], y[i]).statistic for i in idx]
    assert (a["low"], a["high"]) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])), abs=1e-12)
    assert a["distinct"] == (a["low"] > 0 or a["high"] < 0)


def test_bootstrap_counts_constant_resamples_as_no_association():
    """One image of 100 has a nonzero instability: about 1/e of the resamples miss it and are constant.
    They count as rho* = 0, so the interval reaches 0 and nothing is called distinguishable."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=100)
    y = np.zeros(100)
    y[np.argmax(x)] = 1.0  # the one changed caption sits on the largest geometry change
    a = spearman_ci(x, y, n_boot=400, seed=3)
    idx = np.random.default_rng(3).integers(0, 100, size=(400, 100))
    boot = [0.0 if np.ptp(y[i]) == 0 else spearmanr(x[i], y[i]).statistic for i in idx]
    assert (a["low"], a["high"]) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])), abs=1e-12)
    assert a["boot_defined"] == sum(np.ptp(y[i]) > 0 for i in idx) < 300
    assert a["low"] == 0.0 and a["rho"] > 0 and not a["distinct"]


# --- tables ----------------------------------------------------------------------------------

MEASURES = tables.measures(["mask"], [0.5])


def synthetic_tables(n=120, seed=0, models=("llava", "qwen2_5vl")):
    """Per-image tables as tables.per_image() builds them, one column per measure of MEASURES (noise, unless
    planted): in the first model the instability follows the reconstruction error; in the second, the food
    count drives both KNOR change and masking instability (a confounder, no direct link); one measure is
    constant."""
    rng = np.random.default_rng(seed)
    out = {}
    for j, model in enumerate(models):
        mse = rng.gamma(2.0, 0.3, size=n)
        count = rng.integers(1, 7, size=n)
        confounded = j == 1
        table = {"stem": [f"s{i:03d}" for i in range(n)], "split": np.where(np.arange(n) % 5 == 0, "train", "test")}
        table.update({x.name: rng.normal(size=n) for x in MEASURES})
        table.update({
            "knor_change": rng.uniform(0, 1, size=n) + (count if confounded else 0),
            "recon_mse": mse,
            "bertscore_instability": (mse if j == 0 else 0) + 0.1 * rng.normal(size=n),
            "attribute_error_change": np.zeros(n),                 # constant: undefined correlation
            "mask_instability": (count + rng.uniform(0, 1, size=n)) if confounded else
                                np.where(np.arange(n) < 5, rng.uniform(0.1, 1, size=n), 0.0),  # m = 5
            "mask_dose": rng.uniform(0, 1, size=n),
            "food_count": count,
            "plate": rng.choice(["blue", "white"], size=n),
            "erank_post": rng.uniform(2, 9, size=n),
            "clipscore_post": rng.uniform(0.3, 0.9, size=n),
        })
        out[model] = pd.DataFrame(table)
    return out


def _within_strata_rho(x, y, strata):
    a, b = np.zeros(len(x)), np.zeros(len(x))
    for s in np.unique(strata):
        m = strata == s
        a[m], b[m] = rankdata(x[m]) - (m.sum() + 1) / 2, rankdata(y[m]) - (m.sum() + 1) / 2
    return (a @ b) / math.sqrt((a @ a) * (b @ b))


def test_questions_match_scipy_and_the_verdicts_follow_the_rule():
    from scipy.stats import false_discovery_control

    from conngeo.report.stats import bh_cutoff, strata_ids

    per = synthetic_tables()
    q = tables.question(per, MEASURES, ["food_count", "plate"], n_perm=999, n_boot=200, seed=0)
    geometry = {name: [x.name for x in MEASURES if x.kind == "geometry" and name in x.questions] for name in tables.QUESTIONS}
    instability = {name: [x.name for x in MEASURES if x.kind == "instability" and name in x.questions]
                   for name in tables.QUESTIONS}
    assert len(q) == 2 * sum(len(geometry[n]) * len(instability[n]) for n in tables.QUESTIONS)
    circular = {x.name for x in MEASURES if x.circular}
    assert circular == {"recon_mse", "lm_error", "recon_cosine_loss"}
    assert ((q["family"] == "circular") == q["geometry"].isin(circular)).all()
    for _, row in q.iterrows():
        t = per[row["model"]]
        t = t[t["split"] == "test"] if row["question"] == "reconstruction" else t  # the question's images
        if row["instability"] == "attribute_error_change":
            assert math.isnan(row["rho"]) and row["verdict"] == "undefined" and row["m"] == 0
            continue
        x, y = t[row["geometry"]].to_numpy(float), t[row["instability"]].to_numpy(float)
        dose = [t["mask_dose"].to_numpy()] if row["instability"] == "mask_instability" else []
        strata = strata_ids([t["food_count"].to_numpy(), t["plate"].to_numpy(), *dose])
        assert row["adjusted_for"] == "food_count plate" + (" mask_dose" if dose else "")
        assert row["n"] == len(t) and row["m"] == int((y != 0).sum())
        assert row["rho_raw"] == pytest.approx(spearmanr(x, y).statistic)
        assert row["rho"] == pytest.approx(_within_strata_rho(x, y, strata))
    for family in tables.FAMILIES:
        f = q[(q["family"] == family) & q["p"].notna()]
        assert np.allclose(f["q"], false_discovery_control(f["p"], method="bh"))
        assert np.allclose(f["q_raw"], false_discovery_control(f["p_raw"], method="bh"))
        cutoff = bh_cutoff(q.loc[q["family"] == family, "p"])
        expected = np.where(f["q"] > 0.05, "not distinguishable",
                            np.where(f["p_drop"] <= cutoff, "distinguishable", "rests on one image"))
        assert (f["verdict"] == expected).all()
    assert q.loc[q["q"] > 0.05, "p_drop"].isna().all()  # the drop-one check runs where it can matter
    planted = q[(q["model"] == "llava") & (q["geometry"] == "recon_mse") & (q["instability"] == "bertscore_instability")]
    assert planted["verdict"].item() == "distinguishable" and planted["low"].item() > 0.5
    assert planted["family"].item() == "circular"
    confounded = q[(q["model"] == "qwen2_5vl") & (q["geometry"] == "knor_change") & (q["instability"] == "mask_instability")]
    assert confounded["rho_raw"].item() > 0.8 and confounded["q_raw"].item() <= 0.05  # the count drives both ...
    assert confounded["verdict"].item() == "not distinguishable"                     # ... and nothing else does

    text = tables.question_text(q, MEASURES, 999, 200, k=10, alpha=0.05)
    for _, row in q.iterrows():
        title = (f"## The {row['question']} question" if row["family"] == "finding" else "## Circular")
        section = text.split(title)[1].split("\n## ")[0]
        line = next(li for li in section.split(f"### {row['model']}")[1].split("### ")[0].splitlines()
                    if li.startswith(f"- {row['geometry']} vs {row['instability']}: "))
        assert line.endswith(f"**{row['verdict']}**") and f"m = {row['m']}" in line
    # each model's rows link to the examples page's section of their images
    assert "(examples: [reconstruction](examples/index.html#llava-reconstruction))" in text
    assert "(examples: [mask](examples/index.html#qwen2_5vl-mask))" in text
    findings = q[q["family"] == "finding"]
    assert (f"**{int((findings['verdict'] == 'distinguishable').sum())} of {len(findings)}** correlations between "
            "geometry and caption instability are distinguishable after adjustment") in text


def test_actual_fraction_curves_drop_duplicate_levels_and_integrate_exactly():
    # levels 0.01-0.25 mask the same 1 of 4 tokens: one point at 0.25; level 0.5 masks 2 of 4
    f, s = tables.fraction_curve([0.25, 0.25, 0.25, 0.5], [0.8, 0.8, 0.8, 0.4], start=1.0)
    assert f.tolist() == [0.0, 0.25, 0.5] and s.tolist() == pytest.approx([1.0, 0.8, 0.4])
    # drops 0, 0.2, 0.6: area 0.25 * 0.1 + 0.25 * 0.4 = 0.125, per unit fraction / 0.5
    assert tables.area_drop(f, s, 0.5) == pytest.approx(0.25)
    # up to 0.4: the curve interpolated at 0.4 (0.56): 0.25 * 0.1 + 0.15 * (0.2 + 0.44) / 2 = 0.073, / 0.4
    assert tables.area_drop(f, s, 0.4) == pytest.approx((0.025 + 0.048) / 0.4)
    assert math.isnan(tables.area_drop(f, s, 0.6))  # the curve does not reach it
    assert tables.area_drop(f, np.full(3, 1.0), 0.5) == 0.0


def test_curves_and_sensitivity_on_the_actual_fraction():
    post = pd.DataFrame({"clipscore": [0.8, 0.6], "caption": ["a", "b"]}, index=["x", "y"])
    sets = {f"mask_{lv}": pd.DataFrame({"fraction": [fr, fr], "clipscore": [c, c], "stability_f1": [st, st]},
                                       index=["x", "y"])
            for lv, fr, c, st in ((0.1, 0.25, 0.5, 0.9), (0.25, 0.25, 0.5, 0.9), (0.5, 0.5, 0.3, 0.5))}
    m = tables.ModelInputs("m", None, {}, None, None, {}, None, None, {"post": post, **sets}, None)
    c = tables.curves({"m": m}, ["mask"], [0.1, 0.25, 0.5])
    assert c["fraction"].tolist() == [0.0, 0.25, 0.5] and c["levels"].tolist() == ["0", "0.1 0.25", "0.5"]
    assert c["clipscore"].tolist() == pytest.approx([0.7, 0.5, 0.3]) and c["stability_f1"].tolist()[0] == 1.0
    assert tables.sensitivity(c, "clipscore", 0.5) == pytest.approx((0.25 * 0.1 + 0.25 * 0.3) / 0.5)
    # per image: 1 - F1 over the same fractions
    assert tables.image_instability(m, "mask", [0.1, 0.25, 0.5], 0.5).tolist() == pytest.approx(
        [(0.25 * 0.05 + 0.25 * (0.1 + 0.5) / 2) / 0.5] * 2)


def test_headline_picks_the_summary_numbers_and_leaves_out_the_undefined():
    row = {"model": "m", "knor_pre_post@50": 0.4, "chance@50": 0.05, "knor_pre_post@10": 0.9, "erank_pre_mean": 5.0,
           "erank_post_mean": 3.0, "recon_mse_z": 0.2, "recon_linear_mse_z": 0.3, "recon_mean_mse_z": 1.0,
           "recon_underfit": np.bool_(False), "lm_error": 0.1, "post_caption_clipscore": 0.7,
           "post_caption_bertscore_f1": 0.8, "post_caption_truth_exact": math.nan, "recon_caption_stability_f1": 0.95,
           "sensitivity_mask_stability_f1": 0.02, "sensitivity_lowrank_stability_f1": 0.01,
           "readability_drop_kinds": 0.1, "readability_drop_count": 0.3, "readability_pre_kinds": 0.9}
    head = tables.headline(row, k=50, modes=["mask", "lowrank"])
    assert head == {"knor_pre_post": 0.4, "chance": 0.05, "erank_pre": 5.0, "erank_post": 3.0, "recon_mse_z": 0.2,
                    "recon_linear_mse_z": 0.3, "recon_mean_mse_z": 1.0, "recon_underfit": False, "lm_error": 0.1,
                    "post_clipscore": 0.7, "post_bertscore_f1": 0.8, "recon_stability_f1": 0.95,
                    "sensitivity_mask": 0.02, "sensitivity_lowrank": 0.01, "readability_drop_kinds": 0.1,
                    "readability_drop_count": 0.3}  # each in its own metric, never averaged together
    assert type(head["recon_underfit"]) is bool and json.loads(json.dumps(head)) == head  # plain JSON for DVC
    # no linear baseline (its inputs exceed recon.linear_max_features): underfit is None, left out
    row.update(recon_underfit=None, recon_linear_mse_z=math.nan)
    head = tables.headline(row, k=50, modes=["mask", "lowrank"])
    assert "recon_underfit" not in head and "recon_linear_mse_z" not in head and head["recon_mse_z"] == 0.2


def test_readability_by_hand():
    probes = pd.DataFrame([{"space": space, "target": target, "kind": "class", "seed": seed, "metric": metric,
                            "score": score, "chance": chance, "n": 10}
                           for space, target, seed, metric, score, chance in [
                               ("pre", "kind:apple", 0, "balanced_accuracy", 0.9, 0.5),
                               ("pre", "kind:apple", 1, "balanced_accuracy", 0.8, 0.5),
                               ("pre", "kind:egg", 0, "balanced_accuracy", 0.7, 0.5),
                               ("pre", "kind:egg", 1, "balanced_accuracy", 0.7, 0.5),
                               ("pre", "count", 0, "r2", 0.6, 0.0), ("pre", "count", 1, "r2", 0.4, 0.0),
                               ("post", "kind:apple", 0, "balanced_accuracy", 0.5, 0.5),
                               ("post", "kind:apple", 1, "balanced_accuracy", 0.6, 0.5),
                               ("post", "kind:egg", 0, "balanced_accuracy", 0.7, 0.5),
                               ("post", "kind:egg", 1, "balanced_accuracy", 0.9, 0.5),
                               ("post", "count", 0, "r2", 0.7, 0.0), ("post", "count", 1, "r2", 0.5, 0.0)]])
    m = tables.ModelInputs("m", None, {}, probes, None, {}, None, None, {}, None)
    r = tables.readability(m)
    # kinds per seed: pre (0.9 + 0.7) / 2 = 0.8 and 0.75, post 0.6 and 0.75, drop 0.2 and 0.0
    assert r["readability_pre_kinds"] == pytest.approx(0.775) and r["readability_post_kinds"] == pytest.approx(0.675)
    assert r["readability_drop_kinds"] == pytest.approx(0.1) and r["readability_drop_sd_kinds"] == pytest.approx(
        np.std([0.2, 0.0], ddof=1))
    assert r["readability_drop_count"] == pytest.approx(-0.1) and r["readability_chance_count"] == 0.0  # more readable
    table = tables.probe_table(m, pd.DataFrame()).set_index("target")
    assert table.loc["kind:apple", ["pre", "post", "drop"]].tolist() == pytest.approx([0.85, 0.55, 0.3])
    assert table.loc["kind:apple", "drop_sd"] == pytest.approx(np.std([0.4, 0.2], ddof=1))
    assert table.loc["count", "metric"] == "r2"


def test_markdown_table():
    df = pd.DataFrame({"a": ["x", "y"], "b": [1.23456789, math.nan], "c": [True, False]})
    assert tables.markdown(df, digits=3) == "| a | b | c |\n|---|---|---|\n| x | 1.23 | yes |\n| y |  | no |\n"


# --- figures ---------------------------------------------------------------------------------

def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_every_figure_renders_from_fixture_tables(tmp_path):
    per = synthetic_tables()
    images = pd.concat([t.assign(model=m) for m, t in per.items()], ignore_index=True)
    q = tables.question(per, MEASURES, ["food_count"], n_perm=99, n_boot=50, seed=0)
    means = pd.DataFrame([{"model": m, "set": s, "score": sc, "mean": 0.5, "low": 0.4, "high": 0.6, "n": 10}
                          for m in per for s in ("post", "recon") for sc in ("clipscore", "bertscore_f1")])
    knor = pd.DataFrame([{"model": m, "pair": p, "k": k, "knor": 0.5, "chance": k / 59}
                         for m in per for p in ("pre_post", "pre_clip", "post_clip") for k in (5, 10)])
    curves = pd.DataFrame([{"model": m, "mode": mode, "fraction": f, "clipscore": 0.8 - f, "stability_f1": 1 - f}
                           for m in per for mode in ("mask", "lowrank") for f in (0.0, 0.25, 0.5)])
    patch = pd.DataFrame([{"model": m, "image": im, "row": r, "col": c, "mse_z": r + c}
                          for m in per for im in ("test_mean", "a") for r in range(3) for c in range(3)])
    probes = pd.DataFrame([{"model": m, "target": t, "metric": "balanced_accuracy", "pre": 0.9, "pre_sd": 0.01,
                            "post": 0.7, "post_sd": 0.02, "drop": 0.2, "drop_sd": 0.02, "chance": 0.5, "clip": 0.8}
                           for m in per for t in ("kind:apple", "plate")])
    made = {
        "caption_scores": lambda p: figures.caption_scores(means, p),
        "score_vs_error": lambda p: figures.score_vs_error(images, p),
        "knor": lambda p: figures.knor(knor, p),
        "erank_clipscore": lambda p: figures.erank_clipscore(images, p),
        "perturbation_mask": lambda p: figures.perturbation(curves, "mask", p, 0.5),
        "patch_loss": lambda p: figures.patch_loss(patch, p),
        "patch_loss_empty": lambda p: figures.patch_loss(patch.iloc[:0], p),
        "question": lambda p: figures.question_heatmap(q[q["question"] == "reconstruction"], p, "reconstruction"),
        "question_perturbation": lambda p: figures.question_heatmap(q[q["question"] == "perturbation"], p, "perturb"),
        "probes": lambda p: figures.probes(probes, p),
    }
    for name, draw in made.items():
        draw(tmp_path / f"{name}.png")
        assert is_png(tmp_path / f"{name}.png"), name
    # the same tables give the same bytes
    figures.question_heatmap(q[q["question"] == "reconstruction"], tmp_path / "again.png", "reconstruction")
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "question.png").read_bytes()


# --- the stage on the committed sample -------------------------------------------------------

DECLARED = ["summary.csv", "summary.md", "question.csv", "question.md",
            "series/caption_scores.csv", "series/per_image.csv", "series/knor.csv", "series/perturbation.csv",
            "series/patch_loss.csv", "series/probes.csv", "figures/caption_scores.png", "figures/score_vs_error.png",
            "figures/knor.png", "figures/erank_clipscore.png", "figures/patch_loss.png", "figures/question.png",
            "figures/question_perturbation.png", "figures/probes.png"]


def report_on_sample(out: Path) -> Path:
    proc = subprocess.run([sys.executable, "stages/report.py", "--inputs", "sample", "--out", out, "--bootstrap", "100",
                           "--permutations", "999"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def sample_report(tmp_path_factory) -> Path:
    return report_on_sample(tmp_path_factory.mktemp("report") / "r")


def test_stage_on_the_sample_writes_every_declared_output(sample_report, tmp_path):
    out = sample_report
    params = yaml.safe_load((SAMPLE / "params.yaml").read_text())
    expected = DECLARED + [f"figures/perturbation_{m}.png" for m in params["perturb"]["modes"]]
    for rel in expected:
        assert (out / rel).is_file(), rel
        if rel.endswith(".png"):
            assert is_png(out / rel), rel
    # every output and plot that dvc.yaml declares for the report is written (results/ -> out/)
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stage = dvc["stages"]["report"]
    declared = [next(iter(e)) for e in stage["outs"] + stage["plots"]]
    declared += [f for plot in dvc["plots"] if isinstance(plot, dict) for spec in plot.values() for f in spec["y"]]
    assert "results/figures" in declared and "results/series/perturbation.csv" in declared
    for path in declared:
        assert path.startswith("results/") and (out / path.removeprefix("results/")).exists(), path
    # the summary's numbers come from the inputs: one row per model, KNOR as the geometry stage reported it
    summary = pd.read_csv(out / "summary.csv")
    assert summary["model"].tolist() == list(params["models"])
    for _, row in summary.iterrows():
        metrics = json.loads((SAMPLE / "metrics/geometry" / f"{row['model']}.json").read_text())
        for k in metrics["ks"]:
            assert row[f"knor_pre_post@{k}"] == pytest.approx(metrics["pairs"]["pre_post"][f"knor@{k}"], rel=1e-5)
    # the same inputs and seed give the same correlations and the same figures
    again = report_on_sample(tmp_path / "r2")
    for rel in ("question.csv", "summary.csv", "figures/question.png", "examples/index.html"):
        assert (again / rel).read_bytes() == (out / rel).read_bytes(), rel


def test_examples_page_of_the_sample_in_a_browser(sample_report):
    """The quick path's examples page in headless Chromium (page_helpers.browser_check): every image loads,
    every section has rows, nothing is fetched from outside the file system; the first screen is kept in
    logs/tests/examples.png for a person to look at."""
    page = sample_report / "examples" / "index.html"
    size = sum(p.stat().st_size for p in page.parent.rglob("*") if p.is_file())
    assert size < 5 * 2**20, size  # the page and its thumbnails
    report = browser_check(page, ROOT / "logs" / "tests" / "examples.png")
    assert report.problems == []
    params = yaml.safe_load((SAMPLE / "params.yaml").read_text())
    assert len(report.sections) == len(params["models"]) * (2 + len(params["perturb"]["modes"]))
    assert len(report.images) >= len(params["models"]) * params["report"]["examples"]["changed"]
    assert {r.split(":", 1)[0] for r in report.requests} == {"file"}


def test_stage_help():
    proc = subprocess.run([sys.executable, "stages/report.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "--inputs" in proc.stdout


def test_per_image_measures_from_upstream_tables_by_hand():
    idx = ["a", "b"]
    knn = pd.DataFrame({"knor_pre_post@5": [0.8, 0.2], "distortion@5": [0.1, 0.3], "erank_pre": [10.0, 6.0],
                        "erank_post": [7.0, 6.5]}, index=idx)
    recon = pd.DataFrame({"split": ["test", "train"], "mse_z": [0.1, 0.3], "cosine": [0.6, 0.9]}, index=["a", "b"])
    captions = pd.DataFrame({"recon_post_mse_z": [0.05, 0.5]}, index=idx)
    post = pd.DataFrame({"clipscore": [0.7, 0.5], "truth_kinds": [1, np.nan], "truth_counts": [1, np.nan],
                         "truth_colours": [0, np.nan]}, index=idx)
    rec = pd.DataFrame({"clipscore": [0.4, 0.6], "stability_f1": [0.75, 1.0], "truth_kinds": [0, np.nan],
                        "truth_counts": [1, np.nan], "truth_colours": [0, np.nan]}, index=idx)
    mask = pd.DataFrame({"fraction": [0.5, 0.5], "stability_f1": [0.5, 1.0], "relative_change": [0.3, 0.1]}, index=idx)
    m = tables.ModelInputs("m", knn, {}, None, recon.loc[["b", "a"]], {}, None, captions,
                           {"post": post, "recon": rec, "mask_0.5": mask}, None)
    covariates = pd.DataFrame({"food_count": [3, 1, 2], "plate": ["blue", "pink", "gray"]}, index=["c", "b", "a"])
    t = tables.per_image(m, MEASURES, {"k": 5, "fractions": {"mask": 0.5}}, covariates)
    assert t["stem"].tolist() == ["a", "b"] and t["split"].tolist() == ["test", "train"]  # aligned by stem
    assert t["knor_change"].tolist() == pytest.approx([0.2, 0.8]) and t["distortion"].tolist() == [0.1, 0.3]
    assert t["recon_mse"].tolist() == [0.1, 0.3] and t["recon_cosine_loss"].tolist() == pytest.approx([0.4, 0.1])
    assert t["lm_error"].tolist() == [0.05, 0.5] and t["erank_drop"].tolist() == [3.0, -0.5]
    assert t["bertscore_instability"].tolist() == [0.25, 0.0]
    assert t["clipscore_drop"].tolist() == pytest.approx([0.3, -0.1])
    # a: post gets colours wrong (1 error), recon kinds and colours (2): +1; b: reference not toy-world
    assert t["attribute_error_change"].iloc[0] == 1.0 and math.isnan(t["attribute_error_change"].iloc[1])
    # mask: stability 0.5 at fraction 0.5 (a): mean of 1 - F1 over [0, 0.5] = (0 + 0.5) / 2
    assert t["mask_instability"].tolist() == pytest.approx([0.25, 0.0])
    # the energy moved: 0.3 at fraction 0.5 (a), mean over [0, 0.5] of the line from 0 = 0.15
    assert t["mask_dose"].tolist() == pytest.approx([0.15, 0.05])
    assert t["food_count"].tolist() == [2, 1] and t["plate"].tolist() == ["gray", "pink"]  # by stem
    with pytest.raises(ValueError, match="covariates covers"):
        tables.per_image(m, MEASURES, {"k": 5, "fractions": {"mask": 0.5}}, covariates.loc[["c", "b"]])
    m.recon = recon.iloc[:1]
    with pytest.raises(ValueError, match="not the same ones"):
        tables.per_image(m, MEASURES, {"k": 5, "fractions": {"mask": 0.5}}, covariates)
    # an input written before a measure's column existed: the error names the measure, the column, the commands
    m.recon, m.geometry = recon, knn.drop(columns="erank_pre")
    with pytest.raises(ValueError, match=r"measure 'erank_drop' .* needs 'erank_pre'.*`dvc repro`.*make_sample"):
        tables.per_image(m, MEASURES, {"k": 5, "fractions": {"mask": 0.5}}, covariates)


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")  # captions that never move
def test_stage_numbers_against_the_sample_files(sample_report):
    """The stage's question and summary, recomputed from the sample's raw files with scipy and pandas."""
    out = sample_report
    q = pd.read_csv(out / "question.csv").set_index(["question", "model", "geometry", "instability"])
    summary = pd.read_csv(out / "summary.csv").set_index("model")
    params = yaml.safe_load((SAMPLE / "params.yaml").read_text())
    for model in params["models"]:
        recon = pd.read_csv(SAMPLE / "data/recon_eval" / model / "per_image.csv").set_index("stem")
        scores = pd.read_csv(SAMPLE / "data/scores" / model / "recon.csv").set_index("stem").loc[recon.index]
        test = recon["split"] == "test"
        ref = spearmanr(recon["mse_z"][test], 1 - scores["stability_f1"][test])
        row = q.loc[("reconstruction", model, "recon_mse", "bertscore_instability")]
        if math.isnan(ref.statistic):  # the captions never moved on these images: undefined in both
            assert math.isnan(row["rho_raw"]) and math.isnan(row["p_raw"])
        else:  # the raw rho (the adjusted one, within strata, is test_stats' against a hand loop)
            assert row["rho_raw"] == pytest.approx(ref.statistic, abs=1e-5)
        assert row["n"] == test.sum() and row["m"] == int(((1 - scores["stability_f1"][test]) != 0).sum())
        metrics = json.loads((SAMPLE / "metrics/recon_eval" / f"{model}.json").read_text())
        assert summary.loc[model, "recon_mse_z"] == pytest.approx(metrics["test"]["mse_z"], rel=1e-5)
        post = pd.read_csv(SAMPLE / "data/scores" / model / "post.csv")
        assert summary.loc[model, "post_caption_clipscore"] == pytest.approx(post["clipscore"].mean(), rel=1e-5)
