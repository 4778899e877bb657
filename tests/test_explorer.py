"""explore_collection.py: the static site, built for real and opened from file:// in headless
Chromium (Debian's chromium, driven by Playwright). Without a browser the browser tests skip
locally and fail in CI (PAINTSIM_REQUIRE_BROWSER=1, set by .ci/run)."""
from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import run_script
from paintsim.manifest import read_manifest, write_manifest
from paintsim.site import SiteConfig, build_site
from paintsim.site.links import check_site, data_rows
from synthetic_collection import make_collection

HOSTILE = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic"]


def _cfg(**kw) -> SiteConfig:
    base = dict(k=5, progress=False, view_size=96, thumb_size=64)
    base.update(kw)
    return SiteConfig(**base)


@pytest.fixture()
def collection(tmp_path):
    data = make_collection(tmp_path / "data", n_random=20, n_groups=2, k=10)
    m = read_manifest(data["root"] / "manifest.csv")
    m.loc[0, "title"] = HOSTILE
    m.loc[0, "attribution"] = "Artist & <b>Sons</b>"
    write_manifest(data["root"] / "manifest.csv", m)
    return data


def _stems(site: Path) -> list[str]:
    fields, rows = data_rows(site)
    return [r[fields.index("stem")] for r in rows]


def test_the_site_has_a_page_per_painting_thumbnails_a_map_and_no_broken_link(collection):
    root = collection["root"]
    summary = build_site(root, _cfg())
    site = root / "site"
    stems = _stems(site)
    assert len(stems) == 28 and summary.n == 28
    assert all((site / "paintings" / f"{s}.html").is_file() and (site / "thumbs" / f"{s}.jpg").is_file()
               for s in stems)
    coords = np.load(root / "map_2d.npy")
    assert coords.shape == (28, 2) and coords.dtype == np.float32 and np.isfinite(coords).all()
    broken, outside = check_site(site)
    assert broken == []
    # links out are each painting's record at the source (NGA's object page for an NGA row), never followed
    assert len(outside) == 28 and all("https://www.nga.gov/collection/art-object-page.10" in o for o in outside)
    # a painting page lists its k neighbours from the table, in order, each linking to its page
    page = (site / "paintings" / f"{stems[3]}.html").read_text()
    linked = re.findall(r'class="card" href="\.\./paintings/([^"]+)\.html"', page)
    assert linked == [stems[j] for j in collection["index"][3][:5]]
    assert "random pairs of paintings of this collection score" in page


def test_a_record_link_is_a_column_of_ones_own_or_ngas_page_only_for_an_image_nga_served(collection):
    root = collection["root"]
    m = read_manifest(root / "manifest.csv")
    m["web_link"] = ""
    m.loc[1, "web_link"] = "javascript:alert(1)"
    m.loc[2, "web_link"] = "https://museum.example/objects/2"
    m.loc[3, "url"] = "http://127.0.0.1:9/iiif/x/full/max/0/default.jpg"  # own uuid + numeric objectid, not NGA's
    write_manifest(root / "manifest.csv", m)
    build_site(root, _cfg(record_column="web_link"))
    stems = _stems(root / "site")
    pages = [(root / "site" / "paintings" / f"{s}.html").read_text() for s in stems[:4]]
    assert "javascript:" not in pages[1] and 'href="https://museum.example/objects/2"' in pages[2]
    # a row without a link of its own gets NGA's page only when NGA served its image
    assert "art-object-page.1000.html" in pages[0] and 'class="record"' not in pages[3]


def test_titles_and_artists_from_the_csv_are_escaped(collection):
    root = collection["root"]
    build_site(root, _cfg())
    site = root / "site"
    html = "".join(p.read_text() for p in (site / "paintings").glob("*.html"))
    assert "<script>window.pwned" not in html and "&lt;script&gt;window.pwned=1&lt;/script&gt;" in html
    assert "Artist &amp; &lt;b&gt;Sons&lt;/b&gt;" in html
    data = (site / "data" / "paintings.js").read_text()
    assert "</script>" not in data and "<\\/script>" in data


def test_a_rebuild_rewrites_only_what_changed(collection):
    root = collection["root"]
    first = build_site(root, _cfg())
    assert first.written > 28
    again = build_site(root, _cfg())
    assert again.written == 0 and again.unchanged == first.written + first.unchanged
    # a new title: the painting's page, the pages that show it as a neighbour, and the data file
    m = read_manifest(root / "manifest.csv")
    m.loc[5, "title"] = "A New Title"
    write_manifest(root / "manifest.csv", m)
    shows_5 = int((collection["index"][:, :5] == 5).any(axis=1).sum())
    third = build_site(root, _cfg())
    assert third.written == 1 + shows_5 + 1
    assert "A New Title" in (root / "site" / "paintings" / f"{_stems(root / 'site')[5]}.html").read_text()


def test_a_painting_gone_from_the_collection_loses_its_page(collection, tmp_path):
    root = collection["root"]
    build_site(root, _cfg())
    site = root / "site"
    stray = site / "paintings" / "gone.html"
    stray.write_text("old")
    (site / "thumbs" / "gone.jpg").write_bytes(b"old")
    summary = build_site(root, _cfg())
    assert summary.removed == 2 and not stray.exists()


def test_the_stage_script_builds_the_site_and_says_where_it_is(collection):
    proc = run_script("explore_collection.py", "--data-dir", collection["root"], "--k", "4", "--no-progress",
                      "--view-size", "0")
    assert f"site: {collection['root'] / 'site' / 'index.html'}" in proc.stdout
    assert "trustworthiness@10" in proc.stdout
    bad = run_script("explore_collection.py", "--data-dir", collection["root"], "--k", "40", check=False)
    assert bad.returncode == 2 and "--k 40" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------------- in a real browser

def _chromium() -> str | None:
    for cand in (os.environ.get("PAINTSIM_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if cand and Path(cand).is_file():
            return cand
    return None


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        exe = None
    if exe is None:
        reason = "no headless Chromium (apt-get install chromium) or Playwright (pip install playwright)"
        if os.environ.get("PAINTSIM_REQUIRE_BROWSER"):
            pytest.fail(f"browser tests must run here: {reason}")
        pytest.skip(reason)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=BROWSER_ARGS)
        yield b
        b.close()


class Visit:
    """A page opened from file://, recording every request, console error and page error."""

    def __init__(self, browser, url: str):
        self.page = browser.new_page(viewport={"width": 1200, "height": 900})
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.goto(url)
        self.page.wait_for_load_state("load")

    def left_the_machine(self) -> list[str]:
        return [u for u in self.requests if not u.startswith(("file://", "data:", "about:"))]

    def broken_images(self) -> list[str]:
        self.page.evaluate("() => Promise.all([...document.images].map(i => i.decode().catch(() => null)))")
        return self.page.evaluate(
            "() => [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")


def test_the_collection_page_draws_the_map_and_its_search_filters_the_grid(collection, browser):
    build_site(collection["root"], _cfg())
    v = Visit(browser, (collection["root"] / "site" / "index.html").as_uri())
    page = v.page
    page.wait_for_function("() => Number(document.getElementById('map').dataset.drawn) > 0")
    assert page.locator("#grid .card").count() == 28
    assert page.inner_text("#count") == "28 paintings"
    # the map has ink: points and pictures drawn on the canvas, not a blank rectangle
    page.wait_for_timeout(300)  # the thumbnails drawn as they arrive
    shot = np.asarray(Image.open(io.BytesIO(page.locator("#map").screenshot())).convert("L"))
    assert (shot < 235).sum() > 2000
    page.fill("#q", "Painting 1")  # "Painting 1", "Painting 10".."Painting 19"
    assert page.inner_text("#count") == "11 of 28 paintings"
    assert page.locator("#grid .card").count() == 11
    page.fill("#q", "")
    page.fill("#from", "1410")
    page.fill("#to", "1415")
    assert page.inner_text("#count") == "6 of 28 paintings"
    # the hostile title is text on the page, and ran nowhere
    page.fill("#from", "")
    page.fill("#to", "")
    page.fill("#q", "pwned")
    assert page.locator("#grid .card .t").inner_text() == HOSTILE
    assert page.evaluate("() => window.pwned") is None and v.dialogs == []
    assert v.broken_images() == []
    assert v.errors == [] and v.left_the_machine() == []
    page.close()


def test_a_painting_page_shows_its_neighbours_and_their_links_open_their_pages(collection, browser):
    build_site(collection["root"], _cfg())
    site = collection["root"] / "site"
    stems = _stems(site)
    v = Visit(browser, (site / "paintings" / f"{stems[0]}.html").as_uri())
    page = v.page
    assert page.locator("h1").inner_text() == HOSTILE and page.evaluate("() => window.pwned") is None
    cards = page.locator(".neighbours .card")
    assert cards.count() == 5
    assert v.broken_images() == []
    first = collection["index"][0][0]
    with page.expect_navigation():
        cards.first.click()
    assert page.url.endswith(f"/paintings/{stems[first]}.html")
    assert page.locator(".neighbours .card").count() == 5 and v.broken_images() == []
    assert v.errors == [] and v.left_the_machine() == [] and v.dialogs == []
    page.close()


def test_a_click_on_the_map_opens_that_paintings_page(collection, browser):
    v, fields, rows = _open_index(collection, browser)
    page = v.page
    px, py = _on_screen(page, rows, fields, 7)
    page.mouse.move(px, py)
    assert not page.locator("#tooltip").is_hidden()
    with page.expect_navigation():
        page.mouse.click(px, py)
    assert "/paintings/" in page.url and page.url.endswith(".html")
    assert v.errors == [] and v.left_the_machine() == []
    page.close()


def _on_screen(page, rows, fields, i) -> tuple[float, float]:
    """Where painting i is drawn on the map now, in page pixels (the page's own transform)."""
    box = page.locator("#map").bounding_box()
    view = page.evaluate("() => window.paintsimExplorer.view")
    base = min(box["width"], box["height"]) * 0.46
    x, y = rows[i][fields.index("x")], rows[i][fields.index("y")]
    return (box["x"] + box["width"] / 2 + (x * base + view["x"]) * view["s"],
            box["y"] + box["height"] / 2 - (y * base - view["y"]) * view["s"])


def _open_index(collection, browser):
    """Build the site, open its collection page and wait until the map is drawn."""
    build_site(collection["root"], _cfg())
    site = collection["root"] / "site"
    fields, rows = data_rows(site)
    v = Visit(browser, (site / "index.html").as_uri())
    v.page.wait_for_function("() => Number(document.getElementById('map').dataset.drawn) > 0")
    return v, fields, rows


def test_the_artist_filter_narrows_the_grid_and_hovering_the_map_names_title_and_artist(collection, browser):
    v, fields, rows = _open_index(collection, browser)
    page = v.page
    planted = sum(r[fields.index("artist")] == "Planted Artist 1" for r in rows)
    assert planted == 4
    page.fill("#artist", "planted artist 1")
    assert page.inner_text("#count") == f"{planted} of 28 paintings"
    assert {t.inner_text() for t in page.locator("#grid .card .a").all()} == {"Planted Artist 1"}
    page.fill("#artist", "")
    page.mouse.move(*_on_screen(page, rows, fields, 7))
    tip = page.inner_text("#tooltip")
    assert tip.startswith(rows[7][fields.index("title")]) and rows[7][fields.index("artist")] in tip
    # the hostile title is text in the tooltip too
    page.mouse.move(*_on_screen(page, rows, fields, 0))
    assert page.inner_text("#tooltip").startswith(HOSTILE) and page.evaluate("() => window.pwned") is None
    assert v.errors == [] and v.left_the_machine() == []
    page.close()


def test_the_map_zooms_about_the_cursor_and_a_drag_pans_it_without_opening_a_page(collection, browser):
    v, fields, rows = _open_index(collection, browser)
    page = v.page
    drawn = lambda: int(page.evaluate("() => document.getElementById('map').dataset.drawn"))  # noqa: E731
    assert drawn() == 28
    x7, y7 = _on_screen(page, rows, fields, 7)
    px, py = round(x7), round(y7)  # mouse events carry whole pixels
    page.mouse.move(px, py)
    for _ in range(3):
        page.mouse.wheel(0, -500)
    page.wait_for_function("() => window.paintsimExplorer.view.s > 5")
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    # zoomed about the cursor: the point under it stays there, and fewer paintings are in view
    s = page.evaluate("() => window.paintsimExplorer.view.s")
    qx, qy = _on_screen(page, rows, fields, 7)
    assert abs(qx - (px + (x7 - px) * s)) < 0.5 and abs(qy - (py + (y7 - py) * s)) < 0.5
    assert drawn() < 28
    px, py = round(qx), round(qy)
    page.mouse.move(px + 3, py)
    page.mouse.move(px, py)
    assert page.inner_text("#tooltip").startswith(rows[7][fields.index("title")])
    # a drag that starts on a painting moves the map and opens nothing
    url = page.url
    page.mouse.down()
    page.mouse.move(px + 60, py + 40, steps=5)
    page.mouse.up()
    page.wait_for_timeout(200)
    assert page.url == url
    rx, ry = _on_screen(page, rows, fields, 7)
    assert abs(rx - (qx + 60)) < 0.5 and abs(ry - (qy + 40)) < 0.5
    assert v.errors == [] and v.left_the_machine() == []
    page.close()


def test_the_evaluation_page_shows_the_report_with_its_intervals_chance_and_figures(collection, browser):
    root = collection["root"]
    run_script("evaluate_unsupervised.py", "--data-dir", root, "--label-column", "attribution", "--skip-copies",
               "--skip-pixels", "--skip-faces", "--no-progress")
    build_site(root, _cfg())
    v = Visit(browser, (root / "site" / "index.html").as_uri())
    page = v.page
    with page.expect_navigation():
        page.click("header nav >> text=Evaluation")
    assert page.url.endswith("/evaluation.html")
    table = page.inner_text("pre.table")
    assert "precision @1 / @5 / @10" in table and "1.000 / 0.600 / 0.300" in table
    assert "95% interval (bootstrap)" in table and "chance (random ranking)" in table
    assert page.locator("img.figure").count() == 2 and v.broken_images() == []
    assert v.errors == [] and v.left_the_machine() == []
    page.close()
