"""Stage zoo: the default study's tiny checkpoints, trained on a toy world's training split and saved in
Hugging Face format under data/zoo/<name>:

- every entry of params `pretrain`: the tiny pretrained models (stages/pretrain.py);
- every entry of params `zoo.models`: one tiny VLM per real transformers class, each with its family's recipe,
  saved, reloaded from disk and checked on the held-out images (metrics/zoo/<name>.json).

The entries train `zoo.workers` at a time, each in a process of its own with `zoo.threads` torch threads, a VLM
as soon as the pretrained encoder it freezes (Adapter.frozen_encoder: clip, siglip) is saved. DVC runs one
stage at a time, and on 2 cores two one-thread trainings side by side do 1.4-1.5 times the work of one
two-thread training (README, Speed).

A finished entry is kept (data/zoo persists) while its fingerprint is unchanged: its recipe, the shared zoo
settings, the training images, the code that trains it (CODE) and, for a VLM, the fingerprint of the encoder
it freezes. So a changed recipe retrains that entry and the VLM that freezes it, an interrupted run trains only
what it had not finished, and an entry removed from params is removed here. `--only NAME` trains one entry in
this process (what each worker runs).
"""

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import typer
from dvclive import Live
from tqdm import tqdm

from common import PROJECT, dvclive_logger, load_params, run, write_json, write_timings
from conngeo import interrupt, layout
from conngeo.data.images import load_image, scan
from conngeo.digest import folder_digest
from conngeo.models import adapter_class
from conngeo.models.tokenizer import build_tokenizer, read_vocab
from conngeo.models.zoo import caption_accuracy, train_captioner
from pretrain import train_pretrained

app = typer.Typer(add_completion=False)

# what trains an entry: a change retrains every entry (dvc.yaml lists the same files as the stage's deps)
CODE = ("stages/zoo.py", "stages/pretrain.py", "src/conngeo/models/__init__.py", "src/conngeo/models/base.py",
        "src/conngeo/models/tokenizer.py", "src/conngeo/models/zoo.py", "src/conngeo/models/pretrain.py",
        "src/conngeo/models/pretrain_siglip.py", "src/conngeo/models/llava.py", "src/conngeo/models/idefics2.py",
        "src/conngeo/models/qwen2_5_vl.py", "src/conngeo/models/qwen3_5.py")
FINGERPRINT = "zoo_fingerprint.txt"  # in each checkpoint folder, written last: the entry is finished


def frozen_encoders(params) -> dict[str, str | None]:
    """Every entry -> the pretrain entry it freezes (None for pretrain entries and jointly trained VLMs)."""
    needs = {name: None for name in params["pretrain"]}
    for model, recipe in params["zoo"]["models"].items():
        if model in needs:
            raise ValueError(f"params.yaml: {model!r} is both a pretrain entry and a zoo model; rename one "
                             "(both are saved as data/zoo/<name>)")
        encoder = adapter_class(recipe["family"]).frozen_encoder
        if encoder and encoder not in params["pretrain"]:
            raise ValueError(f"params.yaml: zoo model {model!r} ({recipe['family']}) freezes the pretrain entry "
                             f"{encoder!r}, which params.yaml `pretrain` does not have; add it back")
        needs[model] = encoder
    return needs


def fingerprints(params, needs: dict[str, str | None], train_root: Path, image_size: int) -> dict[str, str]:
    """Entry -> a digest of everything its checkpoint depends on (the module docstring lists it)."""
    zoo = params["zoo"]
    shared = [zoo["heldout"], zoo["threads"], image_size, folder_digest(train_root),
              [hashlib.sha256((PROJECT / f).read_bytes()).hexdigest() for f in CODE]]
    prints = {}
    for name in sorted(params["pretrain"]):  # first: a VLM's fingerprint includes its encoder's
        prints[name] = digest([name, dict(params["pretrain"][name]), shared])
    for name, recipe in zoo["models"].items():
        prints[name] = digest([name, dict(recipe), shared, zoo["seed"], zoo["eval_every"], prints.get(needs[name])])
    return prints


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def finished(folder: Path, fingerprint: str) -> bool:
    return (folder / FINGERPRINT).is_file() and (folder / FINGERPRINT).read_text().strip() == fingerprint


def train_vlm(model: str, params, train_root: Path, size: int, pretrained: Path, out: Path,
              progress: bool = True) -> None:
    """Train zoo model `model` on `size`-px images, save it in `out`, reload it from disk and write its
    held-out accuracy."""
    zoo = params["zoo"]
    recipe = zoo["models"][model]
    cls = adapter_class(recipe["family"])
    items = scan(train_root).items
    images = [load_image(it.path) for it in items]
    captions = [it.caption for it in items]
    n_train = len(items) - zoo["heldout"]
    tokenizer = build_tokenizer(read_vocab(train_root / "vocab.txt"), cls.special_tokens)
    vision = cls.load_frozen_encoder(pretrained / cls.frozen_encoder) if cls.frozen_encoder else None
    adapter = cls.tiny(tokenizer, size, vision_encoder=vision, seed=zoo["seed"])
    n_params = sum(p.numel() for p in adapter.model.parameters())
    typer.echo(f"zoo: {model} ({recipe['family']}), {n_params / 1e6:.2f}M parameters, "
               f"{n_train} training images, {zoo['heldout']} held out"
               + (f", frozen {cls.frozen_encoder} encoder" if cls.frozen_encoder else ""))

    start = time.perf_counter()
    with Live(dir=str(layout.live("zoo", model)), dvcyaml=False, save_dvc_exp=False) as live:
        log = dvclive_logger(live, prefix="train/")
        train_captioner(adapter, images[:n_train], captions[:n_train], steps=recipe["steps"],
                        batch_size=recipe["batch_size"], lr=recipe["lr"], seed=zoo["seed"],
                        augment=recipe["augment"], log=log, heldout=(images[n_train:], captions[n_train:]),
                        eval_every=zoo["eval_every"], progress=progress)
    seconds = time.perf_counter() - start
    write_timings("zoo", model, train=seconds)

    adapter.save(out)
    reloaded = cls.load(str(out))  # the study loads it exactly as it would a hub checkpoint
    accuracy, generated = caption_accuracy(reloaded, images[n_train:], captions[n_train:])
    report = {"family": recipe["family"], "parameters": n_params, "frozen_encoder": cls.frozen_encoder,
              "steps": recipe["steps"], "batch_size": recipe["batch_size"], "lr": recipe["lr"],
              "augment": recipe["augment"],
              "threads": zoo["threads"], "train_images": n_train,
              "heldout_images": zoo["heldout"], "accuracy": accuracy,
              "examples": [{"reference": r, "generated": g} for r, g in zip(captions[n_train:n_train + 5], generated)]}
    write_json(layout.details("zoo", model), report)
    typer.echo(f"zoo: {model} trained in {seconds:.0f} s; held-out accuracy {accuracy}")


def train_one(name: str, params, train_root: Path, image_size: int, out_root: Path, fingerprint: str,
              progress: bool = True) -> None:
    """Train entry `name` into a temporary folder and move it to <out_root>/<name> when it is finished."""
    torch.set_num_threads(params["zoo"]["threads"])  # the thread count changes the trained weights' last bits
    tmp, out = out_root / f".{name}.tmp", out_root / name
    shutil.rmtree(tmp, ignore_errors=True)
    if name in params["pretrain"]:
        train_pretrained(name, params, train_root, image_size, tmp)
    else:
        train_vlm(name, params, train_root, image_size, out_root, tmp, progress)
    (tmp / FINGERPRINT).write_text(fingerprint + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def training_order(needs: dict[str, str | None], vlms) -> list[str]:
    """The encoders a VLM waits for, then the VLMs, most steps first, then the pretrained models nothing here
    waits for (the reference spaces): the longest chains start first, so that the two workers end together."""
    encoders = set(needs.values())
    return sorted(needs, key=lambda name: (0, 0) if name in encoders else (1, -vlms[name]["steps"]) if name in vlms
                  else (2, 0))


def train_all(todo: list[str], needs: dict[str, str | None], workers: int, argv: list[str]) -> None:
    """Run `argv + ["--only", name]` for every name in `todo`, `workers` at a time, each once the entry it
    needs is done (in `todo` order otherwise). A failure lets the running ones finish and stops."""
    waiting, running, failed = list(todo), {}, []
    with tqdm(total=len(todo), desc="zoo", unit="checkpoint") as bar:
        while waiting or running:
            ready = [n for n in waiting if needs[n] not in waiting and needs[n] not in running]
            while ready and len(running) < workers and not failed:
                name = ready.pop(0)
                waiting.remove(name)
                running[name] = subprocess.Popen([*argv, "--only", name])
            if not running:
                break
            time.sleep(0.2)
            if interrupt.requested():
                for process in running.values():
                    process.kill()  # through scripts/warm.py's client this ends the script too
                    process.wait()
                break
            for name in [n for n, p in running.items() if p.poll() is not None]:
                if running.pop(name).returncode:
                    failed.append(name)
                bar.update()
    interrupt.check(f"{len(todo) - len(waiting) - len(running) - len(failed)} of {len(todo)} checkpoints")
    if failed or waiting:
        raise SystemExit(f"zoo: {', '.join(failed)} failed (the error is above); "
                         f"{len(waiting)} not started; the finished ones are kept: run it again to go on")


@app.command()
def main(
    train_root: Path = typer.Option(..., help="a toy world's training split (its last zoo.heldout images are held out)"),
    image_size: int = typer.Option(..., help="the toy world's image size (params toyworld.<world>.image_size)"),
    out: Path = typer.Option(Path("data/zoo"), help="checkpoint folders <out>/<name>; a VLM's frozen encoder is <out>/<its pretrain entry>"),
    only: str = typer.Option(None, help="train this one entry here (pretrain or zoo.models), whatever its fingerprint"),
    progress: bool = typer.Option(True, help="a progress bar per training (off in the workers of a parallel run)"),
):
    """Train every tiny checkpoint whose fingerprint changed, zoo.workers at a time."""
    params = load_params()
    needs = frozen_encoders(params)
    prints = fingerprints(params, needs, train_root, image_size)
    out.mkdir(parents=True, exist_ok=True)
    if only:
        if only not in needs:
            raise SystemExit(f"unknown entry {only!r}; params.yaml pretrain and zoo.models have {sorted(needs)}")
        return train_one(only, params, train_root, image_size, out, prints[only], progress)

    for folder in out.iterdir():  # entries no longer in params, and the parts of an interrupted run
        if folder.name not in needs:
            shutil.rmtree(folder)
    kept = [name for name in needs if finished(out / name, prints[name])]
    todo = [name for name in training_order(needs, params["zoo"]["models"]) if name not in kept]
    workers = params["zoo"]["workers"]
    typer.echo(f"zoo: {len(needs)} checkpoints in {out}: {len(kept)} kept, {len(todo)} to train, "
               f"{workers} at a time with {params['zoo']['threads']} torch thread(s) each")
    if not todo:
        return
    start = time.perf_counter()
    # the bars of parallel trainings would mix; an option, not TQDM_DISABLE, which tqdm reads when imported: a
    # changed environment would start a second scripts/warm.py server, importing torch and transformers again
    script = [sys.executable, str(PROJECT / "scripts" / "warm.py"), sys.argv[0],
              "--train-root", str(train_root), "--image-size", str(image_size), "--out", str(out),
              *(["--no-progress"] if workers > 1 else [])]
    train_all(todo, needs, workers, script)
    write_timings("zoo", "all", total=time.perf_counter() - start)


if __name__ == "__main__":
    run(app)
