"""The trial before the real run (scripts/trial.py), and the walkthrough of docs/real-study.md, command by command:
in a copy of the project, COCO laid out as its downloads unpack (photographs from conngeo.rehearsal, a
Karpathy split file, captions and instances files), the real checkpoints rehearsed where `hf download` puts
them, and every command of the walkthrough run as written that needs neither the network nor a GPU."""

import csv
import json
import re
import shlex
import sys

import pytest
import yaml

from conftest import REHEARSAL_CAPTIONS as CAPTIONS, ROOT, copy_project, place_checkpoints, run
from conngeo.data.images import scan
from conngeo.rehearsal import build_photos

pytestmark = pytest.mark.e2e

DOC = ROOT / "docs" / "real-study.md"
# the Karpathy test split's photographs, of three sizes; one val photograph that the split leaves out
SIZES = [(640, 480), (480, 640), (612, 612), (500, 375)]
SPLITS = ["test", "test", "test", "val"]
TRIAL = 2  # the trial imports --limit of them: the walkthrough's 20 becomes this many here


def commands(text: str) -> list[str]:
    """The shell commands of the doc's indented code blocks (continuation lines joined, comments dropped)."""
    lines, joined = [], ""
    for line in text.splitlines():
        if not line.startswith("    "):
            continue
        code = re.sub(r"\s+#.*$", "", line.strip()) if not line.strip().startswith("#") else ""
        joined += code[:-1] + " " if code.endswith("\\") else code
        if not code.endswith("\\") and joined.strip():
            lines.append(" ".join(joined.split()))
            joined = ""
    return lines


def coco_download(folder):
    """data/coco as the walkthrough's downloads unpack: val2014/, annotations/, dataset_coco.json."""
    paths = build_photos(folder / "val2014", SIZES)
    images, captions, instances, karpathy = [], [], [], []
    for i, path in enumerate(paths):
        name = f"COCO_val2014_{i + 1:012d}.jpg"
        path.rename(folder / "val2014" / name)
        images.append({"id": i + 1, "file_name": name})
        refs = [CAPTIONS[(i + j) % len(CAPTIONS)] for j in range(5)]
        captions += [{"id": 10 * i + j, "image_id": i + 1, "caption": r} for j, r in enumerate(refs)]
        instances.append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2, "iscrowd": int(i == 1)})
        karpathy.append({"filepath": "val2014", "filename": name, "cocoid": i + 1, "split": SPLITS[i],
                         "sentences": [{"raw": r, "tokens": r.lower().split()} for r in refs]})
    (folder / "annotations").mkdir()
    (folder / "annotations/captions_val2014.json").write_text(json.dumps({"images": images, "annotations": captions}))
    (folder / "annotations/instances_val2014.json").write_text(json.dumps({
        "images": images, "annotations": instances, "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}]}))
    (folder / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": karpathy}))


@pytest.fixture(scope="module")
def project(tmp_path_factory, rehearsal_checkpoints):
    """A copy of the project with the downloads in place: COCO under data/coco, the checkpoints under
    data/models/real (hard links to the rehearsal's)."""
    repo = copy_project(tmp_path_factory.mktemp("trial") / "repo")
    coco_download(repo / "data" / "coco")
    place_checkpoints(rehearsal_checkpoints, repo)
    return repo


def walkthrough(prefix: str) -> list[str]:
    found = [c for c in commands(DOC.read_text()) if c.startswith(prefix)]
    assert found, f"{DOC} has no command starting {prefix!r}"
    return found


def run_as_written(command: str, repo, *extra):
    """A command of the walkthrough, run in the project as written (a `python` command with this Python)."""
    argv = shlex.split(command)
    argv = [sys.executable, *argv[1:]] if argv[0] == "python" else argv
    return run(*argv, *extra, cwd=repo)


def test_downloads_are_the_profile_checkpoints():
    """Every `hf download` of the walkthrough is a checkpoint of profiles/real.yaml, at its revision, into its
    source folder, and every checkpoint of the profile is downloaded."""
    real = yaml.safe_load((ROOT / "profiles/real.yaml").read_text())
    wanted = {(e["hub"], e["revision"], e["source"]) for e in real["models"].values() if isinstance(e, dict)}
    wanted |= {(e["hub"], e["revision"], e["source"]) for e in real["references"]["spaces"].values() if e}
    wanted.add((real["score"]["clip"]["hub"], real["score"]["clip"]["revision"], real["score"]["clip"]["source"]))
    wanted.add(("FacebookAI/roberta-large", real["score"]["bertscore_revision"], real["score"]["bertscore_source"]))
    got = set()
    for command in walkthrough("hf download"):
        argv = shlex.split(command)
        got.add((argv[2], argv[argv.index("--revision") + 1], argv[argv.index("--local-dir") + 1]))
    assert got == wanted


def test_the_fingerprint_names_the_processor_the_checkpoint_loads_here(project):
    """LLaVA's preprocessor_config.json names CLIPImageProcessor; transformers loads the torchvision backend's
    class where torchvision imports and the PIL one elsewhere, and the extraction's fingerprint records which."""
    from transformers.utils import is_torchvision_available

    from conngeo.families import adapter_class

    config = json.loads((project / "data/models/real/llava/preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "CLIPImageProcessor"
    got = adapter_class("llava").processor_info(project / "data/models/real/llava")
    assert got == ({"class": "CLIPImageProcessor", "backend": "torchvision"} if is_torchvision_available()
                   else {"class": "CLIPImageProcessorPil", "backend": "pil"})


def test_the_walkthrough_imports_the_karpathy_test_split(project):
    """The trial's import is the first --limit photographs of the test split; the run's, all of the test split;
    every val2014 photograph, the COCO captions file's."""
    trial, split, everything = walkthrough("python scripts/import_coco.py")
    assert "--split test" in split and "--limit" not in split and "--limit 20" in trial
    run_as_written(trial.replace("--limit 20", f"--limit {TRIAL}"), project)
    run_as_written(split, project)
    for root, count in (("data/images/trial", TRIAL), ("data/images/coco", SPLITS.count("test"))):
        items = scan(project / root).items
        assert [it.stem for it in items] == [f"COCO_val2014_{i + 1:012d}" for i in range(count)]
        assert all(len(it.references) == 5 for it in items)
        objects = (project / root / "objects.csv").read_text().splitlines()
        assert objects[:3] == ["stem,dog,cat,crowd", f"{items[0].stem},1,0,", f"{items[1].stem},0,0,cat"]
    run_as_written(everything, project)
    assert len(scan(project / "data/images/coco").items) == len(SIZES)


def test_the_trial_runs_the_real_checkpoints_and_projects(project):
    """The trial as written, on the rehearsal checkpoints at rehearsal size (tests/fixtures/rehearsal.yaml after
    the real profile, in float32) and, for the test's time, on one of the four models (tests/test_rehearsal.py
    runs all four through the same stage scripts): extract -> captions -> score, the captions printed, each
    stage timed, and a projection of time and disk for 5,000 and 40,504 photographs."""
    if not (project / "data/images/trial").is_dir():
        run_as_written(walkthrough("python scripts/import_coco.py")[0].replace("--limit 20", f"--limit {TRIAL}"),
                       project)
    (command,) = walkthrough("python scripts/trial.py")
    models = ("qwen3_5",)
    cpu = ("--profile", "profiles/real.yaml", "--profile", ROOT / "tests/fixtures/rehearsal.yaml")
    out = run_as_written(command, project, *cpu, *(a for m in models for a in ("--model", m))).stdout
    work = project / "data/trial"
    for model in models:
        captions = list(csv.reader((work / "data/captions" / model / "captions.csv").open()))
        assert len(captions) == 1 + TRIAL
        for stem, _, post in captions[1:]:  # each caption printed under its photograph
            assert re.search(rf"^  {stem}: .*\n(    .*\n)*    {model}\s+{re.escape(post)}$", out, re.MULTILINE), stem
        for stage in ("extract", "captions", "score"):
            assert re.search(rf"^  {model}\s+{stage}\s+[\d.]+\s+[\d.]+\s+-?[\d.]+$", out, re.MULTILINE), (model, stage)
            assert re.search(rf"^  {model}\s+{stage}\s+\S+ (s|min|h)\s+\S+ (s|min|h)$", out, re.MULTILINE), (model, stage)
        spec = json.loads((work / "metrics/extract" / f"{model}.json").read_text())["model"]
        assert spec["source"] == str(project / "data/models/real" / model)  # the real profile's folder
        assert spec["processor"]["backend"] in ("pil", "torchvision")
    # the disk projection is the stored vectors' size: 576 x 1024 + 144 x 2560 numbers per Qwen3.5 photograph,
    # float32 here (the rehearsal computes in float32), bf16 on the real run
    qwen = re.search(r"^  qwen3_5\s+vectors\s+(\S+) GiB\s+(\S+) GiB$", out, re.MULTILINE)
    assert qwen and abs(float(qwen.group(1)) - 5000 * (576 * 1024 + 144 * 2560) * 4 / 2**30) < 0.1
    assert "N = 5,000" in out and "N = 40,504" in out
    assert not [*project.glob("data/vectors/**/*.safetensors"), *project.glob("metrics/extract/*")]  # the project's own untouched
    assert (work / "params.yaml").read_text().startswith("# written by scripts/trial.py")

    (project / "data/notes").mkdir()
    (project / "data/notes/mine.txt").write_text("not a trial's")
    proc = run(sys.executable, *shlex.split(command)[1:], *cpu, "--work", "data/notes", cwd=project, check=False)
    assert proc.returncode != 0 and "data/notes: --work is not empty and holds no trial's params.yaml" in proc.stderr
    assert (project / "data/notes/mine.txt").is_file()
