"""Connector variants on tiny random bases (LLaVA, Idefics2): the new connector sits where the base's
was, E_post replays native generation, the prompt carries one placeholder per E_post row, only the
connector trains, and a variant saves and loads through the registry like any checkpoint."""

import json
import math

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers.modeling_outputs import BaseModelOutputWithPooling

from conngeo.resume import folder_digest
from conngeo.families import MissingCheckpointError, adapter_class, load_adapter
from conngeo.families.variant import ConnectorVariant, build_connector, parse_kind, resize_image_runs
from conngeo.zoo.captioner import train_captioner
from conngeo.report import connectors
from models_helpers import IMAGE_SIZE, toy_images, toy_tokenizer

KINDS = {"linear": 36, "mlp": 36, "resampler5": 5, "merger": 9}  # image tokens from a 6x6 patch grid


@pytest.fixture(scope="module")
def toy():
    return toy_images(4)


@pytest.fixture(scope="module")
def llava_base(tmp_path_factory):
    """A tiny random LLaVA saved as a checkpoint folder: (folder, a loader of fresh copies)."""
    folder = tmp_path_factory.mktemp("llava")
    cls = adapter_class("llava")
    cls.tiny(toy_tokenizer(cls.special_tokens), IMAGE_SIZE, seed=0).save(folder)
    return folder, lambda: load_adapter("llava", str(folder))


def variant(family: str, kind: str, seed: int = 0) -> ConnectorVariant:
    cls = adapter_class(family)
    base = cls.tiny(toy_tokenizer(cls.special_tokens), IMAGE_SIZE, seed=0)
    return ConnectorVariant.from_base(base, kind, base_source="unsaved", seed=seed)


def test_parse_kind():
    assert parse_kind("resampler16") == {"kind": "resampler", "latents": 16}
    assert parse_kind("merger") == {"kind": "merger"}
    for bad in ("resampler", "resampler0", "conv", "mlp2"):
        with pytest.raises(ValueError, match="unknown connector kind"):
            parse_kind(bad)
    with pytest.raises(ValueError, match="does not take sizes"):
        build_connector("linear", 8, 8, hidden=16)


@pytest.mark.parametrize("family", ["llava", "idefics2"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_variant_is_the_models_connector_and_replays(family, kind, toy):
    images, _ = toy
    v = variant(family, kind)
    pre, post = v.encode(images)
    assert adapter_class("variant") is ConnectorVariant
    assert v.base.connector() is v.connector()  # in the base's place: the model's own forward runs it
    assert pre[0].shape == (36, 128) and [p.shape for p in post] == [(KINDS[kind], 128)] * 4
    # E_post is what the model itself feeds its LM: the hook equals the model's own image features
    inputs = v.prepare(images)
    pixels = {k: inputs[k] for k in v.pixel_keys + ("pixel_attention_mask",) if k in inputs}
    with torch.no_grad():
        feats = v.model.model.get_image_features(**pixels).pooler_output
    torch.testing.assert_close(torch.stack(post), torch.stack([f.reshape(-1, 128) for f in feats]), rtol=0, atol=1e-6)
    # one placeholder per E_post row, and connect(E_pre) == E_post
    assert (inputs["input_ids"] == v.model.config.image_token_id).sum(1).tolist() == [KINDS[kind]] * 4
    for got, want in zip(v.connect(pre), post):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # generation from the unmodified E_post is native generation, token for token
    assert v.generate(images, post=post, max_new_tokens=6) == v.generate(images, max_new_tokens=6)
    # and a changed E_post reaches the LM (the replay is not ignoring what it is given)
    inputs.pop("pixel_values"), inputs.pop("pixel_attention_mask", None)
    with torch.no_grad():
        logits = [v.model(**inputs, mm_encoder_outputs={"image": BaseModelOutputWithPooling(
            pooler_output=tuple(p))}).logits[:, -1] for p in (post, [q * 0 for q in post])]
    assert not torch.allclose(*logits)


def test_merger_concatenates_2x2_neighbours():
    """The merger's first layer sees patches (r, c), (r, c+1), (r+1, c), (r+1, c+1) of a raster grid."""
    v = variant("llava", "merger")
    merger = v.connector()
    x = torch.randn(1, 36, 128)
    grid = merger.norm(x).view(6, 6, 128)
    units = torch.stack([torch.cat([grid[r, c], grid[r, c + 1], grid[r + 1, c], grid[r + 1, c + 1]])
                         for r in range(0, 6, 2) for c in range(0, 6, 2)])
    with torch.no_grad():
        torch.testing.assert_close(merger(x)[0], merger.net(units), rtol=0, atol=1e-6)


def test_merger_pads_an_odd_grid_with_zeros():
    """A 3x3 grid (the tiny LLaVA's) becomes 2x2 units; the last row and column are zeros."""
    merger = build_connector("merger", 4, 8)
    x = torch.randn(2, 9, 4)
    grid, zero = merger.norm(x).view(2, 3, 3, 4), torch.zeros(2, 4)
    at = lambda r, c: grid[:, r, c] if r < 3 and c < 3 else zero  # noqa: E731
    units = torch.stack([torch.cat([at(r, c), at(r, c + 1), at(r + 1, c), at(r + 1, c + 1)], -1)
                         for r in (0, 2) for c in (0, 2)], 1)
    assert merger.tokens_out(9) == 4 and merger.tokens_out(36) == 9
    with torch.no_grad():
        torch.testing.assert_close(merger(x), merger.net(units), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not a square grid"):
        merger(torch.randn(1, 8, 4))


def test_resize_image_runs_keeps_padding_and_labels():
    IMG, PAD = 7, 0
    batch = {"input_ids": torch.tensor([[PAD, 1, IMG, IMG, IMG, 2, 3], [1, IMG, IMG, IMG, 2, 3, 4]]),
             "attention_mask": torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1] * 7]),
             "labels": torch.tensor([[-100] * 6 + [3], [-100] * 5 + [3, 4]]),
             "pixel_values": torch.zeros(2, 3)}
    out = resize_image_runs(batch, IMG, 1)
    assert out["input_ids"].tolist() == [[PAD, 1, IMG, 2, 3], [1, IMG, 2, 3, 4]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1, 1], [1] * 5]
    assert out["labels"].tolist() == [[-100, -100, -100, -100, 3], [-100, -100, -100, 3, 4]]
    assert out["pixel_values"] is batch["pixel_values"]
    assert resize_image_runs(batch, IMG, 5)["input_ids"][1].tolist() == [1] + [IMG] * 5 + [2, 3, 4]


@pytest.mark.parametrize("kind", ["linear", "resampler5", "merger"])
def test_training_changes_only_the_connector_and_lowers_the_loss(kind, toy, llava_base):
    images, captions = toy
    base = llava_base[1]()
    v = ConnectorVariant.from_base(base, kind, base_source=str(llava_base[0]))
    connector = {id(p) for p in v.connector().parameters()}
    before = {n: p.detach().clone() for n, p in v.model.named_parameters() if id(p) not in connector}
    start = {n: p.detach().clone() for n, p in v.connector().named_parameters()}

    losses = train_captioner(v, images, captions, steps=25, batch_size=4, lr=3e-3, warmup=1)

    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    after = dict(v.model.named_parameters())
    assert len(before) == len(after) - len(start) > 50  # the vision encoder and the LM
    for name, p in before.items():  # byte for byte
        assert p.dtype == after[name].dtype and p.numpy().tobytes() == after[name].detach().numpy().tobytes(), name
    stayed = [n for n, p in v.connector().named_parameters() if torch.equal(p, start[n])]
    assert not stayed, f"connector weights that did not train: {stayed}"


def test_save_load_round_trip_through_the_registry(toy, llava_base, tmp_path):
    images, captions = toy
    v = ConnectorVariant.from_base(llava_base[1](), "resampler5", base_source=str(llava_base[0]), seed=3)
    train_captioner(v, images, captions, steps=3, batch_size=4, lr=3e-3, warmup=1)
    v.save(tmp_path / "v")
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["connector.json", "connector.safetensors"]
    config = json.loads((tmp_path / "v/connector.json").read_text())
    assert config["base"] == {"family": "llava", "source": str(llava_base[0]), "revision": None,
                              "digest": folder_digest(llava_base[0]), "prompt": ""}
    assert config["kind"] == "resampler" and config["size"] == {"latents": 5} and config["image_tokens"] == 5
    saved = load_file(tmp_path / "v/connector.safetensors")
    assert saved.keys() == v.connector().state_dict().keys()

    loaded = load_adapter("variant", str(tmp_path / "v"))
    assert isinstance(loaded, ConnectorVariant) and loaded.image_tokens == 5
    for name, p in loaded.model.state_dict().items():
        assert torch.equal(p, v.model.state_dict()[name]), name
    pre, post = v.encode(images)
    pre2, post2 = loaded.encode(images)
    for a, b in zip(post + pre, post2 + pre2):
        assert torch.equal(a, b)
    assert loaded.generate(images, max_new_tokens=6) == v.generate(images, max_new_tokens=6)

    with pytest.raises(MissingCheckpointError, match="train_connector"):
        load_adapter("variant", str(tmp_path / "nowhere"))


def test_qwen_bases_are_refused():
    cls = adapter_class("qwen2.5vl")
    base = cls.tiny(toy_tokenizer(cls.special_tokens), IMAGE_SIZE, seed=0)
    with pytest.raises(ValueError, match="M-RoPE"):
        ConnectorVariant.from_base(base, "linear", base_source="x")


# --- the report's connector comparison (plain tables in, table + figure out) --------------------------

def summary_rows() -> pd.DataFrame:
    """Summary rows as the report builds them: two bases' connectors, and a model that is none of them."""
    rows = [("llava", 0.62, 0.50, 0.40, 0.10, 0.20), ("llava-linear", 0.80, 0.30, 0.30, 0.05, 0.10),
            ("llava-merger", 0.30, 0.90, 0.20, 0.30, 0.25), ("llava-resampler16", 0.45, 0.70, 0.25, 0.20, 0.40),
            ("idefics2", 0.5, 0.6, 0.3, 0.2, 0.2), ("idefics2-linear", 0.7, 0.4, 0.3, 0.1, 0.1),
            ("qwen2_5vl", 0.1, 0.1, 0.1, 0.1, 0.1)]
    return pd.DataFrame([{"model": m, "knor_pre_post@50": kn, "chance@50": 0.05, "recon_mse_z": mse,
                          "recon_cosine": 1 - mse, "post_caption_truth_exact": acc, "post_caption_clipscore": 0.7,
                          "sensitivity_mask_stability_f1": sm, "sensitivity_lowrank_stability_f1": sl,
                          "images": 100} for m, kn, mse, acc, sm, sl in rows])


PARAMS = {"models": {"llava": {"family": "llava"}, "idefics2": {"family": "idefics2"},
                     "qwen2_5vl": {"family": "qwen2.5vl"}, "llava-linear": {"family": "variant"},
                     "llava-merger": {"family": "variant"}, "llava-resampler16": {"family": "variant"},
                     "idefics2-linear": {"family": "variant"}},
          "connectors": {"variants": {"llava-linear": {"base": "llava", "kind": "linear"},
                                      "llava-resampler16": {"base": "llava", "kind": "resampler16"},
                                      "idefics2-linear": {"base": "idefics2", "kind": "linear"},
                                      "llava-merger": {"base": "llava", "kind": "merger"},
                                      "llava-mlp": {"base": "llava", "kind": "mlp"}}}}  # trained, not studied


def test_connector_table_and_answer(tmp_path):
    kinds = connectors.connector_kinds(PARAMS, {"llava": "mlp", "idefics2": "resampler", "qwen2_5vl": "merger"})
    assert kinds == {"llava": {"base": "llava", "kind": "mlp (native)"},
                     "llava-linear": {"base": "llava", "kind": "linear"},
                     "llava-resampler16": {"base": "llava", "kind": "resampler16"},
                     "idefics2": {"base": "idefics2", "kind": "resampler (native)"},
                     "idefics2-linear": {"base": "idefics2", "kind": "linear"},
                     "llava-merger": {"base": "llava", "kind": "merger"}}
    summary = summary_rows()
    table = connectors.connector_table(summary, kinds, k=50, modes=["mask", "lowrank"])
    assert table["model"].tolist() == ["llava", "llava-linear", "llava-resampler16", "llava-merger",
                                       "idefics2", "idefics2-linear"]
    assert list(table.columns[:9]) == ["base", "model", "kind", "knor@50", "chance@50", "recon_mse_z", "recon_cosine",
                                       "caption_exact", "caption_clipscore"]
    row = table.set_index("model").loc["llava-merger"]
    assert (row["knor@50"], row["recon_mse_z"], row["caption_exact"], row["sensitivity_mask"],
            row["sensitivity_lowrank"]) == (0.30, 0.90, 0.20, 0.30, 0.25)

    rho = connectors.geometry_vs_stability(table, k=50, modes=["mask", "lowrank"]).set_index(["base", "mode", "geometry"])
    # llava's four connectors by hand: KNOR ranks 3,4,2,1 (llava, linear, resampler, merger) ...
    assert rho.loc[("llava", "mask", "knor@50"), "rho"] == pytest.approx(-1.0)  # sensitivity ranks 2,1,3,4
    ranks_lowrank = [2, 1, 4, 3]  # sensitivity 0.20, 0.10, 0.40, 0.25
    d = [a - b for a, b in zip([3, 4, 2, 1], ranks_lowrank)]
    assert rho.loc[("llava", "lowrank", "knor@50"), "rho"] == pytest.approx(1 - 6 * sum(x * x for x in d) / (4 * 15))
    assert rho.loc[("llava", "mask", "knor@50"), "n"] == 4
    assert math.isnan(rho.loc[("idefics2", "mask", "knor@50"), "rho"])  # 2 connectors: no correlation
    # four connectors: even a perfect ordering has exact p = 2 / 4! (both directions), above the level
    assert rho.loc[("llava", "mask", "knor@50"), "p"] == pytest.approx(2 / 24)
    text = connectors.answer(rho.reset_index())
    assert "llava, mask: rho(knor@50, sensitivity) = -1.00 over 4 connectors, exact p = 0.083: no association shown" in text
    assert "idefics2, mask: fewer than 3 connectors" in text
    assert "give more stable captions" not in text
    text = connectors.answer(rho.reset_index(), alpha=0.1)
    assert "llava, mask: rho(recon_mse_z, sensitivity) = +1.00 over 4 connectors, exact p = 0.083: connectors that " \
           "preserve geometry better give more stable captions" in text

    connectors.connector_figure(table, 50, ["mask", "lowrank"], tmp_path / "fig.png")
    first = (tmp_path / "fig.png").read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    connectors.connector_figure(table, 50, ["mask", "lowrank"], tmp_path / "fig.png")
    assert (tmp_path / "fig.png").read_bytes() == first  # same tables, same file
    assert connectors.markdown(table, rho.reset_index()).startswith("# Connector experiments")
