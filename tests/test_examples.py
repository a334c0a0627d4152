"""The examples page (conngeo.report.examples): the word diff, the selection by hand, escaping of stems,
captions and references (commas, quotes, non-ASCII, markup), thumbnails and the page's size bound, how it
degrades where neighbours or images are missing; the geometry stage's neighbours table against brute force;
make_sample carrying the images the page shows; and pages in a real browser (headless Chromium; the
committed sample's page is opened in test_report.py)."""

import itertools
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from conngeo import layout
from conngeo.data.vectors import write_shard
from conngeo.report import examples, tables
from conngeo.report.examples import extremes, marked, reconstruction_examples, unstable_examples, word_diff
from page_helpers import browser_check

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample"
SETTINGS = {"changed": 4, "identical": 2, "unstable": 2, "neighbourhoods": 2, "neighbours": 3, "thumbnail": 32}
ODD = ["plain", "a,b", 'say "cheese"', "it's", "café_ñ", "日本語", "<b>bold", "a b&c", "x;y=1", "tab\tin"]


class Tags(HTMLParser):
    """Every start tag of a page with its attributes, and its text."""

    def __init__(self, page: str):
        super().__init__()
        self.tags, self.text = [], []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag, cls=None):
        return [a for t, a in self.tags if t == tag and (cls is None or cls in a.get("class", "").split())]


# -- the word diff ------------------------------------------------------------------------------------------

def test_word_diff_by_hand():
    assert word_diff("a red apple on a plate", "a green apple on a plate") == [
        ("same", "a"), ("del", "red"), ("ins", "green"), ("same", "apple on a plate")]
    assert word_diff("two apples", "two apples") == [("same", "two apples")]
    assert word_diff("", "an egg") == [("ins", "an egg")] and word_diff("an egg", "") == [("del", "an egg")]
    assert word_diff("", "") == []
    ops = word_diff("a red apple", "a green apple and a pear")
    assert marked(ops, "before") == "a <del>red</del> apple"
    assert marked(ops, "after") == "a <ins>green</ins> apple <ins>and a pear</ins>"
    assert marked(ops) == "a <del>red</del> <ins>green</ins> apple <ins>and a pear</ins>"
    assert marked([]) == '<span class="empty">(empty)</span>'


def test_word_diff_keeps_every_word_once_and_escapes():
    """Independent of difflib: the kept and deleted words are the first caption, the kept and inserted ones
    the second, over every pair of a few sentences."""
    sentences = ["a red apple", "two red apples on a plate", "", "a a a", "the plate is red", "an apple a pear"]
    for a, b in itertools.product(sentences, repeat=2):
        ops = word_diff(a, b)
        assert " ".join(w for op, w in ops if op != "ins").split() == a.split()
        assert " ".join(w for op, w in ops if op != "del").split() == b.split()
        assert all(op == "same" for op, _ in ops) == (a.split() == b.split())
    html = marked(word_diff('<img src=x onerror="y"> & co', "<b>bold</b> & co"))
    assert "<img" not in html and "<b>" not in html
    assert "&lt;img" in html and "&quot;y&quot;&gt;" in html and "&lt;b&gt;bold&lt;/b&gt;" in html and "&amp;" in html


# -- the selection --------------------------------------------------------------------------------------------

def test_reconstruction_examples_by_hand():
    t = pd.DataFrame({
        "split": ["test", "test", "test", "test", "train", "test", "test"],
        "post": ["a b", "a b", "a b", "a b", "a b", "x", np.nan],
        "recon": ["a c", "a d", "a b", "a e", "zz", "x", np.nan],
        "bertscore_instability": [0.2, 0.2, 0.0, 0.5, 0.9, 0.0, 0.0],
        "lm_error": [0.1, 0.3, 0.7, 0.2, 5.0, 0.9, np.nan],
    }, index=["c1", "c2", "same1", "c3", "train", "same2", "empty"])
    changed, identical = reconstruction_examples(t, changed=10, identical=10)
    assert changed == ["c3", "c2", "c1"]         # 1 - F1 first, then the larger lm_error; the train image never
    assert identical == ["same2", "same1"]       # the largest lm_error first; NaN left out of the ranking
    assert reconstruction_examples(t, 1, 1) == (["c3"], ["same2"])


def test_extremes_and_unstable_examples_by_hand():
    v = pd.Series([0.5, 0.1, 0.5, np.nan, 0.0, 0.0, 0.9], index=["b", "c", "a", "nan", "z", "y", "d"])
    assert extremes(v, 2) == (["d", "a"], ["y", "z"])            # ties by stem, NaN left out
    assert extremes(v, 4) == (["d", "a", "b", "c"], ["y", "z"])  # never the same image twice
    assert unstable_examples(v, 10) == (["d", "a", "b", "c"], ["y", "z"])  # "most unstable": moved only
    assert unstable_examples(pd.Series([0.0, 0.0], index=["q", "p"]), 2) == ([], ["p", "q"])


def test_select_with_and_without_neighbours():
    t = pd.DataFrame({"split": "test", "post": "a", "recon": "a", "bertscore_instability": 0.0,
                      "lm_error": [0.1, 0.2, 0.3, 0.4], "mask_instability": [0.0, 0.2, 0.1, 0.0],
                      "knor_change": [0.9, 0.1, 0.5, 0.7]}, index=["s0", "s1", "s2", "s3"])
    neighbours = pd.DataFrame({"pre_1": ["s1", "s0", "s3", "s2"], "pre_2": ["s2", "s3", "s0", "s1"],
                               "post_1": ["s2", "s2", "s1", "s0"], "post_2": ["s3", "s0", "s3", "s1"]},
                              index=pd.Index(["s0", "s1", "s2", "s3"], name="stem"))
    settings = {**SETTINGS, "neighbourhoods": 1, "neighbours": 2}
    sel = examples.select(t, neighbours.drop(index="s0"), ["mask"], settings)  # s0 has no row: not chosen
    assert sel.changed == [] and sel.identical == ["s3", "s2"]
    assert sel.unstable == {"mask": (["s1", "s2"], ["s0", "s3"])}
    assert sel.neighbourhoods == (["s3"], ["s1"])
    assert sel.neighbours == {"s3": (["s2", "s1"], ["s0", "s1"]), "s1": (["s0", "s3"], ["s2", "s0"])}
    assert sel.stems() == {"s0", "s1", "s2", "s3"}
    bare = examples.select(t, None, ["mask"], settings)
    assert bare.neighbourhoods == ([], []) and bare.neighbours == {}


# -- the page -------------------------------------------------------------------------------------------------

def study(tmp_path: Path, stems: list[str], image_size=(20, 14), models=("m1", "m2")) -> dict:
    """write_page's arguments for a small made-up study of `stems` (images and references on disk, the
    neighbours table through its CSV), built with the report's own tables.per_image."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for i, stem in enumerate(stems):
        (root / "shard000").mkdir(parents=True, exist_ok=True)
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        Image.new("RGB", image_size, colour).save(root / "shard000" / f"{stem}.png")
        (root / "shard000" / f"{stem}.txt").write_text(f"ref of {stem} <i>&</i>\nsecond \"ref\"\n", encoding="utf-8")
    levels, n = [0.25, 0.5], len(stems)
    data, per_image, neighbours = {}, {}, {}
    for model in models:
        idx = pd.Index(stems, name="stem")
        post = [f"a red apple number {i} <script>alert(1)</script>" for i in range(n)]
        recon = [p if i % 3 else p.replace("red", "green") for i, p in enumerate(post)]
        knn = pd.DataFrame({"knor_pre_post@3": rng.uniform(size=n), "distortion@3": rng.uniform(size=n),
                            "erank_pre": rng.uniform(2, 4, n), "erank_post": rng.uniform(1, 3, n)}, index=idx)
        split = pd.DataFrame({"split": ["test"] * (n - 2) + ["train"] * 2, "mse_z": rng.uniform(size=n),
                              "cosine": rng.uniform(size=n)}, index=idx)
        captions = pd.DataFrame({"post": post, "recon": recon, "recon_post_mse_z": rng.uniform(size=n)}, index=idx)
        scores = {"post": pd.DataFrame({"clipscore": rng.uniform(size=n)}, index=idx),
                  "recon": pd.DataFrame({"clipscore": rng.uniform(size=n),
                                         "stability_f1": [1.0 if a == b else 0.8 for a, b in zip(post, recon)]},
                                        index=idx)}
        for lv in levels:
            moved = rng.uniform(size=n) < lv
            scores[f"mask_{lv}"] = pd.DataFrame({"caption": [p.replace("apple", "pear") if c else p for p, c in
                                                             zip(post, moved)],
                                                 "fraction": lv, "stability_f1": np.where(moved, 0.7, 1.0),
                                                 "relative_change": lv / 2}, index=idx)
        m = tables.ModelInputs(model, knn, {}, None, split, {}, None, captions, scores, None)
        data[model] = m
        per_image[model] = tables.per_image(m, tables.measures(["mask"], levels), {"k": 3, "fractions": {"mask": 0.5}},
                                            pd.DataFrame({"food_count": 1}, index=idx))
        table = pd.DataFrame({"stem": stems, **{f"{side}_{j + 1}": [stems[(i + j + 1 + (side == "post")) % n]
                                                                    for i in range(n)]
                                                for side in ("pre", "post") for j in range(3)}})
        path = layout.data("geometry", model, tmp_path) / "neighbours.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(path, index=False)
        neighbours[model] = examples.read_neighbours(tmp_path, model)
    return dict(data=data, per_image=per_image, neighbours=neighbours, image_root=root, modes=["mask"],
                levels=levels, fractions={"mask": 0.5}, k=3, settings=SETTINGS)


def test_page_escapes_odd_stems_captions_and_references(tmp_path):
    args = study(tmp_path, ODD)
    assert set(args["neighbours"]["m1"].index) == set(ODD)  # the CSV round trip keeps every stem
    page = examples.write_page(tmp_path / "out" / "examples", **args)
    html = page.read_text(encoding="utf-8")
    parsed = Tags(html)
    # nothing from the inputs becomes markup: the only tags are the page's own
    assert {t for t, _ in parsed.tags} <= {"html", "head", "meta", "title", "style", "body", "header", "h1", "p",
                                           "code", "nav", "a", "section", "h2", "h3", "table", "thead", "tbody",
                                           "tr", "th", "td", "figure", "img", "figcaption", "span", "ul", "li",
                                           "del", "ins", "div"}
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "ref of &lt;b&gt;bold &lt;i&gt;&amp;&lt;/i&gt;" in html and "second &quot;ref&quot;" in html
    text = "".join(parsed.text)
    for stem in ODD:  # every stem reads back as itself, and its thumbnail is a file beside the page
        assert stem in text
    images = parsed.all("img")
    assert {i["alt"] for i in images} == set(ODD)
    for img in images:
        assert img["src"].startswith("thumbs/") and (page.parent / img["src"]).is_file()
    # a model picker and an anchor per section, each section with rows
    ids = {a["id"] for _, a in parsed.tags if "id" in a}
    assert {"m1", "m1-reconstruction", "m1-mask", "m1-neighbours", "m2", "m2-neighbours"} <= ids
    assert {a["href"] for a in parsed.all("a")} >= {"#m1", "#m2", "#m1-mask", "#m2-neighbours"}
    csp = [m for m in parsed.all("meta") if m.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]["content"]


def test_page_is_deterministic_replaced_whole_and_bounded(tmp_path):
    stems = [f"img{i:03d}" for i in range(60)]
    args = study(tmp_path, stems, image_size=(400, 300))
    out = tmp_path / "out" / "examples"
    out.mkdir(parents=True)
    (out / "stale.jpg").write_bytes(b"old")
    page = examples.write_page(out, **args)
    files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert Path("stale.jpg") not in files and not (tmp_path / "out" / "examples.tmp").exists()
    assert examples.write_page(out, **args) == page
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    # the size bound: a fixed number of thumbnails per model, none over the thumbnail size
    thumbs = sorted(out.glob("thumbs/*.jpg"))
    s = SETTINGS
    per_model = s["changed"] + s["identical"] + 2 * s["unstable"] + 2 * s["neighbourhoods"] * (1 + 2 * s["neighbours"])
    assert 0 < len(thumbs) <= 2 * per_model
    for path in thumbs:
        with Image.open(path) as img:
            assert img.format == "JPEG" and max(img.size) == s["thumbnail"] and img.size == (32, 24)
    # a thumbnail is never enlarged
    small = study(tmp_path / "small", stems[:10], image_size=(12, 9))
    examples.write_page(tmp_path / "small" / "examples", **small)
    assert {Image.open(p).size for p in (tmp_path / "small" / "examples" / "thumbs").iterdir()} == {(12, 9)}


def test_page_degrades_where_neighbours_or_images_are_missing(tmp_path):
    args = study(tmp_path, [f"s{i}" for i in range(12)])
    args["neighbours"]["m2"] = None
    gone = args["neighbours"]["m1"].loc["s0", "pre_1"]  # a neighbour the page shows, not in this "sample"
    html_before = examples.write_page(tmp_path / "a", **args).read_text()
    assert "not in this sample" not in html_before.split('id="m2-neighbours"')[0]
    (args["image_root"] / "shard000" / f"{gone}.png").unlink()
    html = examples.write_page(tmp_path / "b", **args).read_text()
    parsed = Tags(html)
    assert "no neighbours table" in html and "dvc repro geometry@m2" in html
    assert f"are not under {args['image_root']}" in html and gone in html
    assert parsed.all("span", "missing") and gone not in {i["alt"] for i in parsed.all("img")}
    # without any image root the page still has every section, each with a row
    args["image_root"] = tmp_path / "nowhere"
    html = examples.write_page(tmp_path / "c", **args).read_text()
    assert "<img" not in html and html.count('class="examples"') == 2 * 3


def test_page_in_a_browser_with_odd_stems(tmp_path):
    page = examples.write_page(tmp_path / "examples", **study(tmp_path, ODD))
    report = browser_check(page)
    assert report.problems == []
    assert len(report.images) > len(ODD) and len(report.sections) == 2 * 3
    assert all(r.startswith("file:") for r in report.requests)


def test_the_browser_check_finds_what_is_wrong(tmp_path):
    """The check can fail: an image from the network, one that is not there, a section without rows."""
    (tmp_path / "thumbs").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "thumbs" / "ok.jpg")
    (tmp_path / "index.html").write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; img-src 'self'\"></head><body>"
        '<img src="thumbs/ok.jpg"><img src="thumbs/gone.jpg"><img src="http://127.0.0.1:9/x.png">'
        '<section class="examples" id="full"><table><tbody><tr><td>a</td></tr></tbody></table></section>'
        '<section class="examples" id="empty"><table><tbody></tbody></table></section></body></html>')
    report = browser_check(tmp_path / "index.html", tmp_path / "shot.png")
    assert sorted(report.problems) == sorted([
        "image not loaded: thumbs/gone.jpg", "image not loaded: http://127.0.0.1:9/x.png",
        "section without rows: #empty", "request left the file system: http://127.0.0.1:9/x.png",
        "blocked by the page's Content-Security-Policy: http://127.0.0.1:9/x.png (img-src)"])
    with Image.open(tmp_path / "shot.png") as shot:
        assert shot.size == (1280, 800)


# -- the geometry stage's neighbours and make_sample --------------------------------------------------------------

def test_geometry_stage_writes_each_images_nearest_neighbours_by_stem(tmp_path):
    """neighbours.csv against brute force on the mean-pooled vectors (L2, the image itself excluded)."""
    stems = ODD + [f"img{i}" for i in range(14)]
    gen = torch.Generator().manual_seed(0)
    pre = [torch.randn(3, 4, generator=gen, dtype=torch.float64).float() for _ in stems]
    post = [torch.randn(2, 5, generator=gen, dtype=torch.float64).float() for _ in stems]
    write_shard(tmp_path / "data/vectors/m/shard000", stems, pre, post)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["references"]["spaces"] = {}
    params["geometry"].update(ks=[3, 5], neighbours=4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "geometry.py"), "--model", "m"], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr
    table = examples.read_neighbours(tmp_path, "m")
    assert list(table.index) == stems and list(table.columns) == [f"{s}_{j}" for s in ("pre", "post") for j in range(1, 5)]
    for side, mats in (("pre", pre), ("post", post)):
        x = np.stack([m.mean(0).double().numpy() for m in mats])
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        expected = np.array(stems, dtype=object)[np.argsort(d, axis=1, kind="stable")[:, :4]]
        assert (table[[f"{side}_{j}" for j in range(1, 5)]].to_numpy() == expected).all(), side


def test_make_sample_carries_the_images_its_page_shows(tmp_path):
    """A project made of the committed sample, an image for each of its stems and a neighbours table per
    model: the sample made from it with fewer images has a thumbnail of every image its page shows."""
    project = tmp_path / "project"
    shutil.copytree(SAMPLE, project, ignore=shutil.ignore_patterns("images"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    root = project / params["data"]["root"]
    stems = pd.read_csv(project / "data/captions/llava/captions.csv", dtype=str)["stem"].tolist()
    for i, stem in enumerate(stems):
        (root / "shard000").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 48), (i % 255, 50, 100)).save(root / "shard000" / f"{stem}.png")
        (root / "shard000" / f"{stem}.txt").write_text(f"reference {i}\n")
    rng, pool = np.random.default_rng(0), stems[:40]  # every neighbour among the first 40 images
    for model in params["models"]:
        nearest = {f"{side}_{j + 1}": rng.choice(pool, len(stems)) for side in ("pre", "post") for j in range(10)}
        pd.DataFrame({"stem": stems, **nearest}).to_csv(layout.data("geometry", model, project) / "neighbours.csv",
                                                        index=False)
    out = tmp_path / "sample"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/make_sample.py"), str(project), "--out", str(out),
                           "--images", "30"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    carried = {p.stem for p in (out / params["data"]["root"]).rglob("*.jpg")}
    kept = set(pd.read_csv(out / "data/captions/llava/captions.csv", dtype=str)["stem"])
    assert len(kept) == 30 and kept < carried <= kept | set(pool)  # the kept images and the neighbours shown
    # the page of the sample, as stages/report.py builds it
    sets = [f"{mode}_{lv}" for mode in params["perturb"]["modes"] for lv in params["perturb"]["levels"]]
    data = {m: tables.load_model(out, m, sets) for m in params["models"]}
    k = max(data["llava"].geometry_metrics["ks"])
    fractions = {mode: tables.common_fraction(data, mode, params["perturb"]["levels"], 0.5)
                 for mode in params["perturb"]["modes"]}
    covariates = tables.read_csv(layout.covariates(out))
    per_image = {m: tables.per_image(d, tables.measures(params["perturb"]["modes"], params["perturb"]["levels"]),
                                     {"k": k, "fractions": fractions}, covariates) for m, d in data.items()}
    page = examples.write_page(tmp_path / "examples", data, per_image,
                               {m: examples.read_neighbours(out, m) for m in data}, out / params["data"]["root"],
                               params["perturb"]["modes"], params["perturb"]["levels"], fractions, k,
                               params["report"]["examples"])
    html = page.read_text()
    assert "not in this sample" not in html and "reference 1" in html
    assert len(Tags(html).all("img", "small")) == len(data) * 2 * 3 * 2 * 8
