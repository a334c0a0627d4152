"""End-to-end: an interrupted `dvc repro` resumes. The long stages declare `persist: true` outputs, so DVC
keeps their finished parts across a kill, and each stage's own fingerprint decides what it may reuse.

A copy of the smoke project (conftest.smoke_project) is run with small extraction parts and many
reconstructor epochs, so that a kill lands in the middle of a stage; `dvc repro` is killed with SIGKILL
(a node failure, a wall-clock limit without grace) mid-extraction and mid-training, then run again: the
stage's own output says it did only the missing work, and the outputs equal an uninterrupted run's
byte for byte. SIGTERM (Slurm's preemption signal) makes a stage finish its current part and exit 143.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ENV, run, tree_digest

pytestmark = pytest.mark.e2e

VECTORS, RECON = Path("data/vectors/llava"), Path("data/recon/llava")
OUTPUTS = (VECTORS, RECON, Path("metrics/extract/llava.json"), Path("metrics/recon/llava.json"))


def digest(repo: Path) -> dict:
    return {str(p): tree_digest(repo / p) if (repo / p).is_dir() else (repo / p).read_bytes() for p in OUTPUTS}


def start(repo: Path, *cmd) -> subprocess.Popen:
    return subprocess.Popen([str(c) for c in cmd], cwd=repo, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"finished before {what}:\n{proc.stdout.read()}")
        if time.time() > deadline:
            raise AssertionError(f"no {what} after {timeout} s")
        time.sleep(0.005)


def kill(proc: subprocess.Popen, sig=signal.SIGKILL) -> str:
    os.killpg(proc.pid, sig)  # dvc and the stage it runs
    out, _ = proc.communicate(timeout=120)
    return out


@pytest.fixture(scope="module")
def repo(smoke_project, tmp_path_factory):
    """The smoke project with extraction parts of 4 images and 30 reconstructor epochs, reproduced once
    without interruption: its outputs are the reference."""
    repo = tmp_path_factory.mktemp("resume") / "repo"
    shutil.copytree(smoke_project, repo, symlinks=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["extract"].update(save_every=4, batch_size=4)
    params["recon"].update(epochs=30, patience=30)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("dvc", "repro", "recon@llava", cwd=repo)
    return repo


def test_sigkill_mid_extraction_and_mid_training_resumes_to_the_same_bytes(repo):
    reference = digest(repo)
    for path in (VECTORS, RECON):
        shutil.rmtree(repo / path)
    images = sum(1 for _ in (repo / "data/images/toyfood").rglob("*.png"))

    # killed after the first finished part of the first shard: the rerun encodes only the rest
    proc = start(repo, "dvc", "repro", "recon@llava")
    wait_for(proc, lambda: any((repo / VECTORS).glob("shard000/parts/part*.safetensors")), "extraction part")
    kill(proc)
    assert not (repo / VECTORS / "shard001" / "index.csv").exists()  # the stage did not finish
    out = run("dvc", "repro", "extract@llava", cwd=repo).stdout
    encoded = int(re.search(r"(\d+) encoded now", out).group(1))
    assert 0 < encoded < images, out

    # killed after a finished epoch of the reconstructor: the rerun resumes at the next one
    proc = start(repo, "dvc", "repro", "recon@llava")
    wait_for(proc, lambda: (repo / RECON / "train_state.safetensors").is_file(), "training state", timeout=600)
    kill(proc)
    out = run("dvc", "repro", "recon@llava", cwd=repo).stdout
    assert re.search(r"resumed an interrupted training at epoch [1-9]\d*", out), out
    assert "encoded now" not in out  # extraction was finished and is not rerun

    assert digest(repo) == reference
    assert "recon@llava" not in run("dvc", "status", "recon@llava", cwd=repo).stdout  # DVC agrees: up to date


def test_sigterm_finishes_the_current_part_and_exits_143(repo):
    """Slurm's preemption: the stage stops at the next part boundary with its parts kept, exit 143; the next
    run completes from them."""
    reference = tree_digest(repo / VECTORS)
    shutil.rmtree(repo / VECTORS)
    proc = start(repo, sys.executable, "stages/extract.py", "--model", "llava")
    wait_for(proc, lambda: (repo / VECTORS / "shard000").is_dir(), "extraction start")
    out = kill(proc, signal.SIGTERM)
    assert proc.returncode == 143, out
    assert "stopped" in out.lower() or "sigterm" in out.lower(), out
    assert "Traceback" not in out
    parts = list((repo / VECTORS).glob("*/parts/part*.safetensors"))
    assert parts, "no finished part kept"
    out = run(sys.executable, "stages/extract.py", "--model", "llava", cwd=repo).stdout
    assert int(re.search(r"(\d+) encoded now", out).group(1)) < sum(1 for _ in (repo / "data/images/toyfood").rglob("*.png"))
    assert tree_digest(repo / VECTORS) == reference
