"""The perturb and score stages: one model load for every mode and level, a level whose perturbed E_post
equals an earlier level's reuses its caption (and says so), and a run stopped mid-way (SIGTERM, as
Slurm preempts) resumes from its finished parts (a (mode, level) of perturb, a chunk of images of score)
to outputs byte-identical to an uninterrupted run's."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ENV, Stages, tiny_project, tree_digest
from conngeo.models import pretrain
from models_helpers import toy_tokenizer

LEVELS = [0.01, 0.02, 0.25, 0.5]  # the tiny LLaVA has 36 tokens per image: 1, 1, 9 and 18 tokens masked


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("perturb")
    params = tiny_project(root, "llava", "llava", images_per_shard=6, batch_size=6)
    params["captions"].update(max_new_tokens=6, batch_size=4)
    params["perturb"].update(modes=["mask", "lowrank"], levels=LEVELS)
    clip, processor = pretrain.tiny_clip(toy_tokenizer(), image_size=48, patch_size=16, hidden_size=32, num_layers=1,
                                         seed=3)
    clip.save_pretrained(root / "models" / "clip")
    processor.save_pretrained(root / "models" / "clip")
    params["score"]["clip"]["source"] = str(root / "models" / "clip")
    params["score"].update(chunk_size=4, batch_size=2)  # 12 images: three chunks
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    stages = Stages(root)
    try:
        stages("extract", "--model", "llava")
        stages("captions", "--model", "llava", "--no-recon")
    finally:
        sys.path.remove(str(root / "stages"))
    return root


def stage(project, name, *args, **kwargs):
    return subprocess.Popen([sys.executable, f"stages/{name}.py", "--model", "llava", "--threads", "1", *args],
                            cwd=project, env={**ENV, "TQDM_DISABLE": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def perturb(project, out, **kwargs):
    return stage(project, "perturb", "--out", out, **kwargs)


def stop_after(proc, folder: Path, pattern: str) -> str:
    """SIGTERM `proc` once a path matching `pattern` exists under `folder`; its output."""
    deadline = time.time() + 600
    while not any(folder.glob(pattern)):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 143 and "stopped on SIGTERM" in out, out
    return out


def test_identical_perturbations_reuse_their_caption(project):
    proc = perturb(project, "reference")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    first = pd.read_csv(project / "reference/mask/0.01/captions.csv", keep_default_na=False)
    second = pd.read_csv(project / "reference/mask/0.02/captions.csv", keep_default_na=False)
    assert (first["changed"] == 1).all() and (second["changed"] == 1).all()  # the same single token
    assert (second["reused_from"] == "mask/0.01").all() and second["caption"].tolist() == first["caption"].tolist()
    assert "perturb: llava mask/0.02: captioned; 0 images captioned, 12 reused" in out
    third = pd.read_csv(project / "reference/mask/0.25/captions.csv", keep_default_na=False)
    assert (third["changed"] == 9).all() and (third["reused_from"] == "").all()
    assert third["fraction"].tolist() == pytest.approx([9 / 36] * 12)  # the actual fraction, not the level
    assert not (project / "reference/parts.json").exists()  # the ledger goes once every part is done


def test_stopped_run_resumes_to_the_same_captions(project):
    stop_after(perturb(project, "stopped", start_new_session=True), project / "stopped", "mask/0.01/captions.csv")
    finished = sorted(p.parent.relative_to(project / "stopped").as_posix()
                      for p in (project / "stopped").glob("*/*/captions.csv"))
    assert 1 <= len(finished) < 2 * len(LEVELS), finished
    proc = perturb(project, "stopped")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert out.count("kept from an interrupted run") == len(finished)
    assert tree_digest(project / "stopped") == tree_digest(project / "reference")


def test_stopped_scoring_resumes_to_the_same_scores(project):
    """Every caption set scored once uninterrupted, then stopped after its first chunk of images and resumed."""
    args = ("--perturb-root", "reference")
    proc = stage(project, "score", *args, "--out", "scores", "--metrics", "scores.json")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    proc = stage(project, "score", *args, "--out", "stopped_scores", "--metrics", "stopped_scores.json",
                 start_new_session=True)
    stop_after(proc, project / "stopped_scores", "parts/*/0000000-0000004")
    proc = stage(project, "score", *args, "--out", "stopped_scores", "--metrics", "stopped_scores.json")
    out, _ = proc.communicate(timeout=600)
    chunks, scored = map(int, re.search(r"in (\d+) chunks \((\d+) scored now\)", out).groups())
    assert proc.returncode == 0 and chunks == 3 and scored < chunks, out
    assert tree_digest(project / "stopped_scores") == tree_digest(project / "scores")
    assert (project / "stopped_scores.json").read_bytes() == (project / "scores.json").read_bytes()
