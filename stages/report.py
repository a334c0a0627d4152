"""Stage report: every figure and table of the study from the upstream stages' outputs, no model needed.

    results/summary.csv, summary.md     per model: KNOR, erank, reconstruction (test) vs its baselines, the
                                        error that reaches the LM, probes, caption scores, perturbation
                                        sensitivity on the actual fraction, and the reference spaces' probes
    results/question.csv, question.md   both questions (reconstruction, perturbation): Spearman rho, permutation
                                        p, BH q over the family, m, bootstrap CI, verdict; the answer in words
    results/figures/*.png               the figures (README, Report)
    results/series/*.csv                the figures' series, declared as dvc plots
    results/connectors.csv, .md         with connector variants in the study: each connector kind on
                                        the same base against KNOR, reconstruction, accuracy, sensitivity
    results/examples/index.html         the images behind the numbers, per model (conngeo.report.examples):
                                        thumbnails from the image root (params data.root under --inputs)

The work is conngeo.report.study.write_report. The quick path reads a committed sample in the same layout, with the params it was made with:
    python stages/report.py --inputs sample --out /tmp/report
"""

import time
from pathlib import Path

import typer

from common import load_params, run
from conngeo.report.study import write_report

app = typer.Typer(add_completion=False)


@app.command()
def main(
    inputs: Path = typer.Option(Path("."), help="root holding params.yaml, data/ and metrics/ (the project, or sample/)"),
    out: Path = typer.Option(Path("results"), help="output folder"),
    bootstrap: int = typer.Option(None, help="bootstrap resamples (default: params report.bootstrap; stated in question.md)"),
    permutations: int = typer.Option(None, help="permutations per test (default: params report.permutations; stated in question.md)"),
):
    """Figures, summary tables and the two questions' correlations from the geometry, recon_eval, captions and score outputs."""
    start = time.perf_counter()
    if not (inputs / "params.yaml").is_file():
        raise SystemExit(f"{inputs / 'params.yaml'}: not found; --inputs is the project root or a sample folder "
                         "made by scripts/make_sample.py")
    params = load_params(inputs / "params.yaml")
    n_boot = params["report"]["bootstrap"] if bootstrap is None else bootstrap
    n_perm = params["report"]["permutations"] if permutations is None else permutations
    line = write_report(params, inputs, out, n_boot, n_perm)
    typer.echo(f"report: {line} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run(app)
