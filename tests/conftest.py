"""Shared fixtures: a throwaway copy of this project that has run `dvc repro` under the smoke profile."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

# The tests' models are tiny: on a busy 2-core machine two OpenMP threads spin far longer than they
# compute (measured ~20x slower per step), and one thread is as fast when the machine is idle.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "GIT_AUTHOR_NAME": "conngeo-test", "GIT_AUTHOR_EMAIL": "test@conngeo.invalid",
    "GIT_COMMITTER_NAME": "conngeo-test", "GIT_COMMITTER_EMAIL": "test@conngeo.invalid",
}


def run(*cmd, cwd, check=True):
    """Run a real CLI (git, dvc, python) and fail with its output if it fails."""
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=ENV, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def copy_project(dest: Path) -> Path:
    """The working tree as git would commit it (tracked + untracked-not-ignored files), in a new repo.

    Pipeline artifacts (data/, metrics/, dvclive/, plots/ and results/ outputs) are left behind: the copy starts clean."""
    listed = run("git", "ls-files", "-co", "--exclude-standard", "-z", cwd=ROOT).stdout.split("\0")
    artifacts = ("data/", "metrics/", "dvclive/", "plots/recon/", "results/", "dvc.lock")
    for rel in filter(None, listed):
        if rel.startswith(artifacts) and not rel.endswith(".gitignore"):
            continue
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    run("git", "init", "-q", "-b", "main", cwd=dest)
    return dest


def tree_digest(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tiny_project(root: Path, name: str, family: str, images_per_shard: int, batch_size: int) -> dict:
    """A project folder for stage scripts run in place: the stages, two shards of toy images, one tiny
    model of `family` saved as `name`, and the params (returned, for the caller to adjust and write)."""
    from conngeo.data import toyworld
    from conngeo.families import adapter_class
    from models_helpers import toy_tokenizer

    shutil.copytree(ROOT / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    toyworld.generate(root / "images", split="study", seed=0, shards=2, images_per_shard=images_per_shard, size=48)
    cls = adapter_class(family)
    cls.tiny(toy_tokenizer(cls.special_tokens), 48, seed=0).save(root / "models" / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(data={"root": "images", "on_bad_image": "error"}, device="cpu", max_window_mb=1,
                  models={name: {"family": family, "source": str(root / "models" / name), "hub": None,
                                 "revision": None, "dtype": "float32", "prompt": "", "image_size": 48}})
    params["extract"].update(batch_size=batch_size, save_every=batch_size)
    return params


@pytest.fixture(scope="session")
def smoke_project(tmp_path_factory) -> Path:
    """A copy of the project, smoke profile applied and committed, after one `dvc repro`."""
    repo = copy_project(tmp_path_factory.mktemp("smoke") / "repo")
    run(sys.executable, "scripts/apply_profile.py", "profiles/smoke.yaml", "--write", cwd=repo)
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-qm", "smoke project", cwd=repo)
    # every stage appends the params keys it read to params_read.jsonl (stages/common.Params)
    ENV["CONNGEO_PARAMS_LOG"] = str(repo.parent / "params_read.jsonl")
    try:
        run("dvc", "repro", cwd=repo)
    finally:
        del ENV["CONNGEO_PARAMS_LOG"]
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-qm", "repro", cwd=repo)
    return repo


# -- the real checkpoints, rehearsed (conngeo.rehearsal) ---------------------------------------------

REHEARSAL_PROMPT = "Describe the image in one short sentence."
REHEARSAL_CAPTIONS = ["A dog sleeps on a red sofa.", "Two cats play on the floor.", "A plate of food on a table.",
                      "A man rides a bicycle down the street.", "A bowl of fruit beside a window.",
                      "a dog on a red plate", "two apples and a banana"]


@pytest.fixture(scope="session")
def rehearsal_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Every real checkpoint of the real profile, rehearsed (full width, random weights, one layer per tower),
    built once per test session: name -> folder (as `hf download --local-dir` leaves it)."""
    from conngeo.rehearsal import build_checkpoint, real_checkpoints

    root = tmp_path_factory.mktemp("checkpoints")
    return {name: build_checkpoint(entry, root / name, layers=1, words=[REHEARSAL_PROMPT, *REHEARSAL_CAPTIONS])
            for name, entry in real_checkpoints().items()}


def place_checkpoints(checkpoints: dict[str, Path], repo: Path) -> None:
    """Put the rehearsal checkpoints where the downloads go, data/models/real/<name>: hard links, no copies."""
    for name, folder in checkpoints.items():
        for path in folder.rglob("*"):
            target = repo / "data/models/real" / name / path.relative_to(folder)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, target)


# -- stage scripts in this process ----------------------------------------------------------------------

class Stages:
    """The project's stage scripts, invoked in this process (no interpreter start per call)."""

    def __init__(self, project):
        self.project = project
        sys.path.insert(0, str(project / "stages"))
        self.modules = {}

    def module(self, name):
        if name not in self.modules:
            spec = importlib.util.spec_from_file_location(f"stage_{name}", self.project / "stages" / f"{name}.py")
            self.modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(self.modules[name])
        return self.modules[name]

    def __call__(self, name, *args, code=0):
        cwd = os.getcwd()
        os.chdir(self.project)
        try:
            result = CliRunner().invoke(self.module(name).app, [str(a) for a in args])
        finally:
            os.chdir(cwd)
        assert result.exit_code == code, f"{name} {args}: exit {result.exit_code}\n{result.output}\n{result.exception!r}"
        return result.output
