"""Debian's headless Chromium driven by Playwright (no browser download: `executable_path`), shared by the
report's test and by the README's screenshot:

    .venv/bin/python -m tests.report.screenshot REPORT.html docs/img/coverage-report.png

(REPORT.html from `iotjx demo` or `iotjx report coverage --html`)."""

from __future__ import annotations

import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
# As root, without a sandbox; no background traffic (this machine's network is closed: each try would fail).
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@contextmanager
def browser():
    from playwright.sync_api import sync_playwright

    if CHROMIUM is None:
        raise RuntimeError("Debian's chromium is not installed: apt-get install -y chromium")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def screenshot(html: Path, out: Path, *, width: int = 1280, height: int = 1400, skip_to: str | None = None) -> None:
    """The top `height` pixels of the page (from the element `skip_to`, a CSS selector, when given)."""
    with browser() as b:
        page = b.new_page(viewport={"width": width, "height": height})
        page.goto(html.resolve().as_uri(), wait_until="load")
        top = page.eval_on_selector(skip_to, "e => e.getBoundingClientRect().top + window.scrollY") if skip_to else 0
        page.screenshot(path=str(out), clip={"x": 0, "y": top, "width": width, "height": height}, full_page=True)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: python -m tests.report.screenshot REPORT.html OUT.png [CSS-selector to start at]")
    screenshot(Path(sys.argv[1]), Path(sys.argv[2]), skip_to=sys.argv[3] if len(sys.argv) == 4 else None)
