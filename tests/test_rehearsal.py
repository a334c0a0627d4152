"""The real study, rehearsed end to end without a GPU or a download: the real profile (profiles/real.yaml)
with every model and reference on a random-weight checkpoint of its real architecture at full width
(conngeo.rehearsal, one layer per tower) where `hf download --local-dir` would put it, photographs
of five sizes and aspect ratios imported from a COCO-format fixture with several references each, and the
real `dvc repro` from extract to report."""

import json
import sys

import pytest
import yaml

from conftest import REHEARSAL_CAPTIONS as CAPTIONS, ROOT, copy_project, place_checkpoints, run
from conngeo.rehearsal import build_photos

pytestmark = pytest.mark.e2e

# five sizes and aspect ratios; seven photographs, so that the split by stem has train, val and test images
SIZES = [(640, 480), (480, 640), (500, 375), (612, 612), (2048, 1536), (640, 480), (612, 612)]
IMAGES = len(SIZES)
# image_size of the real profile -> E_pre / E_post tokens x width per image (item 1 of the real study)
SHAPES = {"llava": ((576, 1024), (576, 4096)), "idefics2": ((576, 1152), (64, 4096)),
          "qwen2_5vl": ((576, 1280), (144, 3584)), "qwen3_5": ((576, 1024), (144, 2560))}


def coco_fixture(folder):
    """A COCO-format captions and instances file over the generated photographs (3-5 captions each)."""
    paths = build_photos(folder / "val2014", SIZES)
    images, captions, instances = [], [], []
    for i, path in enumerate(paths):
        name = f"COCO_val2014_{i + 1:012d}.jpg"
        path.rename(folder / "val2014" / name)
        images.append({"id": i + 1, "file_name": name})
        for j in range(3 + i % 3):
            captions.append({"id": len(captions) + 1, "image_id": i + 1, "caption": CAPTIONS[(i + j) % 5]})
        instances += [{"id": len(instances) + 1, "image_id": i + 1, "category_id": 1 + (i + j) % 3} for j in range(i % 4)]
    categories = [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 3, "name": "bowl"}]
    (folder / "captions.json").write_text(json.dumps({"images": images, "annotations": captions}))
    (folder / "instances.json").write_text(json.dumps({"images": images, "annotations": instances,
                                                       "categories": categories}))


@pytest.fixture(scope="session")
def rehearsal(tmp_path_factory, rehearsal_checkpoints):
    """A copy of the project under the real profile at rehearsal size, after one `dvc repro`."""
    repo = copy_project(tmp_path_factory.mktemp("rehearsal") / "repo")
    coco = tmp_path_factory.mktemp("coco")
    coco_fixture(coco)
    run(sys.executable, "scripts/import_coco.py", "--captions", coco / "captions.json", "--images", coco / "val2014",
        "--instances", coco / "instances.json", "--out", "data/images/coco", "--shard-size", "4", cwd=repo)
    place_checkpoints(rehearsal_checkpoints, repo)  # where the download puts them
    for profile in (ROOT / "profiles/real.yaml", ROOT / "tests/fixtures/rehearsal.yaml"):
        run(sys.executable, "scripts/apply_profile.py", profile, "--write", cwd=repo)
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-qm", "rehearsal of the real study", cwd=repo)
    run("dvc", "repro", cwd=repo)
    return repo


def test_no_toy_stage_in_the_real_pipeline(rehearsal):
    stages = run("dvc", "stage", "list", "--name-only", cwd=rehearsal).stdout.split()
    assert not [s for s in stages if s.startswith(("toyworld", "pretrain", "zoo", "train_connector"))]
    assert not (rehearsal / "data/images/toyfood").exists() and not (rehearsal / "data/zoo/llava").exists()


def test_every_image_of_a_model_has_the_token_shape_of_its_image_size(rehearsal):
    from conngeo.data.vectors import VectorReader

    for model, (pre, post) in SHAPES.items():
        folders = sorted((rehearsal / "data/vectors" / model).iterdir())
        reader = VectorReader(folders)
        assert len(reader) == IMAGES
        assert (reader.tokens("pre"), reader.width["pre"]) == pre, model
        assert (reader.tokens("post"), reader.width["post"]) == post, model
        assert reader.dtype == {"pre": "F32", "post": "F32"}  # as the model computed them (float32 here)


def test_captions_from_the_stored_post_equal_native_generation(rehearsal):
    """The captions stage generates from the stored E_post: native generation from the pixels gives
    the same token ids and first-step logits as generation from the stored E_post, and the same captions as
    the stage wrote, in every family; and the settings are recorded (plain greedy, stop tokens)."""
    from conngeo.captions import read_table
    from conngeo.data.images import load_image, scan
    from conngeo.data.vectors import VectorReader
    from conngeo.families import load_adapter
    from conngeo.families.base import same_generation

    params = yaml.safe_load((rehearsal / "params.yaml").read_text())
    items = {it.stem: it for it in scan(rehearsal / "data/images/coco").items}
    for model in SHAPES:
        table = read_table(rehearsal / "data/captions" / model / "captions.csv")
        spec = params["models"][model]
        adapter = load_adapter(spec["family"], rehearsal / spec["source"], revision=spec["revision"],
                               dtype=spec["dtype"], prompt=spec["prompt"], image_size=spec["image_size"])
        stems, new_tokens = table["stem"][:2], params["captions"]["max_new_tokens"]
        images = [load_image(items[stem].path) for stem in stems]
        assert adapter.generate(images, max_new_tokens=new_tokens) == table["post"][:2], model
        reader = VectorReader(sorted((rehearsal / "data/vectors" / model).iterdir()))
        stored = list(reader.read("post", [reader.stems.index(stem) for stem in stems]))
        native = adapter.generate_ids(images, max_new_tokens=new_tokens, with_logits=True)
        assert same_generation(adapter.generate_ids(images, post=stored, max_new_tokens=new_tokens, with_logits=True),
                               native), model
        settings = json.loads((rehearsal / "metrics/captions" / f"{model}.json").read_text())["generation"]
        assert settings["decoding"] == "greedy" and settings["repetition_penalty"] == 1.0
        del adapter
    qwen = json.loads((rehearsal / "metrics/captions/qwen2_5vl.json").read_text())["generation"]
    assert "<|im_end|>" in qwen["stop_tokens"] and qwen["ignored_from_checkpoint"]["repetition_penalty"] == 1.05
    idefics2 = json.loads((rehearsal / "metrics/captions/idefics2.json").read_text())["generation"]
    assert "<end_of_utterance>" in idefics2["stop_tokens"]


def test_several_references_reach_the_scores_and_the_report_is_written(rehearsal):
    score = json.loads((rehearsal / "metrics/score/llava.json").read_text())
    assert score["references"] == {"per_image_max": 5, "images_without": 0}
    assert score["bertscore"]["model"] == "roberta-large" and score["bertscore"]["rescale_with_baseline"]
    assert score["clipscore"]["clip"] == "openai/clip-vit-large-patch14"
    assert "truth" not in score and "truth_exact" not in (rehearsal / "data/scores/llava/post.csv").read_text()
    for rel in ("results/summary.md", "results/question.md", "results/figures/question.png"):
        assert (rehearsal / rel).is_file(), rel
    assert (rehearsal / "data/images/coco/objects.csv").read_text().startswith("stem,dog,cat,bowl")
