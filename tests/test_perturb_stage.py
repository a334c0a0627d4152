"""The perturbation sweep (conngeo.captions.sweep) and the perturb and score stages: one model load for
every mode and level, a level whose perturbed E_post equals an earlier level's reuses its caption (and
says so), N workers then the join write the bytes of one process, and a run stopped mid-way (SIGTERM,
as Slurm preempts) resumes from its finished parts (a window of images of perturb, a chunk of images of
score) to outputs byte-identical to an uninterrupted run's."""

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
from conngeo import interrupt
from conngeo.captions import sweep
from conngeo.data.images import scan
from conngeo.data.vectors import VectorReader, shard_folders
from conngeo.families import load_adapter
from conngeo.zoo import pretrain
from models_helpers import toy_tokenizer

LEVELS = [0.01, 0.02, 0.25, 0.5]  # the tiny LLaVA has 36 tokens per image: 1, 1, 9 and 18 tokens masked


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("perturb")
    params = tiny_project(root, "llava", "llava", images_per_shard=6, batch_size=6)
    params["captions"].update(max_new_tokens=6, batch_size=4)
    params["perturb"].update(modes=["mask", "lowrank"], levels=LEVELS)
    params["threads"] = 1
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
    return subprocess.Popen([sys.executable, f"stages/{name}.py", "--model", "llava", *args],
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
    assert "perturb: llava mask/0.02: 0 images captioned, 12 reused" in out
    third = pd.read_csv(project / "reference/mask/0.25/captions.csv", keep_default_na=False)
    assert (third["changed"] == 9).all() and (third["reused_from"] == "").all()
    assert third["fraction"].tolist() == pytest.approx([9 / 36] * 12)  # the actual fraction, not the level
    assert not (project / "reference/parts.json").exists()  # the ledger goes once every part is done


def test_stopped_run_resumes_to_the_same_captions(project):
    """The stage's own SIGTERM path: a window of 6 images a shard, 2 units; stopped once the first is written
    (the second may finish before the signal lands: the run stops after it, before the join)."""
    stop_after(perturb(project, "stopped", start_new_session=True), project / "stopped", "parts/000-0000000.csv")
    kept = len(list((project / "stopped/parts").glob("*.csv")))
    assert kept in (1, 2) and not list((project / "stopped").glob("*/*/captions.csv"))  # the tables are the join's
    proc = perturb(project, "stopped")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and f"{2 - kept} of 2 windows of images computed now" in out, out
    assert tree_digest(project / "stopped") == tree_digest(project / "reference")


# -- the sweep in this process: split over workers, joined, resumed -----------------------------------

@pytest.fixture(scope="module")
def sweep_inputs(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    spec = params["models"]["llava"]
    adapter = load_adapter(spec["family"], spec["source"], dtype=spec["dtype"], image_size=spec["image_size"])
    pcfg = params["perturb"]
    # a window of one generate batch (4): shards of 6 images -> units at 0 and 4 of each shard
    settings = dict(modes=pcfg["modes"], levels=pcfg["levels"], seed=pcfg["seed"], fill=pcfg["mask_fill"],
                    batch_size=4, max_new_tokens=6, max_window_mb=1e-9)
    return adapter, scan(project / "images"), shard_folders(project / "data/vectors/llava", "extract"), spec, settings


def sweep_run(inputs, out, adapter=None, **kwargs):
    default, folder, shards, spec, settings = inputs
    return sweep.perturbed_captions(adapter or default, folder, shards, out, spec, **settings, **kwargs)


class Unused:
    def __getattr__(self, name):
        pytest.fail(f"the model was used ({name}): every unit was in a part")


@pytest.fixture(scope="module")
def one_process(sweep_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "one"
    summary = sweep_run(sweep_inputs, out)
    assert summary["units"] == summary["computed"] == 4 and not (out / "parts").exists()
    return out, summary


def test_sweep_tables_hold_every_image_of_every_set(one_process, sweep_inputs):
    out, summary = one_process
    stems = [s for f in sweep_inputs[2] for s in VectorReader([f], sides=("post",)).stems]
    names = sweep.set_names(["mask", "lowrank"], LEVELS)
    assert sorted(summary["sets"]) == sorted(names) and sweep.verify_sets(out, names, stems) == []
    for name in names:
        table = pd.read_csv(out / name / "captions.csv", keep_default_na=False)
        assert list(table.columns) == list(sweep.COLUMNS) and table["stem"].tolist() == stems
        assert summary["sets"][name]["reused"] == (table["reused_from"] != "").sum()
    assert summary["sets"]["mask/0.02"] == {"captioned": 0, "reused": 12}  # the same token as at 0.01
    (out / "parts").mkdir()
    assert "partial file left behind" in sweep.verify_sets(out, names, stems)[0]
    (out / "parts").rmdir()


def test_sweep_workers_then_join_equal_one_process(one_process, sweep_inputs, tmp_path):
    out = tmp_path / "sharded"
    computed = [sweep_run(sweep_inputs, out, worker=i, workers=3)["computed"] for i in range(3)]
    assert computed == [2, 1, 1]  # units (shard, start) 0-0, 0-4, 1-0, 1-4 dealt round-robin
    assert sorted(p.name for p in (out / "parts").glob("*.csv")) == [
        f"{s:03d}-{a:07d}.csv" for s in (0, 1) for a in (0, 4)]
    assert not list(out.glob("*/*/captions.csv"))  # the tables are the join's
    summary = sweep_run(sweep_inputs, out, adapter=Unused())
    assert summary["computed"] == 0 and summary["sets"] == one_process[1]["sets"]
    assert tree_digest(out) == tree_digest(one_process[0])


def test_sweep_interrupted_resumes_and_redoes_foreign_parts(one_process, sweep_inputs, tmp_path, monkeypatch):
    out = tmp_path / "stopped"
    monkeypatch.setattr(interrupt, "_requested", True)  # as a SIGTERM would: stop after the unit in progress
    with pytest.raises(interrupt.Preempted, match="images 0-4 of shard000"):
        sweep_run(sweep_inputs, out)
    monkeypatch.setattr(interrupt, "_requested", False)
    first = out / "parts" / "000-0000000.csv"
    assert [p.name for p in (out / "parts").iterdir()] == [first.name]
    # a part of other settings (another seed) is not taken: recomputed, and said so
    other = tmp_path / "other"
    default, folder, shards, spec, settings = sweep_inputs
    sweep.perturbed_captions(default, folder, shards, other, spec, **{**settings, "seed": 1}, worker=1, workers=2)
    (other / "parts" / "000-0000004.csv").rename(out / "parts" / "000-0000004.csv")
    summary = sweep_run(sweep_inputs, out)
    assert summary["computed"] == 3 and summary["ignored"] == [out / "parts" / "000-0000004.csv"]
    assert tree_digest(out) == tree_digest(one_process[0])


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
