"""Where the study keeps its artifacts, relative to the project root: the paths dvc.yaml declares.

Stages, the report, scripts/make_sample.py and stages/verify.py ask here instead of building paths, so
that a folder moves in one place (and in dvc.yaml). `root` is the project root, or a copy of its
layout such as sample/.

    data/zoo/<name>             the tiny checkpoints: pretrained models and the VLM zoo (zoo)
    data/models/<name>          connector variants (train_connector)
    data/vectors/<model>        E_pre / E_post shards (extract)
    data/refs/<space>           reference embeddings (references)
    data/geometry/<model>       per-image geometry, neighbours, probes (geometry)
    data/recon/<model>          the reconstructor, its split and normalisation (recon)
    data/recon_vectors/<model>  reconstructed E_pre shards (recon_export)
    data/recon_eval/<model>     per-image reconstruction errors, patch maps (recon_eval)
    data/captions/<model>       post and recon captions (captions)
    data/perturb/<model>        captions of perturbed E_post, <mode>/<level>/captions.csv (perturb)
    data/scores/<model>         scores of every caption set (score)
    data/covariates.csv         what each study image shows, for the adjusted tests (covariates)
    metrics/<stage>/<name>.json each stage's detailed numbers (outputs; the DVC metrics are results/metrics)
    dvclive/<stage>/<name>      training curves (plots)
"""

from pathlib import Path

KINDS = ("models", "vectors", "refs", "geometry", "recon", "recon_vectors", "recon_eval", "captions", "perturb",
         "scores")


def data(kind: str, name: str, root: Path | str = ".") -> Path:
    """The folder of artifact `kind` (one of KINDS) for model, reference space or checkpoint `name`."""
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; one of {KINDS}")
    return Path(root) / "data" / kind / name


def covariates(root: Path | str = ".") -> Path:
    """The study images' content covariates (one table for every model)."""
    return Path(root) / "data" / "covariates.csv"


def details(stage: str, name: str, root: Path | str = ".") -> Path:
    """A stage's detailed JSON for `name` (a model, space or checkpoint)."""
    return Path(root) / "metrics" / stage / f"{name}.json"


def live(stage: str, name: str, root: Path | str = ".") -> Path:
    """The dvclive folder of a training (curves declared as plots)."""
    return Path(root) / "dvclive" / stage / name
