#!/usr/bin/env python3
"""The explorer's build time, site size and page load times, at the sample's size, N = 20,000 and NGA's size.

    python benchmarks/bench_explorer.py --data-dir data/demo --fresh    # an existing data dir (the demo)
    python benchmarks/bench_explorer.py --n 20000 --dir /tmp/paintsim-bench-site
    python benchmarks/bench_explorer.py --n 122477 --dir /tmp/paintsim-bench-site   # about 15 min, 2.6 GB

With ``--n``, a synthetic collection is written first: realistic anisotropic features (cosines
around 0.5-0.8, from ``bench_map.build``), the real sample paintings hard-linked as its images
(so thumbnails are made from real JPEGs), a manifest with titles, artists and years, and the exact
neighbour table from ``optimized_similarity.py``. Then ``explore_collection.py`` runs twice as a
child process (the first build, then a rebuild with nothing changed; wall time and peak RSS of
each), the site is measured (bytes, files, per 1,000 paintings), and headless Chromium (Debian's,
through Playwright) opens the index from ``file://`` until the map is drawn, and a painting page
until every image has decoded (median of 5 loads each); on the loaded index it times a redraw of the
whole map, a search over every title, and counts the page's DOM elements (which must not grow with
N). One JSON line, stamped with the machine (``machine_info.stamp``), is printed and saved under
``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from machine_info import stamp  # noqa: E402


def synthetic(root: Path, n: int, dim: int) -> None:
    import pandas as pd

    from bench_map import build
    from paintsim.manifest import MANIFEST_COLUMNS, write_manifest

    root.mkdir(parents=True, exist_ok=True)
    build(root / "features.npy", n, dim)
    sample = pd.read_csv(REPO / "data" / "sample" / "metadata.csv", dtype=str, keep_default_na=False)
    objects = pd.read_csv(REPO / "data" / "sample" / "objects.csv", dtype=str, keep_default_na=False)
    sample = sample.merge(objects[["objectid", "title"]], on="objectid")
    names = np.array([f"syn{i:06d}.jpg" for i in range(n)])
    np.save(root / "image_names.npy", names)
    (root / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, name in enumerate(names):
        src = sample.iloc[i % len(sample)]
        dest = root / "images" / name
        if not dest.exists():
            os.link(REPO / "data" / "sample" / src["file"], dest)
        row = dict.fromkeys(MANIFEST_COLUMNS, "")
        row.update(key=name[:-4], title=f"{src['title']} #{i}", attribution=src["artist"],
                   displaydate=str(int(rng.integers(1250, 1900))), file=f"images/{name}", status="ok")
        rows.append(row)
    write_manifest(root / "manifest.csv", pd.DataFrame(rows))
    subprocess.run([sys.executable, str(REPO / "optimized_similarity.py"), "--data-dir", str(root),
                    "--no-progress"], check=True)


def timed(cmd: list[str]) -> dict:
    """Wall time and peak RSS of one child process (GNU time's %M, so earlier children do not count)."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "PEAK_KB %M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    peak_kb = int(proc.stderr.rsplit("PEAK_KB", 1)[1].split()[0])
    return {"seconds": round(wall, 1), "peak_rss_mib": round(peak_kb / 1024),
            "last_lines": proc.stdout.strip().splitlines()[-4:]}


def site_size(site: Path) -> dict:
    sizes: dict[str, int] = {}
    files = 0
    for p in site.rglob("*"):
        if p.is_file():
            top = p.relative_to(site).parts[0] if len(p.relative_to(site).parts) > 1 else "(top)"
            sizes[top] = sizes.get(top, 0) + p.stat().st_size
            files += 1
    return {"bytes": sum(sizes.values()), "files": files, "by_folder_mib": {k: round(v / 2**20, 2) for k, v in sizes.items()}}


def load_times(site: Path, stem: str, repeats: int = 5) -> dict:
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    out = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=os.environ.get("PAINTSIM_CHROMIUM", "/usr/bin/chromium"),
                                     args=args)
        for label, url, ready in (
                ("index", (site / "index.html").as_uri(),
                 "() => Number(document.getElementById('map').dataset.drawn) > 0"),
                ("painting_page", (site / "paintings" / f"{stem}.html").as_uri(),
                 "() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")):
            times = []
            for _ in range(repeats):
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                t0 = time.perf_counter()
                page.goto(url)
                page.wait_for_function(ready, timeout=120_000)
                times.append(time.perf_counter() - t0)
                page.close()
            out[label] = {"median_s": round(statistics.median(times), 3), "all_s": [round(t, 3) for t in times]}
        out["index_interaction"] = interaction(browser, site)
        browser.close()
    return out


def interaction(browser, site: Path, repeats: int = 5) -> dict:
    """On the loaded collection page: a full redraw of the map, a search over every title and artist
    (until the grid shows the matches), and the number of DOM elements, which stays small at any N."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto((site / "index.html").as_uri())
    page.wait_for_function("() => Number(document.getElementById('map').dataset.drawn) > 0", timeout=120_000)
    redraw = page.evaluate("""(r) => { const t = [];
        for (let i = 0; i < r; i++) { const t0 = performance.now(); window.paintsimExplorer.draw();
                                      t.push(performance.now() - t0); } return t; }""", repeats)
    search = page.evaluate("""(r) => { const q = document.getElementById('q'), t = [];
        for (let i = 0; i < r; i++) { for (const v of ['madonna', '']) { const t0 = performance.now();
            q.value = v; q.dispatchEvent(new Event('input')); t.push(performance.now() - t0); } }
        return t; }""", repeats)
    dom = page.evaluate("() => document.getElementsByTagName('*').length")
    page.close()
    return {"redraw_ms_median": round(statistics.median(redraw), 1),
            "search_ms_median": round(statistics.median(search), 1), "dom_elements": dom}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=None, help="an existing data dir (default: build one)")
    ap.add_argument("--n", type=int, default=20000, help="paintings of the synthetic collection")
    ap.add_argument("--dim", type=int, default=1280, help="feature dimension of the synthetic collection")
    ap.add_argument("--fresh", action="store_true",
                    help="with --data-dir: delete its site/ and map_2d.* first, so the first build is one "
                         "(the synthetic collection always starts so)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/paintsim-bench-site"), help="where it is written")
    a = ap.parse_args()
    root = a.data_dir.resolve() if a.data_dir else None
    if root is None:
        root = a.dir / f"n{a.n}"
        if not (root / "top_10_similar.npy").exists():
            synthetic(root, a.n, a.dim)
    if a.fresh or a.data_dir is None:  # the first build is timed from nothing
        shutil.rmtree(root / "site", ignore_errors=True)
        for f in ("map_2d.npy", "map_2d.json"):
            (root / f).unlink(missing_ok=True)
    n = len(np.load(root / "image_names.npy"))
    cmd = [sys.executable, str(REPO / "explore_collection.py"), "--data-dir", str(root), "--no-progress"]
    first = timed(cmd)
    again = timed(cmd)
    site = root / "site"
    size = site_size(site)
    stem = sorted((site / "paintings").iterdir())[n // 2].stem
    result = {"n": n, "first_build": first, "rebuild_nothing_changed": again, "site": size,
              "site_mib_per_1000": round(size["bytes"] / 2**20 / n * 1000, 2),
              "build_seconds_per_1000": round(first["seconds"] / n * 1000, 2),
              "load": load_times(site, stem), **stamp()}
    print(json.dumps(result))
    out = REPO / "benchmarks" / "results" / f"explorer_n{n}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
