"""A fifth family is one file. A family module written into a temporary package (not conngeo.families) is
imported, which registers it; the study's own stage scripts then run a model of that family through
extract, knn, recon, recon_export and captions at smoke size, with no other change: no stage or
library module names a family, and what they need to know of one (its token layout, its connector's
kind) is asked of the adapter or read from what the extraction recorded.
"""

import importlib
import json
import sys

import pandas as pd
import pytest
import yaml

from conftest import Stages, tiny_project
from conngeo.data.vectors import VectorReader

# the whole family: here a LLaVA-architecture model under a name of its own, with its own connector
# kind (a real new family wraps its own transformers class the same way: see conngeo/families/llava.py)
FAMILY_FILE = '''
from conngeo.families.llava import LlavaAdapter


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
    params = tiny_project(root, "mini", "minillava", images_per_shard=12, batch_size=8)
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
