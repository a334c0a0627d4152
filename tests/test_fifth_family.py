"""A fifth family is one file. A family module written into a temporary package (not conngeo.models) is
imported, which registers it; the study's own stage scripts then run a model of that family through
extract, knn, recon, recon_export and captions at smoke size, with no other change: no stage or
library module names a family, and what they need to know of one (its token layout, its connector's
kind) is asked of the adapter or read from what the extraction recorded.
"""

import importlib
import json
import shutil
import sys

import pandas as pd
import pytest
import yaml

from conftest import ROOT, Stages
from conngeo.data import toyworld
from conngeo.data.vectors import VectorReader
from conngeo.models import adapter_class
from models_helpers import toy_tokenizer

# the whole family: here a LLaVA-architecture model under a name of its own, with its own connector
# kind (a real new family wraps its own transformers class the same way: see conngeo/models/llava.py)
FAMILY_FILE = '''
from conngeo.models.llava import LlavaAdapter


class MiniLlavaAdapter(LlavaAdapter):
    """A fifth family, for the test: LLaVA's classes under another name and connector kind."""
    family = "minillava"
    connector_kind = "projector"
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("fifth")
    (root / "extra_families").mkdir()
    (root / "extra_families" / "__init__.py").write_text("")
    (root / "extra_families" / "minillava.py").write_text(FAMILY_FILE)
    sys.path.insert(0, str(root))
    importlib.import_module("extra_families.minillava")  # importing the file registers the family
    shutil.copytree(ROOT / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    toyworld.generate(root / "images", split="study", seed=0, shards=2, images_per_shard=12, size=48)
    cls = adapter_class("minillava")
    cls.tiny(toy_tokenizer(cls.special_tokens), 48, seed=0).save(root / "models" / "mini")

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(data={"root": "images", "on_bad_image": "error"}, device="cpu", max_window_mb=1,
                  models={"mini": {"family": "minillava", "source": str(root / "models" / "mini"), "hub": None,
                                   "revision": None, "dtype": "float32", "prompt": "", "image_size": 48}})
    params["references"]["spaces"] = {}
    params["extract"].update(batch_size=8, save_every=8)
    params["knn"].update(ks=[3, 5])
    params["recon"].update(hidden_size=16, num_layers=1, num_heads=2, epochs=2, patience=2, batch_size=8, warmup=2)
    params["captions"].update(max_new_tokens=4, batch_size=8)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    yield root
    sys.path.remove(str(root))


def test_a_family_from_one_file_goes_through_the_study(project):
    stages = Stages(project)
    try:
        for name in ("extract", "knn", "recon", "recon_export", "captions"):
            stages(name, "--model", "mini")
    finally:
        sys.path.remove(str(project / "stages"))
    reader = VectorReader(sorted((project / "data/vectors/mini").iterdir()))
    assert len(reader) == 24 and reader.layout["connector"] == "projector"
    knn = json.loads((project / "metrics/knn/mini.json").read_text())
    assert knn["connector"] == "projector" and knn["images"] == 24
    captions = pd.read_csv(project / "data/captions/mini/captions.csv", keep_default_na=False)
    assert len(captions) == 24 and {"post", "recon"} <= set(captions.columns)
