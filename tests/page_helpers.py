"""Pages in a real browser for the tests: scripts/check_page.py (headless Chromium over its DevTools pipe),
or a skip with the reason where no Chromium can start."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_check_page():
    """scripts/check_page.py as a module (registered: its dataclasses look their module up)."""
    if "check_page" not in sys.modules:
        spec = importlib.util.spec_from_file_location("check_page", ROOT / "scripts" / "check_page.py")
        sys.modules["check_page"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["check_page"])
    return sys.modules["check_page"]


def browser_check(page: Path, screenshot: Path | None = None):
    """scripts/check_page.check, or a skip with the reason where no Chromium can start."""
    check_page = load_check_page()
    try:
        return check_page.check(page, screenshot)
    except check_page.BrowserUnavailable as err:
        pytest.skip(f"no headless Chromium here: {err} (.ci/run installs it)")
