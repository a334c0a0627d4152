"""conngeo.replicates against hand-worked runs (a pair; three replicates), and scripts/compare_runs.py end to end."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conngeo.replicates import across_replicates, compare_questions, findings_text, format_comparison

ROOT = Path(__file__).resolve().parents[1]
D, N, T = "distinguishable", "not distinguishable", "rests on one image"


def run_table(rows, family="finding"):
    """rows: (model, rho, low, high, m, verdict); one question, split, geometry and instability."""
    return pd.DataFrame([{"question": "q", "family": family, "split": "test", "model": model, "geometry": "g",
                          "instability": "i", "n": 200, "m": m, "rho": rho, "p": 0.5, "low": low, "high": high, "q": 0.5,
                          "verdict": verdict} for model, rho, low, high, m, verdict in rows])


FIRST = run_table([("a", 0.30, 0.20, 0.40, 100, D), ("b", 0.10, 0.00, 0.20, 20, N),
                   ("c", -0.20, -0.30, -0.10, 10, T), ("f", 0.05, -0.05, 0.15, 50, N), ("d", 0.0, -0.1, 0.1, 30, N)])
SECOND = run_table([("a", 0.25, 0.1, 0.4, 90, D), ("b", 0.22, 0.1, 0.3, 14, T),
                    ("c", -0.05, -0.2, 0.1, 16, N), ("f", 0.15, 0.05, 0.25, 60, D), ("e", 0.0, -0.1, 0.1, 30, N)])


def test_hand_worked_pair():
    c = compare_questions(FIRST, SECOND)
    assert c["matched"] == 4                                        # a, b, c, f; d and e have no partner
    assert c["rho_shift_mean"] == pytest.approx((0.05 + 0.12 + 0.15 + 0.10) / 4)
    assert c["rho_shift_max"] == pytest.approx(0.15)
    assert c["rho_shift_max_row"]["model"] == "c"
    assert c["outside_interval"] == 2                               # b: 0.22 > 0.20; c: -0.05 > -0.10; f on its edge
    assert (c["both_distinguishable"], c["same_sign_of_those"]) == (1, 1)
    assert c["verdicts"] == {(D, D): 1, (N, T): 1, (T, N): 1, (N, D): 1}
    assert c["verdicts_differ"] == 3
    assert c["only_first"] == [["q", "test", "d", "g", "i"]] and c["only_second"] == [["q", "test", "e", "g", "i"]]


def test_opposite_signs_are_counted():
    flipped = SECOND.assign(rho=lambda t: t.rho.where(t.model != "a", -0.25))
    assert compare_questions(FIRST, flipped)["same_sign_of_those"] == 0


def test_format_names_the_numbers():
    text = format_comparison(compare_questions(FIRST, SECOND))
    assert "4 correlations in both runs" in text and "3 verdicts differ" in text
    assert f"| {N} | {D} | 1 |" in text and "1 only in the first run" in text


def test_script_reads_folders_and_names_a_missing_file(tmp_path):
    (tmp_path / "one").mkdir()
    FIRST.to_csv(tmp_path / "one" / "question.csv", index=False)
    SECOND.to_csv(tmp_path / "two.csv", index=False)
    script = [sys.executable, str(ROOT / "scripts" / "compare_runs.py")]
    done = subprocess.run(script + [str(tmp_path / "one"), str(tmp_path / "two.csv")], capture_output=True, text=True)
    assert done.returncode == 0 and "3 verdicts differ" in done.stdout
    missing = subprocess.run(script + [str(tmp_path), str(tmp_path / "two.csv")], capture_output=True, text=True)
    assert missing.returncode != 0 and "question.csv: no such file" in missing.stderr


def test_a_finding_holds_only_where_every_replicate_finds_it_with_one_sign():
    runs = {"seed0": run_table([("a", 0.3, 0, 0, 50, D), ("b", 0.2, 0, 0, 50, D), ("c", 0.2, 0, 0, 50, D),
                                ("d", 0.1, 0, 0, 50, N)]),
            "seed1": run_table([("a", 0.2, 0, 0, 50, D), ("b", -0.2, 0, 0, 50, D), ("c", 0.3, 0, 0, 50, T),
                                ("d", 0.2, 0, 0, 50, D)]),
            "seed2": run_table([("a", 0.4, 0, 0, 50, D), ("b", 0.1, 0, 0, 50, D), ("c", 0.3, 0, 0, 50, D),
                                ("d", 0.2, 0, 0, 50, D)])}
    table = across_replicates(runs).set_index("model")
    assert table["holds"].to_dict() == {"a": True, "b": False, "c": False, "d": False}  # b flips sign, c and d miss one
    assert table["sign"].to_dict() == {"a": 1, "b": 0, "c": 0, "d": 0}
    assert list(table.loc["a", ["rho_seed0", "rho_seed1", "rho_seed2"]]) == [0.3, 0.2, 0.4]
    text = findings_text(across_replicates(runs), {"seed0": "zoo.seed 0", "seed1": "zoo.seed 1", "seed2": "zoo.seed 2"})
    assert "**1 hold in every run**" in text and "- **a**: g vs i +0.30 / +0.20 / +0.40" in text
    assert "- **b**" not in text and "Distinguishable per run: seed0 3, seed1 3, seed2 4 of 4" in text


def test_a_correlation_missing_from_one_replicate_does_not_hold():
    runs = {"one": run_table([("a", 0.3, 0, 0, 50, D), ("b", 0.3, 0, 0, 50, D)]), "two": run_table([("a", 0.3, 0, 0, 50, D)])}
    assert across_replicates(runs).set_index("model")["holds"].to_dict() == {"a": True, "b": False}
