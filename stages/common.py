"""What every stage script shares: running it (one-line errors, a polite stop on SIGTERM), reading
params.yaml, and resolving a model name to its checkpoint."""

import atexit
import difflib
import json
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import typer
import yaml

from conngeo import interrupt
from conngeo.resume import folder_digest, write_json  # noqa: F401 (the stages' write_json)

PARAMS = Path("params.yaml")
PROJECT = Path(__file__).resolve().parents[1]
OWN_CODE = (str(PROJECT / "src" / "conngeo"), str(PROJECT / "stages"))


def raised_by_us(err: BaseException) -> bool:
    """Whether the error was raised by the project's own code (a check with a message for the user:
    the file, what is wrong, what to do), not by a library underneath it."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(OWN_CODE)


def run(app) -> None:
    """Run a stage's typer app. SIGTERM (Slurm's preemption) stops the long loops after their current part and
    the stage exits 143 with its finished parts kept; an error the project raised on purpose (bad input, a
    missing file or checkpoint) is printed as one line on stderr and the stage exits 1; anything unexpected
    keeps its traceback."""
    interrupt.install()
    stage = Path(sys.argv[0]).stem
    try:
        app()
    except interrupt.Preempted as err:
        typer.echo(f"{stage}: {err}", err=True)
        raise SystemExit(143)
    except (ValueError, FileNotFoundError, KeyError, NotImplementedError) as err:
        if not raised_by_us(err):
            raise
        typer.echo(f"{stage}: error: {err.args[0] if err.args else err}", err=True)
        raise SystemExit(1)
    finally:
        interrupt.finished()


SPEC_KEYS = ("family", "source", "hub", "revision", "dtype", "prompt", "image_size")


def use_threads(threads: int | None) -> None:
    """torch's CPU threads (params `threads`; None: torch's choice). The count can change the last bits of a
    result (a sum split over more threads adds in another order), so it is a param, never a command-line option."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def write_timings(stage: str, name: str, **seconds: float) -> None:
    """Wall-clock seconds of a stage's run, kept out of its outputs and metrics (they differ on every run, so
    `dvc metrics diff` would list them): logs/timings/<stage>/<name>.json, git-ignored."""
    write_json(Path("logs/timings") / stage / f"{name}.json", {k: round(v, 2) for k, v in seconds.items()})


class Params(Mapping):
    """A read-only view of params.yaml that reads strictly: a key that is not there is a one-line error
    naming it and the nearest key that is (a typo in params.yaml never falls back to a default, because
    there are none outside params.yaml). Every leaf read and every section whose keys are listed is
    recorded; with CONNGEO_PARAMS_LOG set the stage appends what it read to that file at exit (the test
    that every key a stage reads is declared in its dvc.yaml `params` reads it)."""

    def __init__(self, data: dict, path: str = "", read: set | None = None):
        self._data, self._path, self._read = data, path, read if read is not None else set()

    def _key(self, key) -> str:
        return f"{self._path}.{key}" if self._path else str(key)

    def __getitem__(self, key):
        if key not in self._data:
            near = difflib.get_close_matches(str(key), [str(k) for k in self._data], n=1)
            hint = f" (is `{self._key(near[0])}` a typo of it?)" if near else ""
            raise KeyError(f"params.yaml has no `{self._key(key)}`{hint}; add it as in the committed params.yaml")
        value = self._data[key]
        if isinstance(value, dict):
            return Params(value, self._key(key), self._read)
        self._read.add(self._key(key))
        return value

    def __iter__(self):
        self._read.add(self._path + "/keys")  # the section's key set was read (e.g. which models there are)
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def plain(self) -> dict:
        """The section as plain data (every key in it read)."""
        return {k: v.plain() if isinstance(v, Params) else v for k, v in self.items()}


def load_params(path: Path = PARAMS) -> Params:
    params = Params(yaml.safe_load(Path(path).read_text()) or {})
    log = os.environ.get("CONNGEO_PARAMS_LOG")
    if log:
        atexit.register(lambda: open(log, "a").write(json.dumps({"argv": sys.argv, "read": sorted(params._read)}) + "\n"))
    return params


def checkpoint_spec(where: str, entry: dict, keys) -> dict:
    """The checkpoint fields `keys` of a registry entry, checked: a hub checkpoint is pinned by its full
    40-character revision (a short hash resolves offline only if the download used that exact string). A
    checkpoint without one (hub null: the tiny zoo, a folder of your own) gets the digest of its files
    (conngeo.resume; None while the folder is missing), so that a folder retrained in place is another spec."""
    missing = [k for k in keys if k not in entry]
    if missing:
        raise SystemExit(f"params.yaml {where}: missing {missing}; every entry names {list(keys)}")
    spec = {k: entry[k] for k in keys}
    if spec.get("hub") and not re.fullmatch(r"[0-9a-f]{40}", str(spec.get("revision") or "")):
        raise SystemExit(f"params.yaml {where}.revision is {spec.get('revision')!r}: pin the hub checkpoint "
                         f"{spec['hub']} by its full 40-character commit hash")
    if "hub" in keys and not spec["hub"]:
        spec["digest"] = folder_digest(spec["source"]) if Path(spec["source"]).is_dir() else None
    return spec


def model_spec(name: str, params: dict) -> dict:
    """{name, family, source, hub, revision, dtype, prompt, image_size} of model `name` in `models`."""
    models = params.get("models") or {}
    if name not in models:
        raise SystemExit(f"unknown model {name!r} in params.yaml `models`; known: {sorted(models)}")
    spec = {"name": name, **checkpoint_spec(f"models.{name}", models[name], SPEC_KEYS)}
    if spec["hub"] and not spec["prompt"]:
        raise SystemExit(f"params.yaml models.{name}: a hub checkpoint ({spec['hub']}) is prompted through its chat "
                         "template: set its prompt")
    return spec


def extraction_spec(name: str, params: dict) -> dict:
    """What the extraction of model `name` is fingerprinted by: its model_spec, the storage dtype, and the
    image processor its checkpoint loads with on this machine (Adapter.processor_info: class and backend), so
    that parts made where another backend loads are never reused."""
    from conngeo.families import adapter_class

    spec = model_spec(name, params)
    spec["store_dtype"] = params["extract"]["store_dtype"] or spec["dtype"]
    spec["processor"] = adapter_class(spec["family"]).processor_info(spec["source"], spec["revision"], spec["hub"])
    return spec


def load_model(spec: dict, device: str):
    """The adapter of a `model_spec`, on `device`."""
    from conngeo.families import (
        load_adapter,  # here: a stage that only joins parts never imports the families
    )

    return load_adapter(spec["family"], spec["source"], revision=spec["revision"], device=device,
                        dtype=spec["dtype"], prompt=spec["prompt"], image_size=spec["image_size"], hub=spec["hub"])


def reference_spec(name: str, params: dict) -> dict:
    """{name, kind, source, hub, revision, dtype, pooling} of reference space `name`."""
    spaces = params["references"]["spaces"]
    if name not in spaces:
        raise SystemExit(f"unknown reference space {name!r}; params.yaml references.spaces has {sorted(spaces)}")
    entry = spaces[name]
    keys = ("kind", "source") if entry.get("kind") == "attributes" else (
        "kind", "source", "hub", "revision", "dtype", "pooling")
    return {"name": name, **checkpoint_spec(f"references.spaces.{name}", entry, keys)}


def load_reference_model(spec: dict, device: str):
    from conngeo.references import load_reference

    return load_reference(spec["kind"], spec["source"], revision=spec["revision"], device=device,
                          dtype=spec["dtype"], pooling=spec["pooling"], hub=spec["hub"])


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
        self.load_seconds = 0.0  # how long loading took (0 if it never loaded), for the stage's timings

    @property
    def loaded(self) -> bool:
        return self._adapter is not None

    def __getattr__(self, name):
        if self._adapter is None:
            start = time.perf_counter()
            self._adapter = self._load()
            self.load_seconds = time.perf_counter() - start
        return getattr(self._adapter, name)
