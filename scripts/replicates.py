"""Run the study again under other training seeds, and keep only the findings that hold in every run.

    dvc repro                          # the workspace's run: replicate0
    python scripts/replicates.py       # each entry of params.yaml `replicates` as a DVC experiment, then the table

A trained model (the tiny zoo, a connector variant, a reconstructor) is one draw: the report's tests take
it as fixed. Each entry of params `replicates` names the training seeds of one more run (the default study:
the zoo, its frozen encoders, the connector variants and the reconstructor; the real study: the
reconstructor). Each runs as `dvc exp run --temp -n replicate<i> -S <seed>=<value> ...`, outside the
workspace, one after the other (an experiment of that name on this commit with the same seeds is kept).
Then, from each run's results/question.csv (the workspace's and the experiments' commits):

    results/replicates/<run>/question.csv   each run's correlations and verdicts
    results/replicates/question.csv          every correlation's rho and verdict in every run; `holds` where
                                             it is distinguishable, with one sign, in all of them
    results/replicates/findings.md           the findings that hold, generated (conngeo.replicates)

`--collect` only gathers the runs that exist. The runs take about as long as the study each.
"""

import json
import shutil
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pandas as pd
import typer
import yaml

from conngeo.replicates import across_replicates, findings_text

app = typer.Typer(add_completion=False)
OUT = Path("results/replicates")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def experiment_ref(name: str) -> str | None:
    """The ref of experiment `name` on this commit, or on the latest earlier commit whose dvc.lock is this
    one's (commits since then changed nothing the study runs: docs, tests). dvc keeps
    refs/exps/<sha[:2]>/<sha[2:]>/<name>."""
    lock = git("rev-parse", "HEAD:dvc.lock").strip()
    for commit in git("rev-list", "HEAD").split():
        if git("rev-parse", f"{commit}:dvc.lock").strip() != lock:
            return None
        ref = f"refs/exps/{commit[:2]}/{commit[2:]}/{name}"
        if git("for-each-ref", ref).strip():
            return ref
    return None


def experiment_params(ref: str) -> dict:
    return yaml.safe_load(git("show", f"{ref}:params.yaml"))


def lookup(params: dict, dotted: str):
    for key in dotted.split("."):
        params = params[key]
    return params


@app.command()
def main(collect: bool = typer.Option(False, help="only gather the runs that exist; run nothing")):
    """Run every replicate of params `replicates` as a DVC experiment, then write results/replicates/."""
    params = yaml.safe_load(Path("params.yaml").read_text())
    replicates = params.get("replicates") or []
    if not replicates:
        raise SystemExit("params.yaml has no `replicates`: list the training seeds of each further run there")
    if subprocess.run(["dvc", "status", "--quiet"]).returncode != 0:
        raise SystemExit("the workspace's run is not up to date: run `dvc repro` first (it is replicate0)")
    runs = {"replicate0": ", ".join(f"{k} {lookup(params, k)}" for k in replicates[0])}
    questions = {"replicate0": pd.read_csv("results/question.csv")}
    for i, seeds in enumerate(replicates, start=1):
        name = f"replicate{i}"
        ref = experiment_ref(name)
        if ref and any(lookup(experiment_params(ref), k) != v for k, v in seeds.items()):
            ref = None  # made with other seeds: run again
        if ref is None and not collect:
            flags = [f"-S{k}={json.dumps(v)}" for k, v in seeds.items()]
            typer.echo(f"replicates: running {name}: {' '.join(flags)}", err=True)
            subprocess.run(["dvc", "exp", "run", "--temp", "--force", "-n", name, *flags], check=True)
            ref = experiment_ref(name)
        if ref is None:
            typer.echo(f"replicates: {name} has not run; leaving it out", err=True)
            continue
        runs[name] = ", ".join(f"{k} {v}" for k, v in seeds.items())
        questions[name] = pd.read_csv(StringIO(git("show", f"{ref}:results/question.csv")))
    if OUT.exists():
        shutil.rmtree(OUT)
    for name, table in questions.items():
        (OUT / name).mkdir(parents=True)
        table.to_csv(OUT / name / "question.csv", index=False, float_format="%.6g")
    table = across_replicates(questions)
    table.to_csv(OUT / "question.csv", index=False, float_format="%.6g")
    (OUT / "findings.md").write_text(findings_text(table, runs))
    held = table[(table["family"] == "finding") & table["holds"]]
    typer.echo(f"replicates: {len(questions)} runs -> {OUT}: {len(held)} of {int((table['family'] == 'finding').sum())} "
               "correlations hold in every run")


if __name__ == "__main__":
    try:
        app()
    except subprocess.CalledProcessError as err:
        sys.exit(f"replicates: `{' '.join(err.cmd)}` failed (exit {err.returncode}); its output is above")
