"""Open an HTML page from disk in headless Chromium and check it as a reader would see it: every image
loaded (natural width > 0), every `section.examples` has table rows, and no request left the file system
(every URL the page asked for, from the DevTools Network events, is file: or data:, and no
Content-Security-Policy violation was reported). Writes a PNG of the first screen.

    python scripts/check_page.py results/examples/index.html --screenshot docs/images/examples.png

Chromium is driven over its DevTools protocol through a pipe (--remote-debugging-pipe: JSON messages ended
by NUL on file descriptors 3 and 4), so it needs no package beyond Debian's `chromium`. Exits 1 with the
problems listed, 2 where no Chromium can be started.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import typer

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# in the page, once loaded: what its reader would see
INSPECT = """JSON.stringify({
  images: [...document.images].map(i => ({src: i.getAttribute("src"), complete: i.complete, width: i.naturalWidth})),
  sections: [...document.querySelectorAll("section.examples")].map(s => ({id: s.id, rows: s.querySelectorAll("tbody tr").length})),
  violations: window.__violations || [],
})"""
# before any of the page's own code: collect what its Content-Security-Policy blocked
WATCH = ("window.__violations = []; document.addEventListener('securitypolicyviolation', "
         "e => window.__violations.push(e.blockedURI + ' (' + e.violatedDirective + ')'));")


class BrowserUnavailable(RuntimeError):
    """No Chromium on this machine, or it did not start."""


def find_browser() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


class DevTools:
    """A headless Chromium and one page of it, over --remote-debugging-pipe."""

    def __init__(self, width: int = 1280, height: int = 800, timeout: float = 30.0):
        browser = find_browser()
        if browser is None:
            raise BrowserUnavailable(f"no Chromium found ({', '.join(BROWSERS)}); install Debian's `chromium`")
        self.timeout, self.events, self._buffer, self._id = timeout, [], b"", 0
        self._profile = tempfile.TemporaryDirectory(prefix="check_page_")
        to_browser, self._from_browser = os.pipe(), os.pipe()
        self._in, self._out = to_browser[1], self._from_browser[0]

        def on_fds_3_and_4():  # in the child: the protocol's fixed descriptors (dup first, 3 or 4 may be ours)
            read, write = os.dup(to_browser[0]), os.dup(self._from_browser[1])
            os.dup2(read, 3)
            os.dup2(write, 4)

        # no sandbox: CI runs as root, where Chromium refuses to start with it; the page is our own file
        self.proc = subprocess.Popen(
            [browser, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
             f"--user-data-dir={self._profile.name}", f"--window-size={width},{height}", "about:blank"],
            preexec_fn=on_fds_3_and_4, close_fds=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        os.close(to_browser[0])
        os.close(self._from_browser[1])
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        except (EOFError, TimeoutError, OSError) as err:
            self.close()
            raise BrowserUnavailable(f"{browser} did not start: {err}") from err
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def call(self, method: str, session: bool = False, **params) -> dict:
        """Send one command and return its result (protocol errors raise RuntimeError)."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._in, json.dumps(message).encode() + b"\0")
        reply = self.wait(lambda m, i=self._id: m.get("id") == i)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait(self, done) -> dict:
        """Read messages (events are kept in self.events) until one satisfies `done`."""
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if done(message):
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer from Chromium in {self.timeout:.0f} s")
            if select.select([self._out], [], [], left)[0]:
                chunk = os.read(self._out, 1 << 20)
                if not chunk:
                    raise EOFError(self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else "")
                self._buffer += chunk

    def open(self, path: Path) -> dict:
        """Load a file and return what INSPECT finds in it once its load event fired."""
        self.call("Network.enable", session=True)
        self.call("Page.enable", session=True)
        self.call("Page.addScriptToEvaluateOnNewDocument", session=True, source=WATCH)
        navigated = self.call("Page.navigate", session=True, url=Path(path).resolve().as_uri())
        if navigated.get("errorText"):
            raise RuntimeError(f"Chromium could not open it ({navigated['errorText']})")
        self.wait(lambda m: m.get("method") == "Page.loadEventFired" and m.get("sessionId") == self.session)
        result = self.call("Runtime.evaluate", session=True, expression=INSPECT, returnByValue=True)
        return json.loads(result["result"]["value"])

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    os.write(self._in, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
                    self.proc.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    self.proc.kill()
                    self.proc.wait()
        finally:
            for fd in (self._in, self._out):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._profile.cleanup()


@dataclass
class Report:
    """What the browser saw of one page, and what is wrong with it."""
    images: list[dict]
    sections: list[dict]
    requests: list[str]
    violations: list[str]
    problems: list[str] = field(default_factory=list)


def check(page: Path, screenshot: Path | None = None, width: int = 1280, height: int = 800) -> Report:
    """Open `page` in headless Chromium; the Report's problems list every image that did not load, every
    section without rows, every request that was not for a file: or data: URL, every CSP violation."""
    browser = DevTools(width, height)
    try:
        seen = browser.open(page)
        if screenshot is not None:
            browser.screenshot(screenshot)
        requests = browser.requests()
    finally:
        browser.close()
    report = Report(seen["images"], seen["sections"], requests, seen["violations"])
    report.problems += [f"image not loaded: {i['src']}" for i in report.images if not (i["complete"] and i["width"] > 0)]
    report.problems += [f"section without rows: #{s['id']}" for s in report.sections if s["rows"] == 0]
    report.problems += [f"request left the file system: {u}" for u in requests if not u.startswith(("file:", "data:"))]
    report.problems += [f"blocked by the page's Content-Security-Policy: {v}" for v in report.violations]
    return report


def main(page: Path = typer.Argument(..., help="the HTML file", exists=True, dir_okay=False),
         screenshot: Path = typer.Option(None, help="write a PNG of the first screen here"),
         width: int = typer.Option(1280, help="viewport width, pixels"),
         height: int = typer.Option(800, help="viewport height, pixels")):
    """Check PAGE in headless Chromium: images loaded, sections with rows, nothing fetched from elsewhere."""
    try:
        report = check(page, screenshot, width, height)
    except BrowserUnavailable as err:
        typer.echo(f"check_page: {err}", err=True)
        raise typer.Exit(2)
    except (TimeoutError, EOFError, RuntimeError) as err:  # not a page that loads, or Chromium went away
        typer.echo(f"check_page: {page}: {err}", err=True)
        raise typer.Exit(1)
    typer.echo(f"check_page: {page}: {len(report.images)} images, {len(report.sections)} sections, "
               f"{len(report.requests)} requests" + (f"; screenshot {screenshot}" if screenshot else ""))
    for problem in report.problems:
        typer.echo(f"  {problem}", err=True)
    raise typer.Exit(1 if report.problems else 0)


if __name__ == "__main__":
    typer.run(main)
