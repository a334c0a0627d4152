"""The front door: every entry point answers --help, and the commands the README shows exist and run.

The README's heavy commands run elsewhere: `make study` is the CI's end-to-end repro (test_pipeline), the
quick path on sample/ is test_report's `sample_report`, the trial is test_trial, the replicates'
library and compare_runs.py are test_compare (scripts/replicates.py itself only answers --help here), Slurm is
test_slurm. Here: the cheap ones, run as written.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()
ENTRY_POINTS = sorted(p.relative_to(ROOT).as_posix() for folder in ("stages", "scripts", "benchmarks")
                      for p in (ROOT / folder).glob("*.py") if "__main__" in p.read_text())  # not their modules


def shown_commands(text: str) -> list[str]:
    """The command lines of the README's indented code blocks (a trailing comment and `\\` joins undone)."""
    lines, joined = [], ""
    for line in text.splitlines():
        if not line.startswith("    ") or line.strip().startswith(("|", "#")):
            joined = ""
            continue
        joined += line.strip().removesuffix("\\")
        if not line.rstrip().endswith("\\"):
            lines.append(re.sub(r"\s+#.*$", "", joined).strip())
            joined = ""
    return [c for c in lines if c]


def test_every_entry_point_answers_help():
    def help_of(script):
        return script, subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True)

    with ThreadPoolExecutor(2) as pool:
        for script, proc in pool.map(help_of, ENTRY_POINTS):
            assert proc.returncode == 0 and "usage" in proc.stdout.lower(), f"{script} --help:\n{proc.stderr[-2000:]}"


def test_the_readme_names_only_files_that_exist():
    commands = shown_commands(README)
    assert "make study" in commands and "make test" in commands
    for command in commands:
        for word in shlex.split(command):
            if re.fullmatch(r"(stages|scripts|benchmarks|profiles)/[\w./-]+\.(py|yaml|sh)", word):
                assert (ROOT / word).exists(), f"the README's `{command}` names {word}, which is not there"
    for link in re.findall(r"\]\(((?:docs|results|scripts)/[^)#]+)", README):
        assert (ROOT / link).exists(), f"the README links {link}, which is not there"


@pytest.mark.parametrize("command", [c for c in shown_commands(README)
                                     if c.startswith("python scripts/apply_profile.py") and "--write" not in c])
def test_the_readmes_profile_printer_runs_as_written(command):
    proc = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "-S", proc.stdout  # the flags `dvc exp run` takes


def test_the_quick_path_is_the_one_the_report_test_runs():
    assert "python stages/report.py --inputs sample --out /tmp/report" in shown_commands(README)
