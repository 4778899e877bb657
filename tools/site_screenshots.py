#!/usr/bin/env python3
"""Screenshots of a built explorer site for the README, taken with the browser the tests use
(Debian's chromium through Playwright, pages opened from file://).

    python tools/site_screenshots.py data/demo/site docs/img
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


def main(site: Path, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    site = site.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pages = sorted((site / "paintings").glob("*.html"))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=os.environ.get("PAINTSIM_CHROMIUM", "/usr/bin/chromium"),
                                     args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1040})
        page.goto((site / "index.html").as_uri())
        page.wait_for_function("() => Number(document.getElementById('map').dataset.drawn) > 0")
        page.wait_for_timeout(1000)
        page.screenshot(path=str(out / "explorer_index.png"))
        page.goto(pages[0].as_uri())
        page.wait_for_function("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=str(out / "explorer_painting.png"), full_page=True)
        browser.close()
    print(f"wrote {out / 'explorer_index.png'} and {out / 'explorer_painting.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
