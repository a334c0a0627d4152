"""How far two runs of the study agree on its question: `results/question.csv` of one run against
another's (another training seed, another CPU, other params). The report's bootstrap intervals and
permutation tests take the trained models as fixed; this puts a number on what retraining moves.

Plain tables in, a dict out (functional style, as conngeo.report.stats). Outside conngeo.report, so that
the report stage, which does not use it, does not depend on it.
"""

from __future__ import annotations

import pandas as pd

KEY = ["question", "split", "model", "geometry", "instability"]


def compare_questions(first: pd.DataFrame, second: pd.DataFrame, min_changed: int = 15) -> dict:
    """Correlation by correlation (rows matched on KEY; both tables need every KEY column and rho,
    low, high, m, verdict):

        rho_shift        |rho_second - rho_first|: its mean and max, and the row of the max
        outside_interval rows whose rho_second lies outside the first run's interval [low, high]
        both_distinguishable / same_sign_of_those
        verdicts         {(verdict_first, verdict_second): count} over every matched row
        verdicts_differ  rows whose verdicts differ, and of the rows with m >= min_changed in both runs
                         (enough_changed_in_both)
        only_first, only_second: rows without a partner (each run's KEYs, as lists)
    """
    merged = first.merge(second, on=KEY, suffixes=("_first", "_second"), validate="one_to_one")
    shift = (merged.rho_second - merged.rho_first).abs()
    both = merged[(merged.verdict_first == "distinguishable") & (merged.verdict_second == "distinguishable")]
    differ = merged.verdict_first != merged.verdict_second
    enough = (merged.m_first >= min_changed) & (merged.m_second >= min_changed)
    largest = merged.loc[shift.idxmax()] if len(merged) else None

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
        "verdicts_differ": int(differ.sum()),
        "min_changed": min_changed,
        "enough_changed_in_both": int(enough.sum()),
        "verdicts_differ_of_those": int((differ & enough).sum()),
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
              f"- {c['verdicts_differ']} verdicts differ; of the {c['enough_changed_in_both']} with m >= {c['min_changed']} "
              f"in both runs, {c['verdicts_differ_of_those']}",
              "", "| first run | second run | correlations |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {n} |" for (a, b), n in sorted(c["verdicts"].items())]
    for side in ("only_first", "only_second"):
        if c[side]:
            lines.append(f"\n{len(c[side])} only in the {side.split('_')[1]} run: {c[side][:5]}{' ...' if len(c[side]) > 5 else ''}")
    return "\n".join(lines)
