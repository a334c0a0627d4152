"""A fifth family is one file. A family module written into a temporary package (not conngeo.families) is
imported, which registers it; the study's own stage scripts then run a model of that family through
extract, geometry, recon, recon_export, recon_eval and captions at smoke size, with no other change: no stage
or library module names a family, and what they need to know of one (its token layout, its connector's
kind) is asked of the adapter or read from what the extraction recorded.

The file implements conngeo.families.Adapter itself, subclassing no family of the package: it wraps
transformers' LlavaForConditionalGeneration its own way, keeping the vision tower's CLS token ("full"
feature strategy), so that its E_pre is no square patch grid and the stages must take the layout from it.
"""

import importlib
import json
import sys

import pandas as pd
import pytest
import yaml

from conftest import Stages, tiny_project
from conngeo.data.vectors import VectorReader

FAMILY_FILE = '''
import torch
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from conngeo.families import Adapter, register
from conngeo.families.base import from_pretrained_kwargs

IMAGE = "<image>"


@register
class CLSKeepingAdapter(Adapter):
    """LLaVA's classes with the CLS token kept: E_pre and E_post have one token more than the patches."""
    family = "clskeeping"
    connector_kind = "projector"
    special_tokens = (IMAGE,)
    model_class = LlavaForConditionalGeneration

    @classmethod
    def load_processor(cls, folder):
        return LlavaProcessor.from_pretrained(folder, **from_pretrained_kwargs())

    def set_image_size(self, size):
        if size != self.model.config.vision_config.image_size:
            raise ValueError(f"image_size must be the tower's {self.model.config.vision_config.image_size}")
        self.image_size = size

    def connector(self):
        return self.model.model.multi_modal_projector

    def vision_encoder(self):
        return self.model.model.vision_tower

    def prepare(self, images, captions=None):
        text = IMAGE + self.prompt
        if captions is not None:
            text = [text + " " + c + self.tokenizer.eos_token for c in captions]
        inputs = self.processor(images=images, text=text if captions else [text] * len(images), return_tensors="pt",
                                padding=True)
        if captions is not None:
            prompt = self.processor(images=images[:1], text=[IMAGE + self.prompt], return_tensors="pt")
            labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
            labels[:, :prompt["input_ids"].shape[1]] = -100
            inputs["labels"] = labels
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return {k: v.to(self.device) for k, v in inputs.items()}

    @torch.no_grad()
    def encode(self, images):
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        seen = {}
        handle = self.connector().register_forward_hook(lambda m, args, out: seen.update(pre=args[0], post=out))
        try:
            self.model.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        finally:
            handle.remove()
        return list(seen["pre"].cpu()), list(seen["post"].cpu())

    @torch.no_grad()
    def connect(self, pre):
        return list(self.connector()(torch.stack(pre).to(self.device, self.dtype)).cpu())

    @classmethod
    def tiny(cls, tokenizer, image_size, vision_encoder=None, seed=0):
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=image_size, patch_size=16)
        config = LlavaConfig(
            vision_config=vision.to_dict(),
            text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE), image_seq_length=(image_size // 16) ** 2 + 1,
            vision_feature_layer=-1, vision_feature_select_strategy="full")
        torch.manual_seed(seed)
        processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"height": image_size, "width": image_size},
                                                                         do_center_crop=False),
                                   tokenizer=tokenizer, patch_size=16, vision_feature_select_strategy="full",
                                   num_additional_image_tokens=1)
        return cls(LlavaForConditionalGeneration(config), processor)
'''

@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("fifth")
    (root / "extra_families").mkdir()
    (root / "extra_families" / "__init__.py").write_text("")
    (root / "extra_families" / "clskeeping.py").write_text(FAMILY_FILE)
    sys.path.insert(0, str(root))
    importlib.import_module("extra_families.clskeeping")  # importing the file registers the family
    params = tiny_project(root, "mini", "clskeeping", images_per_shard=12, batch_size=8)
    params["references"]["spaces"] = {}
    params["geometry"].update(ks=[3, 5])
    params["recon"].update(hidden_size=16, num_layers=1, num_heads=2, epochs=2, patience=2, batch_size=8, warmup=2)
    params["captions"].update(max_new_tokens=4, batch_size=8)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    yield root
    sys.path.remove(str(root))


def test_a_family_from_one_file_goes_through_the_study(project):
    stages = Stages(project)
    try:
        for name in ("extract", "geometry", "recon", "recon_export", "recon_eval", "captions"):
            stages(name, "--model", "mini")
    finally:
        sys.path.remove(str(project / "stages"))
    reader = VectorReader(sorted((project / "data/vectors/mini").iterdir()))
    assert len(reader) == 24 and reader.layout["connector"] == "projector"
    assert reader.tokens("pre") == reader.tokens("post") == 10  # 3 x 3 patches and the CLS token
    assert reader.layout["pre_raster"] is None and reader.layout["pre_to_post"] == list(range(10))
    geometry = json.loads((project / "metrics/geometry/mini.json").read_text())
    assert geometry["connector"] == "projector" and geometry["images"] == 24
    # per-image errors, and no patch maps for a layout that has no patch grid
    assert len(pd.read_csv(project / "data/recon_eval/mini/per_image.csv")) == 24
    assert not (project / "data/recon_eval/mini/patch_loss.csv").exists()
    captions = pd.read_csv(project / "data/captions/mini/captions.csv", keep_default_na=False)
    assert len(captions) == 24 and {"post", "recon"} <= set(captions.columns)
