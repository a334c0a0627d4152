"""Apply a params profile (e.g. profiles/smoke.yaml) over params.yaml.

    python scripts/apply_profile.py profiles/smoke.yaml            # print `-S key=value` flags for `dvc exp run`
    python scripts/apply_profile.py profiles/smoke.yaml --write    # rewrite params.yaml merged (drops comments)

A key written `~name` (any value) removes `name`, as `dvc exp run -S '~section.name'` does: a profile
can drop entries of a registry (e.g. connector variants) that it does not want to run.
"""

import json
from pathlib import Path

import typer
import yaml

app = typer.Typer(add_completion=False)


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if key.startswith("~"):
            flat[f"~{prefix}{key[1:]}"] = None
        elif isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if key.startswith("~"):
            out.pop(key[1:], None)
            continue
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


@app.command()
def main(profile: Path, params: Path = Path("params.yaml"), write: bool = typer.Option(False, help="rewrite params")):
    """Print `dvc exp run -S` flags for PROFILE, or merge it into params.yaml with --write."""
    over = yaml.safe_load(profile.read_text()) or {}
    if write:
        merged = merge(yaml.safe_load(params.read_text()), over)
        params.write_text(yaml.safe_dump(merged, sort_keys=False))
    else:
        # JSON spelling of values is valid YAML, which is what -S parses
        typer.echo(" ".join(f"-S '{k}'" if k.startswith("~") else f"-S '{k}={json.dumps(v)}'"
                            for k, v in flatten(over).items()))


if __name__ == "__main__":
    app()
