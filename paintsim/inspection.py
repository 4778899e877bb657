"""Stage 2: look at what stage 1 produced before spending compute on it.

Reads ``manifest.csv`` and every image it lists as ok: counts per status, the failure reasons,
the size distribution (pixels and bytes), files that are missing or do not decode, exact
duplicate files (same SHA-256), and a contact sheet of random images with title and artist.
The report is printed and written to ``inspection.json``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifacts import DataPaths, write_json_atomic
from .manifest import read_manifest
from .errors import UserError
from .images import ImageDecodeError, list_folder, read_file, verify_image

log = logging.getLogger(__name__)

CONTACT_SHEET = "contact_sheet.png"


@dataclass
class _FileCheck:
    file: str
    ok: bool
    error: str = ""
    width: int = 0
    height: int = 0
    bytes: int = 0
    sha256: str = ""


def _check(root: Path, rel: str, folder: Path | None = None) -> _FileCheck:
    # the manifest is ours, but still untrusted: only images/<name> inside the data dir is opened;
    # a folder's own listing (``folder``) names files that are there
    rel_path = Path(rel)
    if folder is not None:
        path = folder / rel_path.name
    elif rel_path.is_absolute() or ".." in rel_path.parts or len(rel_path.parts) != 2 \
            or rel_path.parts[0] != "images":
        return _FileCheck(rel, False, f"file {rel!r} is not of the form images/<name>")
    else:
        path = root / rel_path
    try:
        data = read_file(path)
    except ImageDecodeError as exc:
        return _FileCheck(rel, False, str(exc).replace(f"{path}: ", ""))
    digest = hashlib.sha256(data).hexdigest()
    try:
        info = verify_image(data, str(path))
    except ImageDecodeError as exc:
        return _FileCheck(rel, False, str(exc).replace(f"{path}: ", ""), bytes=len(data), sha256=digest)
    return _FileCheck(rel, True, width=info.width, height=info.height, bytes=len(data), sha256=digest)


def _distribution(values: list[int]) -> dict:
    if not values:
        return {"count": 0}
    arr = np.asarray(values, dtype=np.float64)
    q = np.percentile(arr, [0, 5, 50, 95, 100])
    return {"count": int(arr.size), "min": int(q[0]), "p5": float(q[1]), "median": float(q[2]),
            "p95": float(q[3]), "max": int(q[4]), "mean": float(arr.mean()), "total": int(arr.sum())}


def _folder_listing(folder: Path):
    """A manifest-shaped table of a folder's files (no metadata: the title is the file's stem)."""
    import pandas as pd

    files = [p.name for p in list_folder(folder)]
    return pd.DataFrame({"file": files, "title": [Path(f).stem for f in files], "attribution": "",
                         "status": "ok", "error": "", "bytes": ""}, dtype=str)


def images_dir_of(paths: DataPaths) -> Path | None:
    """The folder a data dir's features were embedded from (``extract_features.py --images-dir``),
    when it has no manifest: inspect that folder then."""
    from .artifacts import read_json_object

    if paths.manifest.exists() or not paths.features_meta.exists():
        return None
    try:
        source = str(read_json_object(paths.features_meta).get("source", ""))
    except Exception:  # a damaged meta is refused by the stages that need it
        return None
    return Path(source[len("images-dir:"):]) if source.startswith("images-dir:") else None


def inspect_data(data_dir: str | os.PathLike[str], sheet_size: int = 24, seed: int = 0, workers: int = 4,
                 output: str | os.PathLike[str] | None = None, show: bool = False,
                 progress: bool = True, images_dir: str | os.PathLike[str] | None = None) -> dict:
    """Inspect the manifest and images of ``data_dir`` (or every file of ``images_dir``, a collection
    without a manifest); write the report and contact sheet; return the report."""
    from tqdm.auto import tqdm

    from .figures import contact_sheet

    paths = DataPaths.of(data_dir)
    folder = Path(images_dir) if images_dir else images_dir_of(paths)
    if folder is not None:
        try:
            df = _folder_listing(folder)
        except NotADirectoryError as exc:
            raise UserError(f"--images-dir {exc}") from None
        log.info("inspecting every file of %s (no manifest)", folder)
    else:
        df = read_manifest(paths.manifest)
    status_counts = Counter(df["status"])
    failures = Counter(str(e).split(" (after ")[0][:160] for e in df.loc[df["status"] != "ok", "error"])
    ok = df[df["status"] == "ok"]
    files = list(ok["file"])
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        checks = list(tqdm(pool.map(lambda f: _check(paths.root, f, folder), files), total=len(files),
                           desc="inspect", unit="img", disable=not progress))
    good = [c for c in checks if c.ok]
    unreadable = [{"file": c.file, "error": c.error} for c in checks if not c.ok]

    by_hash: dict[str, list[str]] = defaultdict(list)
    for c in checks:
        if c.sha256:
            by_hash[c.sha256].append(c.file)
    titles = dict(zip(ok["file"], ok["title"] + " / " + ok["attribution"]))
    duplicates = [{"sha256": h, "files": sorted(fs), "paintings": [titles.get(f, "") for f in sorted(fs)]}
                  for h, fs in sorted(by_hash.items()) if len(fs) > 1]
    listed_bytes = dict(zip(ok["file"], ok["bytes"]))
    mismatched = [c.file for c in checks if c.ok and listed_bytes.get(c.file, "") not in ("", str(c.bytes))]

    report = {
        "manifest": str(folder) if folder else str(paths.manifest),
        "images_dir": str(folder) if folder else None,
        "rows": int(len(df)),
        "status": dict(sorted(status_counts.items())),
        "failure_reasons": dict(failures.most_common()),
        "readable_images": len(good),
        "unreadable": unreadable,
        "size_mismatch_vs_manifest": mismatched,
        "width": _distribution([c.width for c in good]),
        "height": _distribution([c.height for c in good]),
        "pixels": _distribution([c.width * c.height for c in good]),
        "bytes": _distribution([c.bytes for c in good]),
        "duplicates": duplicates,
        "duplicate_files": int(sum(len(d["files"]) - 1 for d in duplicates)),
    }

    sheet = Path(output) if output else paths.figures_dir / CONTACT_SHEET
    readable = {c.file for c in good}
    pool_rows = [r for r in ok.to_dict("records") if r["file"] in readable]
    chosen = random.Random(seed).sample(pool_rows, min(sheet_size, len(pool_rows))) if sheet_size > 0 else []
    if chosen:
        contact_sheet([(folder / r["file"]) if folder else paths.root / r["file"] for r in chosen],
                      [f"{r['title'] or 'Untitled'} — {r['attribution'] or 'unknown'}" for r in chosen],
                      sheet, title=f"{len(chosen)} of {len(pool_rows)} images in {folder or paths.root}",
                      show=show)
        report["contact_sheet"] = str(sheet)
    else:
        log.warning("no readable images: no contact sheet drawn")
        report["contact_sheet"] = None
    write_json_atomic(paths.inspection, report)
    return report


def format_report(report: dict) -> str:
    """The report as a few readable lines."""
    lines = [f"{report['manifest']}: {report['rows']} rows, "
             + ", ".join(f"{k} {v}" for k, v in report["status"].items())]
    for reason, n in list(report["failure_reasons"].items())[:10]:
        lines.append(f"  failed x{n}: {reason}")
    lines.append(f"  readable images: {report['readable_images']}; unreadable: {len(report['unreadable'])}")
    for u in report["unreadable"][:10]:
        lines.append(f"    unreadable {u['file']}: {u['error']}")
    for key in ("width", "height", "pixels", "bytes"):
        d = report[key]
        if d.get("count"):
            lines.append(f"  {key:>6}: min {d['min']}, median {d['median']:.0f}, p95 {d['p95']:.0f}, "
                         f"max {d['max']}")
    lines.append(f"  exact duplicates: {len(report['duplicates'])} group(s), "
                 f"{report['duplicate_files']} redundant file(s)")
    for d in report["duplicates"][:10]:
        lines.append(f"    same bytes: {', '.join(d['files'])}")
    if report["size_mismatch_vs_manifest"]:
        lines.append(f"  {len(report['size_mismatch_vs_manifest'])} file(s) differ in size from the manifest "
                     "(changed since download?)")
    if report.get("contact_sheet"):
        lines.append(f"  contact sheet: {report['contact_sheet']}")
    return "\n".join(lines)
