"""The tiny zoo's trainings: the default study's checkpoints, trained on a toy world's training split and saved
in Hugging Face format under <out>/<name>:

- every pretrain entry: the tiny pretrained models (conngeo.zoo.pretrained);
- every zoo model: one tiny VLM per real transformers class, each with its family's recipe (`train_vlm`),
  saved, reloaded from disk and checked on the held-out images.

A VLM trains once the pretrained encoder it freezes (Adapter.frozen_encoder: clip, siglip) is saved; the
entries train `workers` at a time, each in a process of its own (`train_all`).

A finished entry is kept while its fingerprint is unchanged (`fingerprints`): its recipe, the shared zoo
settings, the training images, the code that trains it (`code_files`: this package and, for a VLM, its
family's files) and, for a VLM, the fingerprint of the encoder it freezes. So a changed recipe retrains that
entry and the VLM that freezes it, a changed family file retrains that family's VLM, and an interrupted run
trains only what it had not finished.
"""

from __future__ import annotations

import hashlib
import inspect
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from .. import interrupt
from ..data.images import load_image, scan
from ..families import adapter_class
from ..resume import digest, folder_digest, stamp, stamped
from .captioner import caption_accuracy, train_captioner
from .pretrained import train_pretrained
from .tokenizer import build_tokenizer, read_vocab

SOURCE = Path(__file__).resolve().parents[2]  # src/: code files are named relative to it


def frozen_encoders(pretrain: Mapping, models: Mapping) -> dict[str, str | None]:
    """Every entry (pretrain entries, then zoo models) -> the pretrain entry it freezes (None for pretrain
    entries and jointly trained VLMs)."""
    needs = {name: None for name in pretrain}
    for model, recipe in models.items():
        if model in needs:
            raise ValueError(f"params.yaml: {model!r} is both a pretrain entry and a zoo model; rename one "
                             "(both are saved as data/zoo/<name>)")
        encoder = adapter_class(recipe["family"]).frozen_encoder
        if encoder and encoder not in pretrain:
            raise ValueError(f"params.yaml: zoo model {model!r} ({recipe['family']}) freezes the pretrain entry "
                             f"{encoder!r}, which params.yaml `pretrain` does not have; add it back")
        needs[model] = encoder
    return needs


def code_files(family: str | None = None) -> list[Path]:
    """The files an entry is trained by: every module of this package and conngeo.schedule and, for a VLM of
    `family`, the files of its adapter class and of the classes it builds on (conngeo.families.base among
    them), found through the registry. The zoo stage's dvc.yaml deps are the folders that hold them."""
    files = [*sorted(Path(__file__).parent.glob("*.py")), SOURCE / "conngeo" / "schedule.py"]
    if family:
        cls = adapter_class(family)
        files += sorted({Path(inspect.getfile(c)).resolve() for c in cls.__mro__ if c.__module__.startswith("conngeo.")})
    return files


def code_digest(files: list[Path]) -> list[tuple[str, str]]:
    return [(f.relative_to(SOURCE).as_posix(), hashlib.sha256(f.read_bytes()).hexdigest()) for f in files]


def fingerprints(pretrain: Mapping, zoo: Mapping, needs: dict[str, str | None], train_root: Path,
                 image_size: int) -> dict[str, str]:
    """Entry -> a digest of everything its checkpoint depends on (the module docstring lists it). `pretrain`
    and `zoo` are params pretrain and zoo."""
    shared = [zoo["heldout"], zoo["threads"], image_size, folder_digest(train_root)]
    prints = {}
    for name in sorted(pretrain):  # first: a VLM's fingerprint includes its encoder's
        prints[name] = digest([name, dict(pretrain[name]), shared, code_digest(code_files())])
    for name, recipe in zoo["models"].items():
        prints[name] = digest([name, dict(recipe), shared, code_digest(code_files(recipe["family"])), zoo["seed"],
                               zoo["eval_every"], prints.get(needs[name])])
    return prints


def to_train(out: Path, needs: dict[str, str | None], prints: dict[str, str], vlms: Mapping) -> tuple[list, list]:
    """(kept, todo): the entries finished under `out` with their fingerprint, and the others in training order.
    Folders under `out` of no entry (one removed from params, a part of an interrupted run) are removed."""
    for folder in Path(out).iterdir():
        if folder.name not in needs:
            shutil.rmtree(folder)
    kept = [name for name in needs if stamped(Path(out) / name, prints[name]) is not None]
    return kept, [name for name in training_order(needs, vlms) if name not in kept]


def train_vlm(recipe: Mapping, zoo: Mapping, train_root: Path, size: int, pretrained: Path, out: Path,
              log=None, say: Callable[[str], None] = lambda line: None, progress: bool = True) -> dict:
    """Train a zoo model (`recipe`: params zoo.models.<name>; `zoo`: params zoo) on `size`-px images, save it in
    `out`, reload it from disk and check it on the held-out images; its report (metrics/zoo/<name>.json).
    `pretrained`: the folder of the pretrain entries (a frozen encoder is pretrained/<entry>); `log`: a
    `log(step, {name: value})` callback of the training curve; `say`: a callback for the line that opens it."""
    cls = adapter_class(recipe["family"])
    items = scan(train_root).items
    images = [load_image(it.path) for it in items]
    captions = [it.caption for it in items]
    n_train = len(items) - zoo["heldout"]
    tokenizer = build_tokenizer(read_vocab(train_root / "vocab.txt"), cls.special_tokens)
    vision = cls.load_frozen_encoder(pretrained / cls.frozen_encoder) if cls.frozen_encoder else None
    adapter = cls.tiny(tokenizer, size, vision_encoder=vision, seed=zoo["seed"])
    n_params = sum(p.numel() for p in adapter.model.parameters())
    say(f"{recipe['family']}, {n_params / 1e6:.2f}M parameters, {n_train} training images, {zoo['heldout']} held out"
        + (f", frozen {cls.frozen_encoder} encoder" if cls.frozen_encoder else ""))
    train_captioner(adapter, images[:n_train], captions[:n_train], steps=recipe["steps"],
                    batch_size=recipe["batch_size"], lr=recipe["lr"], seed=zoo["seed"],
                    augment=recipe["augment"], log=log, heldout=(images[n_train:], captions[n_train:]),
                    eval_every=zoo["eval_every"], progress=progress)
    adapter.save(out)
    reloaded = cls.load(str(out))  # the study loads it exactly as it would a hub checkpoint
    accuracy, generated = caption_accuracy(reloaded, images[n_train:], captions[n_train:])
    return {"family": recipe["family"], "parameters": n_params, "frozen_encoder": cls.frozen_encoder,
            "steps": recipe["steps"], "batch_size": recipe["batch_size"], "lr": recipe["lr"],
            "augment": recipe["augment"],
            "threads": zoo["threads"], "train_images": n_train,
            "heldout_images": zoo["heldout"], "accuracy": accuracy,
            "examples": [{"reference": r, "generated": g} for r, g in zip(captions[n_train:n_train + 5], generated)]}


def train_entry(name: str, pretrain: Mapping, zoo: Mapping, train_root: Path, image_size: int, out_root: Path,
                fingerprint: str, log=None, say: Callable[[str], None] = lambda line: None,
                progress: bool = True) -> dict:
    """Train entry `name` (pretrain or zoo model) with zoo.threads torch threads into a temporary folder, stamp
    it with `fingerprint` and move it to <out_root>/<name>; its report."""
    torch.set_num_threads(zoo["threads"])  # the thread count changes the trained weights' last bits
    tmp, out = out_root / f".{name}.tmp", out_root / name
    shutil.rmtree(tmp, ignore_errors=True)
    if name in pretrain:
        report = train_pretrained(pretrain[name], zoo["heldout"], train_root, image_size, tmp, log=log)
    else:
        report = train_vlm(zoo["models"][name], zoo, train_root, image_size, out_root, tmp, log=log, say=say,
                           progress=progress)
    stamp(tmp, fingerprint)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return report


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
        raise ValueError(f"zoo: {', '.join(failed)} failed (the error is above); "
                         f"{len(waiting)} not started; the finished ones are kept: run it again to go on")
