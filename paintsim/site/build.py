"""Build ``<data-dir>/site/``: the collection page with its map, one page per painting, the
evaluation page, thumbnails, and the data file the pages read.

A rebuild rewrites only what changed: every page is rendered and compared with the file on disk,
thumbnails are remade only for newer images, and pages of paintings no longer in the collection
are removed. Memory stays bounded at the full NGA size: pages are rendered one at a time, the
neighbour table and the map are the only arrays held, and the data file holds a few short fields
per painting.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import write_bytes_atomic
from ..errors import BadValue
from .records import Painting, paintings
from .thumbs import THUMB_SIZE, make_thumbs

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
#: The site's own static files (copied into site/assets/).
ASSETS = ("explorer.js", "style.css")
#: Grid cards the collection page renders at once (more on demand: the DOM stays small at any N).
GRID_PAGE = 60


@dataclass
class SiteConfig:
    """Every knob of the explorer; field names are the flags'."""

    k: int = 10
    map_method: str = "tsne"
    perplexity: float = 30.0
    seed: int = 0
    thumb_size: int = THUMB_SIZE
    view_size: int = 640
    workers: int = 2
    record_column: str | None = None
    device: str = "auto"
    progress: bool = True


@dataclass
class SiteSummary:
    site: Path
    n: int = 0
    written: int = 0
    unchanged: int = 0
    removed: int = 0
    thumbs: dict = field(default_factory=dict)
    views: dict = field(default_factory=dict)
    neighbours_from: str = ""
    map: dict = field(default_factory=dict)
    seconds: float = 0.0
    evaluation: bool = False
    faces: int = 0
    poses: int = 0
    face_files: set = field(default_factory=set)

    def text(self) -> str:
        tw = self.map.get("trustworthiness") or {}
        lines = [f"site: {self.site / 'index.html'} ({self.n:,} paintings; open it in a browser, no server needed)",
                 f"  pages written {self.written:,}, unchanged {self.unchanged:,}, removed {self.removed:,}; "
                 f"thumbnails {dict(self.thumbs)}; images {dict(self.views)}",
                 f"  neighbours from {self.neighbours_from}"]
        if tw:
            lo, hi = tw.get("ci95", [tw.get("value"), tw.get("value")])
            lines.append(f"  map: {self.map.get('method')}; trustworthiness@{tw.get('k')} {tw.get('value'):.3f} "
                         f"[{lo:.3f}, {hi:.3f}] (a random map: {tw.get('chance', float('nan')):.3f})")
        lines.append(f"  evaluation page: {'yes' if self.evaluation else 'no (run evaluate_unsupervised.py)'}; "
                     f"built in {self.seconds:.1f} s")
        return "\n".join(lines)


class _Writer:
    """Writes a file only when its bytes differ from what is on disk (the incremental rebuild)."""

    def __init__(self, summary: SiteSummary):
        self.summary = summary
        self.seen: set[Path] = set()

    def __call__(self, path: Path, content: str | bytes) -> None:
        data = content.encode("utf-8") if isinstance(content, str) else content
        self.seen.add(path)
        try:
            if path.stat().st_size == len(data) and path.read_bytes() == data:
                self.summary.unchanged += 1
                return
        except OSError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)
        self.summary.written += 1


def _environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                              autoescape=jinja2.select_autoescape(("html",), default=True),
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def _js_data(name: str, obj: Any) -> str:
    """A data file loaded by ``<script src>`` (``fetch`` of ``file://`` is blocked by browsers)."""
    text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return f"window.{name} = {text};\n"


def _card(p: Painting, score: float | None, has_thumb: bool, root: str) -> dict:
    return {"href": f"{root}{p.page}", "thumb": f"{root}{p.thumb}" if has_thumb else "", "title": p.title,
            "artist": p.artist, "date": p.date, "score": None if score is None else f"{score:.3f}"}


def _evaluation_page(env, data_dir_paths, site: Path, write: _Writer) -> bool:
    from ..evaluation.report import read_report, summary_table

    if not data_dir_paths.evaluation.exists():
        return False
    try:
        report = read_report(data_dir_paths.evaluation)
    except (ValueError, OSError) as exc:
        log.warning("evaluation page left out: %s", exc)
        return False
    figures = []
    for f in report.get("figures", []):
        src = Path(f)
        src = src if src.is_absolute() else data_dir_paths.root.parent / src
        if not src.is_file():
            src = data_dir_paths.figures_dir / Path(f).name
        if src.is_file() and src.suffix.lower() == ".png":
            dest = site / "evaluation" / src.name
            write(dest, src.read_bytes())
            figures.append(f"evaluation/{src.name}")
    write(site / "evaluation.html", env.get_template("evaluation.html").render(
        root="", title="Evaluation — paintsim", evaluation=True, table=summary_table(report),
        figures=figures, n=report.get("n_images"),
        neighbours_from=report.get("neighbours_from", "")))
    return True


def _part_sections(coll, items: list[Painting], has_thumb: list[bool], cfg: SiteConfig, site: Path,
                   summary: SiteSummary) -> dict[int, list[dict]]:
    """Further sections of painting pages from the faces and poses stages, when they have run:
    each face of the painting beside its nearest faces in other paintings, and each person's
    nearest poses in other paintings. {painting row: [section, ...]}."""
    from ..embeddings import Embeddings
    from ..faces import crop_face, faces_csv, read_faces_csv
    from ..images import ImageDecodeError, load_rgb
    from ..knn import top_k_other_groups
    from ..neighbours import find_table

    out: dict[int, list[dict]] = {}
    row_of = {str(nm): i for i, nm in enumerate(coll.names)}
    for kind in ("faces", "poses"):
        paths = coll.paths.of_kind(kind)
        if not paths.features.exists():
            continue
        try:
            emb = Embeddings.load(coll.paths.root, kind=kind)
            if kind == "faces":
                read_faces_csv(faces_csv(paths))
        except Exception as exc:  # noqa: BLE001 - a damaged part artifact leaves its section out
            log.warning("%s left out of the site: %s", kind, exc)
            continue
        owner = np.array([row_of.get(emb.image_name(i), -1) for i in range(len(emb))])
        groups = [emb.image_name(i) for i in range(len(emb))]
        k = min(cfg.k, len(emb) - int(np.unique(groups, return_counts=True)[1].max()))
        if k < 1:
            continue
        table = find_table(paths, k, len(emb), emb.sha256)
        if table is not None:
            index, score, where = table.index[:, :k], table.score[:, :k], table.describe()
        else:
            index, score = top_k_other_groups(emb.features, groups, k, device=cfg.device)
            where = f"an exact search of {paths.features.name}"
        crops: dict[int, str] = {}
        if kind == "faces":
            boxes = read_faces_csv(faces_csv(paths))
            csv_mtime = faces_csv(paths).stat().st_mtime
            crop_meta = emb.meta.get("crop", {}) if emb.meta else {}
            for i in range(len(emb)):
                image, f = str(emb.names[i]).rsplit("#", 1)
                if owner[i] < 0:
                    continue
                dest = site / "faces" / f"{items[owner[i]].stem}-{f}.jpg"
                summary.face_files.add(dest)
                src = coll.emb.images_dir / image
                try:
                    if not dest.exists() or dest.stat().st_mtime < max(src.stat().st_mtime, csv_mtime):
                        crop = crop_face(load_rgb(src), boxes[image][int(f)], crop_meta.get("margin", 0.3),
                                         crop_meta.get("align", True))
                        crop.thumbnail((160, 160))
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        from ..artifacts import atomic_path

                        with atomic_path(dest, suffix=".jpg") as tmp:
                            crop.convert("RGB").resize((160, 160)).save(tmp, "JPEG", quality=85)
                    crops[i] = f"../faces/{dest.name}"
                except (ImageDecodeError, OSError, KeyError, IndexError, ValueError) as exc:
                    log.warning("no crop of face %s: %s", emb.names[i], exc)
            summary.faces = len(emb)
        else:
            summary.poses = len(emb)
        for i in range(len(emb)):
            if owner[i] < 0:
                continue
            cards = []
            for j, s in zip(index[i], score[i]):
                o = int(owner[int(j)])
                if o < 0:
                    continue
                card = _card(items[o], float(s), has_thumb[o], "../")
                if kind == "faces" and int(j) in crops:
                    card["thumb"] = crops[int(j)]
                cards.append(card)
            n = str(emb.names[i]).rsplit("#", 1)[1]
            title = (f"Faces like face {int(n) + 1} of this painting" if kind == "faces"
                     else f"Poses like person {int(n) + 1} of this painting")
            out.setdefault(int(owner[i]), []).append(
                {"title": title, "source": where, "cards": cards, "query_thumb": crops.get(i, ""),
                 "note": f"Each card is a {kind[:-1]} of another painting; scores are cosine similarities of the "
                         f"{'face crops' if kind == 'faces' else 'pose descriptors'}."})
    return out


def build_site(data_dir: str | os.PathLike[str], cfg: SiteConfig) -> SiteSummary:
    """Build (or bring up to date) ``<data-dir>/site/``; returns what was done."""
    from .. import mapping
    from ..neighbours import neighbours_of_all
    from ..query import Collection, random_pair_level

    t0 = time.perf_counter()
    if cfg.k < 1:
        raise BadValue("k", cfg.k, "must be at least 1")
    coll = Collection.open(data_dir)
    paths = coll.paths
    site = paths.site_dir
    summary = SiteSummary(site=site, n=len(coll))
    write = _Writer(summary)
    env = _environment()

    index, score, where = neighbours_of_all(coll.emb, cfg.k, device=cfg.device, progress=cfg.progress)
    summary.neighbours_from = where
    result = mapping.map_for(coll.emb, method=cfg.map_method, seed=cfg.seed, perplexity=cfg.perplexity,
                             k=10, progress=cfg.progress)
    coords = np.asarray(result.coords, dtype=np.float32)
    tw = result.record.get("trustworthiness") or {}
    summary.map = {"method": result.record.get("method"),  # stable fields only: pages stay unchanged
                   "trustworthiness": {k: tw[k] for k in ("k", "value", "ci95", "chance") if k in tw}}
    level = random_pair_level(coll, seed=cfg.seed)

    items = paintings(coll, cfg.record_column)
    jobs = [(coll.image_path(p.row), site / p.thumb) for p in items]
    summary.thumbs, statuses = make_thumbs(jobs, cfg.thumb_size, cfg.workers, cfg.progress)
    has_thumb = [s != "unreadable" for s in statuses]
    has_view = [False] * len(items)
    if cfg.view_size > 0:
        views = [(coll.image_path(p.row), site / "images" / f"{p.stem}.jpg") for p in items]
        summary.views, vstat = make_thumbs(views, cfg.view_size, cfg.workers, cfg.progress, desc="images")
        has_view = [s != "unreadable" for s in vstat]

    for name in ASSETS:
        write(site / "assets" / name, (HERE / "static" / name).read_bytes())
    summary.evaluation = _evaluation_page(env, paths, site, write)
    title = "paintsim explorer"
    meta = coll.emb.meta
    about = {"n": len(items), "k": int(index.shape[1]), "backbone": meta.get("backbone", ""),
             "map": summary.map, "neighbours_from": where, "level": level}
    rows = [[p.stem, p.title, p.artist, p.date, p.year, round(float(coords[p.row, 0]), 5),
             round(float(coords[p.row, 1]), 5), int(has_thumb[p.row])] for p in items]
    write(site / "data" / "paintings.js", _js_data("PAINTSIM", {
        "fields": ["stem", "title", "artist", "date", "year", "x", "y", "thumb"], "rows": rows,
        "about": about}))
    write(site / "index.html", env.get_template("index.html").render(
        root="", title=title, about=about, evaluation=summary.evaluation, grid_page=GRID_PAGE))

    parts = _part_sections(coll, items, has_thumb, cfg, site, summary)
    page = env.get_template("painting.html")
    from tqdm.auto import tqdm

    for p in tqdm(items, desc="pages", unit="page", disable=not cfg.progress):
        cards = [_card(items[int(j)], float(s), has_thumb[int(j)], "../")
                 for j, s in zip(index[p.row], score[p.row])]
        sections = [{"title": "Most similar paintings", "source": where, "cards": cards, "query_thumb": "", "note": ""}]
        sections += parts.get(p.row, [])
        write(site / p.page, page.render(
            root="../", title=f"{p.title} — paintsim", p=p,
            image=f"../images/{p.stem}.jpg" if has_view[p.row] else (f"../{p.thumb}" if has_thumb[p.row] else ""),
            sections=sections, level=level, evaluation=summary.evaluation))

    # what the collection no longer has: pages, thumbnails and images of removed paintings
    keep = {site / p.page for p in items} | {site / p.thumb for p in items} | \
           {site / "images" / f"{p.stem}.jpg" for p in items} | write.seen | summary.face_files
    for folder in ("paintings", "thumbs", "images", "evaluation", "faces"):
        d = site / folder
        if not d.is_dir():
            continue
        for f in d.iterdir():
            if f.is_file() and f not in keep:
                f.unlink()
                summary.removed += 1
    if not summary.evaluation and (site / "evaluation.html").exists():
        (site / "evaluation.html").unlink()
        shutil.rmtree(site / "evaluation", ignore_errors=True)
    summary.seconds = time.perf_counter() - t0
    return summary
