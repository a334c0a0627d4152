"""Benchmark: the fixed cost of one DVC stage, from `dvc repro` starting a stage whose work is nothing to
the next stage's start, against the baseline of a stage that starts the Python interpreter alone.

    .venv/bin/python benchmarks/stage_overhead.py                      # K=10 stages, 3 repetitions (minutes)
    .venv/bin/python benchmarks/stage_overhead.py --stages 5 --repeats 1 --variant python --variant stage
    .venv/bin/python benchmarks/stage_overhead.py --no-chains          # the import timings only

What is measured. For each variant a fresh temporary git + DVC project (git init, dvc init, a commit,
DVC_NO_ANALYTICS=1) gets a chain of K stages: stage i runs the variant's command, then copies stage i-1's
one-line output file to its own (stage 0 copies a seed file), so each depends on the previous one and DVC
runs them in order; outputs are cached as a real stage's are. One untimed `dvc repro` warms up (cache
folders, the OS page cache). Then, per repetition, the seed is rewritten with a new value and `dvc repro`
reruns the whole chain: its wall clock, nothing subtracted, divided by K, is the seconds per stage (DVC
starting the command, the command's own start-up, hashing the deps and outs, caching the output, rewriting
dvc.lock). A second `dvc repro` right after, with nothing to do, is the no-op.

Variants (the stage's command before the copy):
  none      `true`: no interpreter at all, DVC's own per-stage cost (shell and cp included)
  python    `python -c pass`: the interpreter alone (the baseline: ratios are to this)
  torch     `python -c "import torch"`
  families  `python -c "import conngeo.families; conngeo.families.families()"`: every family's transformers classes
  stage     `python <repo>/<--stage-script> --help`: a real stage entry point (typer, common.py and the
            stage's module-level imports) that does nothing; --stage-script picks which (stages/extract.py
            by default: the first per-model stage, whose imports are the model families' own)
  warm      `python <repo>/scripts/warm.py <repo>/<--stage-script> --help`: the same entry point as dvc.yaml
            runs it, in a fork of an interpreter that has torch and transformers imported (scripts/warm.py)

Also measured, outside DVC: the wall time of `python -c <import>` for torch, transformers, dvc,
conngeo.families and conngeo.families.families() (min / median of the repetitions), and a `python -X importtime`
summary of `import conngeo.families; conngeo.families.families()` (the 10 modules of largest cumulative time).

The machine's load matters: on a shared machine run it when idle, and read min (the least disturbed run)
as well as the median. `python` in the stages' commands is this interpreter's (its folder first on PATH).
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {
    **os.environ,
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "GIT_AUTHOR_NAME": "conngeo-bench", "GIT_AUTHOR_EMAIL": "bench@conngeo.invalid",
    "GIT_COMMITTER_NAME": "conngeo-bench", "GIT_COMMITTER_EMAIL": "bench@conngeo.invalid",
}
FAMILIES = "import conngeo.families; conngeo.families.families()"
IMPORTS = {  # label -> python -c code
    "python -c pass": "pass",
    "import dvc": "import dvc",
    "import torch": "import torch",
    "import transformers": "import transformers",
    "import conngeo.families": "import conngeo.families",
    "families()": "from conngeo.families import families; families()",
}
BASELINE = "python"

app = typer.Typer(add_completion=False)


def variant_commands(stage_script: Path) -> dict[str, str]:
    return {
        "none": "true",
        "python": "python -c pass",
        "torch": 'python -c "import torch"',
        "families": f'python -c "{FAMILIES}"',
        "stage": f"python {stage_script} --help > /dev/null",
        "warm": f"python {ROOT / 'scripts' / 'warm.py'} {stage_script} --help > /dev/null",
    }


def run(*cmd, cwd=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=ENV, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def timed(*cmd, cwd=None) -> float:
    start = time.perf_counter()
    run(*cmd, cwd=cwd)
    return time.perf_counter() - start


def chain_yaml(command: str, k: int) -> str:
    lines = ["stages:"]
    for i in range(k):
        src = "seed.txt" if i == 0 else f"o{i - 1:03d}.txt"
        lines += [f"  s{i:03d}:",
                  f"    cmd: {command} && cp {src} o{i:03d}.txt",
                  f"    deps: [{src}]",
                  f"    outs: [o{i:03d}.txt]"]
    return "\n".join(lines) + "\n"


def time_chain(dvc: str, command: str, k: int, repeats: int, keep: Path | None) -> tuple[list[float], list[float]]:
    """(full-chain repro seconds, no-op repro seconds) per repetition, in a fresh project."""
    with tempfile.TemporaryDirectory(prefix="stage_overhead_", dir=keep) as tmp:
        repo = Path(tmp)
        run("git", "init", "-q", "-b", "main", cwd=repo)
        run(dvc, "init", "-q", cwd=repo)
        (repo / "dvc.yaml").write_text(chain_yaml(command, k))
        (repo / "seed.txt").write_text("warm-up\n")
        run("git", "add", "-A", cwd=repo)
        run("git", "commit", "-qm", "chain", cwd=repo)
        run(dvc, "repro", cwd=repo)  # warm-up, untimed
        full, noop = [], []
        for rep in range(repeats):
            (repo / "seed.txt").write_text(f"repetition {rep}\n")
            full.append(timed(dvc, "repro", cwd=repo))
            if (repo / f"o{k - 1:03d}.txt").read_text() != f"repetition {rep}\n":
                raise RuntimeError(f"the chain did not rerun to its last stage in {repo}")
            noop.append(timed(dvc, "repro", cwd=repo))
    return full, noop


def importtime_top(code: str, top: int) -> tuple[float, list[tuple[float, float, str]]]:
    """Total import seconds and the `top` modules by cumulative time: (cumulative s, self s, name)."""
    proc = run(sys.executable, "-X", "importtime", "-c", code)
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cum_us, name = line[len("import time:"):].split("|", 2)
        rows.append((int(cum_us) / 1e6, int(self_us) / 1e6, name[1:].rstrip()))  # "| " then 2 spaces a level
    total = sum(r[0] for r in rows if not r[2].startswith(" "))  # the top-level imports' cumulative times
    return total, sorted(rows, reverse=True)[:top]


def fmt(values: list[float]) -> str:
    return f"{min(values):7.3f} / {statistics.median(values):7.3f}"


@app.command()
def main(
    stages: int = typer.Option(10, "--stages", "-k", help="K: stages in each chain"),
    repeats: int = typer.Option(3, help="timed repetitions of each measurement"),
    variants: list[str] = typer.Option(["none", "python", "torch", "families", "stage", "warm"], "--variant",
                                       help="none, python, torch, families, stage, warm (repeatable)"),
    stage_script: Path = typer.Option(Path("stages/extract.py"),
                                      help="the real stage entry of the `stage` variant (relative to the repo)"),
    chains: bool = typer.Option(True, help="time the DVC chains (--no-chains: the import timings only)"),
    imports: bool = typer.Option(True, help="time the bare imports (--no-imports: the chains only)"),
    top: int = typer.Option(10, help="modules listed from python -X importtime"),
    tmp_dir: Path = typer.Option(None, help="where the temporary projects go (default: the system's)"),
):
    """Print seconds per stage of each variant (min / median) and its ratio to `python -c pass`."""
    dvc = shutil.which("dvc", path=ENV["PATH"])
    if dvc is None:
        raise typer.BadParameter("no `dvc` on PATH or next to this interpreter")
    commands = variant_commands(stage_script if stage_script.is_absolute() else ROOT / stage_script)
    unknown = sorted(set(variants) - set(commands))
    if unknown:
        raise typer.BadParameter(f"unknown variants {unknown}; choose from {list(commands)}")
    print(f"dvc {run(dvc, '--version').stdout.strip()}  python {sys.version.split()[0]}  "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")

    if imports:
        print(f"\nBare start-up, `python -c <code>` wall seconds, min / median of {repeats}:")
        for label, code in IMPORTS.items():
            secs = [timed(sys.executable, "-c", code) for _ in range(repeats)]
            print(f"  {label:24s} {fmt(secs)}")
        total, rows = importtime_top(FAMILIES, top)
        print(f"\npython -X importtime -c '{FAMILIES}': {total:.2f} s of imports; top {top} by cumulative:")
        print(f"  {'cumulative s':>12s} {'self s':>8s}  module")
        for cum, own, name in rows:
            print(f"  {cum:12.3f} {own:8.3f}  {name}")

    if chains:
        print(f"\nChains of K={stages} stages; `dvc repro` wall seconds, min / median of {repeats}:")
        results = {}
        for name in variants:
            full, noop = time_chain(dvc, commands[name], stages, repeats, tmp_dir)
            results[name] = ([s / stages for s in full], noop)
            print(f"  {name}: {commands[name]} ... done", flush=True)
        base = statistics.median(results[BASELINE][0]) if BASELINE in results else None
        print(f"\n{'variant':10s} {'s/stage min / median':>22s} {'ratio to python':>16s} "
              f"{'no-op repro s min / median':>28s}  command")
        for name, (per_stage, noop) in results.items():
            ratio = f"{statistics.median(per_stage) / base:16.2f}" if base else f"{'-':>16s}"
            print(f"{name:10s} {fmt(per_stage):>22s} {ratio} {fmt(noop):>28s}  {commands[name]}")
        print(f"\nper stage = full-chain `dvc repro` / K (nothing subtracted); ratio of medians to `python`, the "
              f"interpreter alone; no-op = a second `dvc repro` of the {stages}-stage chain with nothing to do")


if __name__ == "__main__":
    app()
