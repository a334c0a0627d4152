"""conngeo.replicates against a hand-worked pair of runs, and scripts/compare_runs.py end to end."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conngeo.replicates import compare_questions, format_comparison

ROOT = Path(__file__).resolve().parents[1]
D, N, T = "distinguishable", "not distinguishable", "too few changed images"


def run_table(rows):
    """rows: (model, rho, low, high, m, verdict); one question, split, geometry and instability."""
    return pd.DataFrame([{"question": "q", "split": "test", "model": model, "geometry": "g", "instability": "i",
                          "n": 200, "m": m, "rho": rho, "p": 0.5, "low": low, "high": high, "q": 0.5, "verdict": verdict}
                         for model, rho, low, high, m, verdict in rows])


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
    assert (c["enough_changed_in_both"], c["verdicts_differ_of_those"]) == (2, 1)   # a and f; f differs
    assert c["only_first"] == [["q", "test", "d", "g", "i"]] and c["only_second"] == [["q", "test", "e", "g", "i"]]


def test_opposite_signs_are_counted():
    flipped = SECOND.assign(rho=lambda t: t.rho.where(t.model != "a", -0.25))
    assert compare_questions(FIRST, flipped)["same_sign_of_those"] == 0


def test_min_changed_moves_the_enough_count():
    assert compare_questions(FIRST, SECOND, min_changed=10)["enough_changed_in_both"] == 4


def test_format_names_the_numbers():
    text = format_comparison(compare_questions(FIRST, SECOND))
    assert "4 correlations in both runs" in text and "3 verdicts differ; of the 2 with m >= 15 in both runs, 1" in text
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
