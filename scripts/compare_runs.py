"""Compare two runs of the study on its question: how far rho moves and which verdicts change between
one run's `question.csv` and another's (another seed, another CPU, other params).

    python scripts/compare_runs.py results results/replicates/replicate1

Each argument is a results folder (holding question.csv) or a question.csv file; the first is the
reference whose bootstrap intervals the second's rhos are checked against. To compare an experiment
with the committed run: `git show <branch or exp branch>:results/question.csv > q.csv` (`dvc exp branch`
makes a branch of an experiment). scripts/replicates.py compares K runs that differ in their training seeds.
"""

from pathlib import Path

import pandas as pd
import typer

from conngeo.replicates import compare_questions, format_comparison

app = typer.Typer(add_completion=False)


def read_question(path: Path) -> pd.DataFrame:
    csv = path / "question.csv" if path.is_dir() else path
    if not csv.is_file():
        raise SystemExit(f"{csv}: no such file; give a results folder with question.csv (dvc repro writes results/) or the csv itself")
    return pd.read_csv(csv)


@app.command()
def main(
    first: Path = typer.Argument(..., help="the reference run: a results folder or its question.csv"),
    second: Path = typer.Argument(..., help="the other run: a results folder or its question.csv"),
):
    """Print, as Markdown, how far the second run's correlations and verdicts are from the first's."""
    typer.echo(format_comparison(compare_questions(read_question(first), read_question(second))))


if __name__ == "__main__":
    app()
