"""What every stage script shares: reading params.yaml and resolving a model name to its checkpoint."""

from pathlib import Path

import yaml

PARAMS = Path("params.yaml")


def load_params(path: Path = PARAMS) -> dict:
    return yaml.safe_load(Path(path).read_text())


def model_spec(name: str, params: dict) -> dict:
    """{family, source, revision, dtype, prompt} of model `name`, from its `use` (tiny or real) entry."""
    models = params.get("models") or {}
    if name not in models:
        raise SystemExit(f"unknown model {name!r} in params.yaml `models`; known: {sorted(models)}")
    entry = models[name]
    use = entry.get("use", "tiny")
    if use not in entry:
        raise SystemExit(f"params.yaml models.{name}.use is {use!r} but models.{name} has no {use!r} entry")
    spec = {"revision": None, "dtype": "float32", "prompt": "", **entry[use]}
    return {"name": name, "family": entry["family"], **spec}


def dvclive_logger(live, prefix: str = ""):
    """A `log(step, {name: value})` callback for the library's training loops, writing to dvclive
    (the library itself knows nothing of dvclive)."""
    def log(step, values):
        live.step = step
        for key, value in values.items():
            live.log_metric(f"{prefix}{key}", value)
        live.next_step()
    return log


class LazyAdapter:
    """Stands in for an adapter and loads it on first use, so a run with nothing left to compute
    (e.g. one that only joins parallel workers' parts) never loads a model."""

    def __init__(self, load):
        self._load, self._adapter = load, None

    def __getattr__(self, name):
        if self._adapter is None:
            self._adapter = self._load()
        return getattr(self._adapter, name)
