"""The tiny zoo's training recipes, a few steps each: the caption loss falls; LLaVA and Idefics2
keep their pretrained encoder byte for byte (and see images exactly as that encoder was trained
on them), the Qwen families train theirs; the tiny SigLIP trains with its sigmoid loss."""

import itertools

import numpy as np
import pytest
import torch
from transformers import SiglipModel, SiglipProcessor, SiglipVisionModel

from conngeo.families import adapter_class
from conngeo.zoo import pretrain
from conngeo.zoo.pretrain_siglip import (siglip_retrieval_accuracy, siglip_text_inputs, tiny_siglip,
                                            train_tiny_siglip)
from conngeo.zoo.captioner import caption_accuracy, dihedral, train_captioner
from models_helpers import IMAGE_SIZE, toy_images, toy_tokenizer

FAMILIES = ["llava", "idefics2", "qwen2.5vl", "qwen3.5"]
FROZEN = [f for f in FAMILIES if adapter_class(f).frozen_encoder]
PRETRAINED = {"clip": pretrain.tiny_clip, "siglip": tiny_siglip}  # pretrain products by name
SMALL = dict(patch_size=8, hidden_size=32, num_layers=2)


@pytest.fixture(scope="module")
def toy():
    return toy_images(4)


def pretrained_encoder(cls, folder):
    """A random tiny pretrain product of the kind `cls` freezes, saved and loaded back the way the
    zoo stage does: (the full model, what load_frozen_encoder returns)."""
    model, processor = PRETRAINED[cls.frozen_encoder](toy_tokenizer(), image_size=IMAGE_SIZE, seed=1, **SMALL)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model.eval(), processor, cls.load_frozen_encoder(folder)


def test_the_families_name_their_frozen_encoders():
    assert {f: adapter_class(f).frozen_encoder for f in FAMILIES} == {
        "llava": "clip", "idefics2": "siglip", "qwen2.5vl": None, "qwen3.5": None}
    assert all(adapter_class(f).trains_vision_encoder == (adapter_class(f).frozen_encoder is None) for f in FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_lowers_the_loss_and_follows_the_recipe(family, toy, tmp_path):
    images, captions = toy
    cls = adapter_class(family)
    encoder = pretrained_encoder(cls, tmp_path / "encoder")[2] if cls.frozen_encoder else None
    adapter = cls.tiny(toy_tokenizer(cls.special_tokens), IMAGE_SIZE, vision_encoder=encoder, seed=0)
    connector = {id(p) for p in adapter.connector().parameters()}
    vision = {name: p.detach().clone() for name, p in adapter.vision_encoder().named_parameters()
              if id(p) not in connector}
    rest = {name: p.detach().clone() for name, p in adapter.model.named_parameters()}

    losses = train_captioner(adapter, images, captions, steps=12, batch_size=4, lr=3e-3, warmup=1, augment=True)

    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    after = dict(adapter.vision_encoder().named_parameters())
    if cls.trains_vision_encoder:
        unchanged = [n for n, p in vision.items() if torch.equal(p, after[n])]
        assert not unchanged, f"{family} trains its vision encoder, but these stayed: {unchanged}"
    else:
        for name, p in vision.items():
            assert torch.equal(p, after[name]), f"{family}'s frozen encoder weight {name} changed"
    final = dict(adapter.model.named_parameters())
    for part, module in (("connector", adapter.connector()), ("language model", adapter.model.lm_head)):
        names = {n for n, p in final.items() if any(p is q for q in module.parameters())}
        assert names and all(not torch.equal(rest[n], final[n]) for n in names), f"{family}: {part} not trained"


def test_the_progress_bar_can_be_turned_off_and_the_weights_stay_the_same(toy, capsys):
    """The zoo's parallel workers train with progress=False (stages/zoo.py --no-progress)."""
    images, captions = toy
    cls = adapter_class("qwen3.5")
    weights, bars = {}, {}
    for progress in (True, False):
        adapter = cls.tiny(toy_tokenizer(cls.special_tokens), IMAGE_SIZE, seed=0)
        train_captioner(adapter, images, captions, steps=3, batch_size=4, lr=3e-3, warmup=1, progress=progress)
        weights[progress] = adapter.model.state_dict()
        bars[progress] = "train qwen3.5" in capsys.readouterr().err
    assert bars == {True: True, False: False}
    assert weights[True].keys() == weights[False].keys()
    assert all(torch.equal(weights[True][k], weights[False][k]) for k in weights[True])


def test_augmentation_shows_each_image_under_the_eight_flips_and_rotations(toy):
    image = toy[0][0]
    pixels = np.asarray(image)
    seen = {np.asarray(dihedral(image, torch.tensor(draw))).tobytes()
            for draw in itertools.product((0, 1), repeat=3)}
    want = {np.ascontiguousarray(np.rot90(p, k)).tobytes()
            for p in (pixels, pixels[:, ::-1]) for k in range(4)}
    assert seen == want and len(want) == 8


@pytest.mark.parametrize("family", FROZEN)
def test_frozen_encoder_sees_images_as_it_was_trained(family, toy, tmp_path):
    """E_pre inside the VLM == the pretrained model's own vision tower on its own preprocessing."""
    images, _ = toy
    cls = adapter_class(family)
    model, processor, encoder = pretrained_encoder(cls, tmp_path / "encoder")
    adapter = cls.tiny(toy_tokenizer(cls.special_tokens), IMAGE_SIZE, vision_encoder=encoder, seed=0)
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model.vision_model(pixel_values=pixels, output_hidden_states=True)
    # LLaVA reads the second-to-last layer without CLS; Idefics2 the last one (after post-layernorm)
    want = out.hidden_states[-2][:, 1:] if family == "llava" else out.last_hidden_state
    pre, _ = adapter.encode(images)
    torch.testing.assert_close(torch.stack(pre), want, rtol=0, atol=1e-5)


def test_tiny_siglip_trains_and_saves_a_vision_tower(tmp_path):
    images, captions = toy_images(16)
    losses = []
    model, processor = train_tiny_siglip(images, captions, toy_tokenizer(), image_size=IMAGE_SIZE, steps=10,
                                         batch_size=8, lr=3e-3, seed=0, log=lambda step, v: losses.append(v["loss"]),
                                         **SMALL)
    assert len(losses) == 10 and sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses
    assert isinstance(model, SiglipModel) and not model.training
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    vision = SiglipVisionModel.from_pretrained(tmp_path)
    reloaded = SiglipProcessor.from_pretrained(tmp_path)
    pixels = reloaded.image_processor(images=images[:2], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(vision(pixel_values=pixels).pooler_output,
                                   model.get_image_features(pixel_values=pixels).pooler_output, rtol=0, atol=1e-6)
    assert torch.allclose(pixels, processor.image_processor(images=images[:2], return_tensors="pt")["pixel_values"])


def test_siglip_text_ends_with_eos_at_the_pooled_position():
    tok = toy_tokenizer()
    _, processor = tiny_siglip(tok, image_size=IMAGE_SIZE, max_text_length=16, **SMALL)
    captions = ["a red apple on a blue plate", "three white eggs and two green lemons on a pink plate"]
    text = siglip_text_inputs(processor, captions)
    assert text["input_ids"].shape == (2, 16)
    assert (text["input_ids"][:, -1] == tok.eos_token_id).all()  # SiglipTextModel pools position -1
    lengths = [len(c.split()) + 1 for c in captions]
    assert text["attention_mask"].sum(1).tolist() == lengths
    for row, n in zip(text["input_ids"], lengths):
        assert (row[:-n] == tok.pad_token_id).all() and tok.decode(row[-n:-1]) in captions
    with pytest.raises(ValueError, match="max_text_length"):
        siglip_text_inputs(processor, [" ".join(["apple"] * 16)])


def test_siglip_retrieval_follows_the_models_own_logits():
    images, captions = toy_images(6)
    captions[5] = captions[4]  # a duplicate caption: either of the two counts as right
    model, processor = tiny_siglip(toy_tokenizer(), image_size=IMAGE_SIZE, seed=2, **SMALL)
    model.eval()
    got = siglip_retrieval_accuracy(model, processor, images, captions, batch_size=3)
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    text = siglip_text_inputs(processor, captions)
    hits = 0
    with torch.no_grad():
        for b in (slice(0, 3), slice(3, 6)):
            logits = model(input_ids=text["input_ids"][b], attention_mask=text["attention_mask"][b],
                           pixel_values=pixels[b]).logits_per_image
            best = logits.argmax(1).tolist()
            hits += sum(captions[b][j] == captions[b][i] for i, j in enumerate(best))
    assert got["top1"] == hits / 6 and got["n"] == 6
    assert got["chance"] == pytest.approx((3 * 1 / 3 + 1 / 3 + 2 * 2 / 3) / 6)


def test_an_interrupted_training_resumes_to_the_same_weights(toy, tmp_path):
    """train_captioner with a state file: killed after a save, run again, it ends with the losses and the
    weights of a run that was never interrupted (the data order and the random states are resumed too)."""
    images, captions = toy
    cls = adapter_class("qwen2.5vl")

    def fresh():
        return cls.tiny(toy_tokenizer(cls.special_tokens), IMAGE_SIZE, seed=0)

    recipe = dict(steps=9, batch_size=3, lr=3e-3, warmup=2, augment=True, save_every=4)
    straight = fresh()
    want = train_captioner(straight, images, captions, **recipe)

    def dies(step, values):
        if step == 6:
            raise KeyboardInterrupt

    interrupted = fresh()
    with pytest.raises(KeyboardInterrupt):
        train_captioner(interrupted, images, captions, state=tmp_path / "state.safetensors", log=dies, log_every=1,
                        **recipe)
    assert (tmp_path / "state.safetensors").is_file()  # saved after step 4
    resumed = fresh()
    got = train_captioner(resumed, images, captions, state=tmp_path / "state.safetensors", **recipe)
    assert got == want and not (tmp_path / "state.safetensors").exists()
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name

    # a state never resumes another start (here other initial weights; a frozen encoder retrained in place
    # likewise): the run starts afresh and ends as a run that was never interrupted
    with pytest.raises(KeyboardInterrupt):
        train_captioner(fresh(), images, captions, state=tmp_path / "state.safetensors", log=dies, log_every=1,
                        **recipe)
    other = lambda: cls.tiny(toy_tokenizer(cls.special_tokens), IMAGE_SIZE, seed=1)  # noqa: E731
    assert train_captioner(other(), images, captions, state=tmp_path / "state.safetensors", **recipe) \
        == train_captioner(other(), images, captions, **recipe) != want


def test_heldout_checks_are_logged_and_leave_the_training_as_it_was(toy):
    """The held-out accuracy curve (train_captioner's `heldout`) is logged every `eval_every` steps and at
    the last, equals caption_accuracy on those images, and changes no trained weight: greedy captioning
    draws no random numbers, and the model goes back to training mode after each check."""
    images, captions = toy
    cls = adapter_class("qwen2.5vl")

    def fresh():
        return cls.tiny(toy_tokenizer(cls.special_tokens), IMAGE_SIZE, seed=0)

    recipe = dict(steps=7, batch_size=3, lr=3e-3, warmup=2, augment=True)
    plain = fresh()
    want = train_captioner(plain, images, captions, **recipe)
    logged = {}
    checked = fresh()
    got = train_captioner(checked, images, captions, heldout=(images[:2], captions[:2]), eval_every=3,
                          log=lambda step, values: logged.setdefault(step, {}).update(values), **recipe)
    assert got == want
    for (name, a), b in zip(plain.model.named_parameters(), checked.model.parameters()):
        assert torch.equal(a, b), name
    assert sorted(s for s, v in logged.items() if "heldout/counts" in v) == [2, 5, 6]
    final, _ = caption_accuracy(checked, images[:2], captions[:2])
    assert {k: logged[6][f"heldout/{k}"] for k in final} == final


# -- the zoo stage: which entries it trains, in what order, how many at a time ------------------------

def zoo_stage():
    """The zoo's trainings (what stages/zoo.py calls)."""
    from conngeo.zoo import train
    return train


ZOO_PARAMS = {"pretrain": {"clip": {"recipe": "clip", "steps": 3}, "siglip": {"recipe": "siglip", "steps": 3},
                           "dino": {"recipe": "dino", "steps": 3}},
              "zoo": {"seed": 0, "heldout": 8, "eval_every": 250, "threads": 1,
                      "models": {"llava": {"family": "llava", "steps": 3}, "idefics2": {"family": "idefics2", "steps": 3},
                                 "qwen2_5vl": {"family": "qwen2.5vl", "steps": 3}}}}


def test_zoo_stage_deps_are_the_code_its_fingerprints_hash():
    """Every file an entry's fingerprint hashes lies under a dep of the zoo stage in dvc.yaml, so that DVC reruns
    the stage whenever a fingerprint could change (the stage then retrains only the entries whose changed)."""
    import yaml
    from pathlib import Path

    from conngeo.families.registry import FAMILIES
    root = Path(__file__).resolve().parents[1]
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())
    deps = [root / d for d in dvc["stages"]["zoo"]["do"]["deps"] if not d.startswith("data/")]
    files = {f for family in FAMILIES for f in zoo_stage().code_files(family)}
    assert files and all(any(f == d or d in f.parents for d in deps) for f in files), sorted(files)


def test_zoo_fingerprint_follows_what_an_entry_is_trained_from(tmp_path):
    import copy
    zoo = zoo_stage()
    (tmp_path / "a.png").write_bytes(b"image")
    needs = zoo.frozen_encoders(ZOO_PARAMS["pretrain"], ZOO_PARAMS["zoo"]["models"])
    assert needs == {"clip": None, "siglip": None, "dino": None, "llava": "clip", "idefics2": "siglip", "qwen2_5vl": None}
    before = zoo.fingerprints(ZOO_PARAMS["pretrain"], ZOO_PARAMS["zoo"], needs, tmp_path, 48)
    changed = copy.deepcopy(ZOO_PARAMS)
    changed["pretrain"]["clip"]["steps"] = 4  # the frozen encoder of llava, of nothing else
    after = zoo.fingerprints(changed["pretrain"], changed["zoo"], needs, tmp_path, 48)
    assert {name for name in before if before[name] != after[name]} == {"clip", "llava"}
    reseeded = copy.deepcopy(ZOO_PARAMS)
    reseeded["zoo"]["seed"] = 1  # the VLMs' seed, not the pretrained models'
    after = zoo.fingerprints(reseeded["pretrain"], reseeded["zoo"], needs, tmp_path, 48)
    assert {name for name in before if before[name] != after[name]} == {"llava", "idefics2", "qwen2_5vl"}
    assert set(zoo.fingerprints(ZOO_PARAMS["pretrain"], ZOO_PARAMS["zoo"], needs, tmp_path, 32).values()).isdisjoint(before.values())  # shared
    (tmp_path / "a.png").write_bytes(b"other image")
    assert set(zoo.fingerprints(ZOO_PARAMS["pretrain"], ZOO_PARAMS["zoo"], needs, tmp_path, 48).values()).isdisjoint(before.values())
    models = copy.deepcopy(ZOO_PARAMS["zoo"]["models"])
    models["qwen2_5vl"]["steps"] = 5
    assert zoo.training_order(needs, models) == ["clip", "siglip", "qwen2_5vl", "llava", "idefics2", "dino"]
    missing = copy.deepcopy(ZOO_PARAMS)
    del missing["pretrain"]["clip"]
    with pytest.raises(ValueError, match="freezes the pretrain entry 'clip'"):
        zoo.frozen_encoders(missing["pretrain"], missing["zoo"]["models"])


# A stand-in for a worker: logs "start NAME PID", waits for an event, logs "end NAME PID". No job waits on the
# clock: `side-by-side` ends once `workers` jobs have been running at once since it started (or every job has
# started, for the last ones), `after-bad` once the failing job's process has been reaped, so that the stage has
# seen the failure.
STAND_IN = """
import os, sys, time
log, mode, workers, total, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[-1]
def say(what): print(what, name, os.getpid(), file=open(log, "a"), flush=True)
def events(): return [line.split() for line in open(log).read().splitlines()]
def reaped(pid):
    try:
        os.kill(pid, 0)  # a finished child stays (a zombie) until its parent reaps it
    except ProcessLookupError:
        return True
    return False
say("start")
if name == "bad":
    say("end")
    sys.exit(1)
give_up = time.monotonic() + 60  # only a stage that never runs them as asked gets here
while time.monotonic() < give_up:
    seen, running, most, mine = events(), 0, 0, False
    for what, who, _ in seen:
        running += 1 if what == "start" else -1
        mine = mine or who == name
        most = max(most, running) if mine else 0
    if mode == "side-by-side" and (most >= workers or sum(e[0] == "start" for e in seen) == total):
        break
    if mode == "after-bad" and any(e[:2] == ["end", "bad"] and reaped(int(e[2])) for e in seen):
        break
    time.sleep(0.01)
else:
    sys.exit(3)
say("end")
"""


def test_zoo_trains_at_most_workers_at_a_time_and_each_after_its_encoder(tmp_path):
    """train_all on stand-in jobs that log their start and end: the scheduling, not the training."""
    import sys
    zoo = zoo_stage()
    log = tmp_path / "log"
    needs = {"clip": None, "siglip": None, "dino": None, "llava": "clip", "idefics2": "siglip", "qwen2_5vl": None}
    zoo.train_all(["clip", "siglip", "llava", "idefics2", "qwen2_5vl", "dino"], needs, 2,
                  [sys.executable, "-c", STAND_IN, str(log), "side-by-side", "2", str(len(needs))])
    events = [line.split()[:2] for line in log.read_text().splitlines()]
    assert sorted(name for what, name in events if what == "end") == sorted(needs)
    running, most = set(), 0
    for at, (what, name) in enumerate(events):
        if what == "start":
            assert needs[name] is None or ["end", needs[name]] in events[:at]
            running.add(name)
        else:
            running.discard(name)
        most = max(most, len(running))
    assert most == 2
    # a failure: the running job finishes, nothing new starts, the stage stops naming it
    log.unlink()
    with pytest.raises(ValueError, match="bad failed.*1 not started"):
        zoo.train_all(["bad", "clip", "siglip"], {"bad": None, "clip": None, "siglip": None}, 2,
                      [sys.executable, "-c", STAND_IN, str(log), "after-bad", "2", "3"])
    assert sorted(line.split()[0] + " " + line.split()[1] for line in log.read_text().splitlines()) == [
        "end bad", "end clip", "start bad", "start clip"]
