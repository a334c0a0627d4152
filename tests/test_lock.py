"""requirements.lock pins every library `make setup` installs, within what pyproject.toml allows."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def make_variable(name: str) -> str:
    match = re.search(rf"^{name} \?= (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    return match.group(1).strip()


def pins() -> dict[str, str]:
    lines = [line.strip() for line in (ROOT / "requirements.lock").read_text().splitlines()]
    pairs = [line.split("==") for line in lines if line and not line.startswith("#")]
    return {canonicalize_name(name): version for name, version in pairs}


def setup_requirements() -> list[Requirement]:
    """The project's dependencies with the extras that `make setup` installs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = make_variable("EXTRAS").split(",")
    listed = project["dependencies"] + [r for extra in extras for r in project["optional-dependencies"][extra]]
    return [Requirement(r) for r in listed]


def test_make_setup_uses_the_lock():
    assert make_variable("CONSTRAINTS") == "requirements.lock"


def test_every_requirement_is_pinned_inside_its_range():
    locked = pins()
    assert "torch" not in locked, "torch is the Makefile's TORCH, a CPU or CUDA build: leave it out of the lock"
    for requirement in setup_requirements():
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        assert name in locked, f"{requirement.name} is not in requirements.lock: renew it (see its header)"
        assert requirement.specifier.contains(locked[name], prereleases=True), \
            f"requirements.lock pins {requirement.name}=={locked[name]}, outside pyproject.toml's {requirement.specifier}"
