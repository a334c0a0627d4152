"""How far runs of the study agree on its question: `results/question.csv` of runs that differ in their
training seeds (replicates), or in anything else (another CPU, other params). The report's intervals and
permutation tests take the trained models as fixed and the images as the sample; a trained model is one
draw, and this puts a number on what retraining moves.

    compare_questions(first, second)   two runs, correlation by correlation
    across_replicates({name: table})   K runs: each correlation's rho and verdict in every run, and whether
                                       it holds in all of them (the rule the study's findings follow)
    findings_text(table)               that table as the generated list of findings

Plain tables in, tables and dicts out (functional style, as conngeo.report.stats). Outside conngeo.report,
so that the report stage, which does not use it, does not depend on it.
"""

from __future__ import annotations

import pandas as pd

KEY = ["question", "split", "model", "geometry", "instability"]
FOUND = "distinguishable"


def compare_questions(first: pd.DataFrame, second: pd.DataFrame) -> dict:
    """Correlation by correlation (rows matched on KEY; both tables need every KEY column and rho,
    low, high, verdict):

        rho_shift        |rho_second - rho_first|: its mean and max, and the row of the max
        outside_interval rows whose rho_second lies outside the first run's interval [low, high]
        both_distinguishable / same_sign_of_those
        verdicts         {(verdict_first, verdict_second): count} over every matched row
        verdicts_differ  rows whose verdicts differ
        only_first, only_second: rows without a partner (each run's KEYs, as lists)
    """
    merged = first.merge(second, on=KEY, suffixes=("_first", "_second"), validate="one_to_one")
    shift = (merged.rho_second - merged.rho_first).abs()
    both = merged[(merged.verdict_first == FOUND) & (merged.verdict_second == FOUND)]
    largest = merged.loc[shift.idxmax()] if len(merged) and shift.notna().any() else None

    def unmatched(table: pd.DataFrame, other: pd.DataFrame) -> list:
        keys = table[KEY].merge(other[KEY], how="left", indicator=True)
        return keys[keys._merge == "left_only"][KEY].values.tolist()

    return {
        "matched": len(merged),
        "rho_shift_mean": float(shift.mean()),  # NaN when nothing matched
        "rho_shift_max": float(shift.max()),
        "rho_shift_max_row": None if largest is None else
            {**{k: largest[k] for k in KEY}, "rho_first": float(largest.rho_first), "rho_second": float(largest.rho_second)},
        "outside_interval": int(((merged.rho_second < merged.low_first) | (merged.rho_second > merged.high_first)).sum()),
        "both_distinguishable": len(both),
        "same_sign_of_those": int((both.rho_first * both.rho_second > 0).sum()),
        "verdicts": {pair: int(n) for pair, n in merged.groupby(["verdict_first", "verdict_second"]).size().items()},
        "verdicts_differ": int((merged.verdict_first != merged.verdict_second).sum()),
        "only_first": unmatched(first, second),
        "only_second": unmatched(second, first),
    }


def format_comparison(c: dict) -> str:
    """compare_questions' dict as a few lines of Markdown."""
    lines = [f"{c['matched']} correlations in both runs.",
             f"- rho moves by {c['rho_shift_mean']:.3f} on average, at most {c['rho_shift_max']:.3f}"]
    if c["rho_shift_max_row"]:
        r = c["rho_shift_max_row"]
        lines[-1] += (f" ({r['question']}, {r['model']}, {r['geometry']} vs {r['instability']}: "
                      f"{r['rho_first']:+.3f}, then {r['rho_second']:+.3f})")
    lines += [f"- {c['outside_interval']} of the second run's rhos lie outside the first run's interval",
              f"- {c['both_distinguishable']} distinguishable in both runs, {c['same_sign_of_those']} of them with the same sign",
              f"- {c['verdicts_differ']} verdicts differ",
              "", "| first run | second run | correlations |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {n} |" for (a, b), n in sorted(c["verdicts"].items())]
    for side in ("only_first", "only_second"):
        if c[side]:
            lines.append(f"\n{len(c[side])} only in the {side.split('_')[1]} run: {c[side][:5]}{' ...' if len(c[side]) > 5 else ''}")
    return "\n".join(lines)


def across_replicates(questions: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per correlation of K runs' question tables (name -> table with KEY, family, rho, q, verdict):
    KEY, family, then per run `rho_<name>` and `verdict_<name>`, and

        holds   distinguishable in every run, with the same sign of rho in every run
        sign    +1 / -1 where it holds, 0 elsewhere

    A correlation missing from a run (another set of models or measures) does not hold. The rule is
    conservative on purpose: with K runs of a 5% test it asks every run to agree, so a correlation that
    hinges on one training draw is not reported as a finding."""
    names = list(questions)
    if not names:
        raise ValueError("across_replicates: no runs")
    merged = None
    for name in names:
        t = questions[name][KEY + ["family", "rho", "verdict"]].rename(columns={"rho": f"rho_{name}",
                                                                              "verdict": f"verdict_{name}"})
        merged = t if merged is None else merged.merge(t, on=KEY + ["family"], how="outer", validate="one_to_one")
    found = pd.concat([merged[f"verdict_{n}"] == FOUND for n in names], axis=1).all(axis=1)
    signs = pd.concat([merged[f"rho_{n}"].apply(lambda r: (r > 0) - (r < 0)) for n in names], axis=1)
    agree = signs.nunique(axis=1) == 1
    merged["holds"] = found & agree
    merged["sign"] = signs.iloc[:, 0].where(merged["holds"], 0).astype(int)
    return merged


def findings_text(table: pd.DataFrame, runs: dict[str, str]) -> str:
    """The study's findings as across_replicates' table gives them: every correlation that holds in every run,
    by question and model, with its rho in each run; then the counts, and the circular rows apart.
    `runs`: run name -> what it is (its seeds), in the table's order."""
    names = list(runs)
    rho = lambda r: " / ".join(f"{r[f'rho_{n}']:+.2f}" for n in names)  # noqa: E731
    findings, circular = table[table["family"] == "finding"], table[table["family"] == "circular"]
    per_run = {n: int((findings[f"verdict_{n}"] == FOUND).sum()) for n in names}
    lines = ["# Findings that hold in every training seed", "",
             f"A correlation between geometry change and caption instability is a finding here when it is "
             f"distinguishable after adjustment (results/question.md explains the test) in each of the {len(names)} "
             "runs below, with the same sign in each. The runs differ only in the seeds their models were trained "
             "with:", ""]
    lines += [f"- `{n}`: {what}" for n, what in runs.items()]
    lines += ["", f"Distinguishable per run: {', '.join(f'{n} {k}' for n, k in per_run.items())} of {len(findings)}; "
              f"**{int(findings['holds'].sum())} hold in every run**. Circular correlations (a reconstruction's error "
              f"against the caption made from it) that hold in every run: {int(circular['holds'].sum())} of "
              f"{len(circular)}, listed at the end; they are consistency checks, not findings.", "",
              f"rho: adjusted Spearman rho in each run ({' / '.join(names)}).", ""]
    for question, rows in findings[findings["holds"]].groupby("question", sort=False):
        lines += [f"## The {question} question", ""]
        for model, r in rows.groupby("model", sort=False):
            lines += [f"- **{model}**: " + "; ".join(f"{row['geometry']} vs {row['instability']} {rho(row)}"
                                                      for _, row in r.iterrows())]
        lines.append("")
    if not findings["holds"].any():
        lines += ["No correlation holds in every run.", ""]
    held = circular[circular["holds"]]
    if len(held):
        lines += ["## Circular (consistency checks)", ""]
        lines += [f"- {row['model']}: {row['geometry']} vs {row['instability']} {rho(row)}" for _, row in held.iterrows()]
        lines.append("")
    return "\n".join(lines)
