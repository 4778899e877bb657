"""Retrieval against metadata: do the neighbours share the painting's artist (or school, ...)?

Relevance = the same value of a label column (the manifest's ``attribution`` by default, or a
column of another CSV joined on a key); precision@k, recall@k and mAP@k over the queries whose
label has at least one other member, each with a bootstrap interval over the queries and what a
random ranking would score. Placeholder labels ("Unknown", "Anonymous", ...) are not an artist:
two paintings by nobody-knows-who are not a correct match, so they count as unknown.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import metrics
from ..errors import UserError
from ..manifest import manifest_by_name

#: Ranks reported for retrieval against metadata.
RETRIEVAL_KS = (1, 5, 10)
#: Labels that say "we do not know" rather than name a group; compared after trimming, collapsing
#: spaces and ignoring case. Empty labels are always unknown (counted as ``unlabelled``).
PLACEHOLDER_LABELS = (
    "unknown", "unknown artist", "artist unknown", "not known", "anonymous", "anonymous artist",
    "anon.", "anon", "unidentified", "unidentified artist", "various", "various artists", "n/a", "na",
    "none", "null", "-", "?",
)
#: ``--labels-on`` value that joins on the image file name instead of a manifest column.
ON_NAME = "name"


class LabelsUnavailable(UserError):
    """The labels' source (manifest.csv) is absent: retrieval cannot run, which is an error only
    when the user asked for it."""


def _norm(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def parse_placeholders(text: str | None) -> tuple[str, ...]:
    """``None`` -> :data:`PLACEHOLDER_LABELS`; ``"a, b"`` -> ("a", "b"); ``""`` -> none."""
    if text is None:
        return PLACEHOLDER_LABELS
    return tuple(dict.fromkeys(_norm(t) for t in str(text).split(",") if _norm(t)))


def _read_labels_csv(path: str) -> Any:
    import pandas as pd

    lp = Path(path)
    if not lp.is_file():
        raise UserError(f"--labels-csv {lp}: no such file")
    try:
        return pd.read_csv(lp, dtype=str, keep_default_na=False, encoding="utf-8")
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"--labels-csv {lp}: not a readable UTF-8 CSV ({str(exc).strip()})") from None


def _csv_labels(paths, names: np.ndarray, column: str, labels_csv: str,
                labels_on: str) -> tuple[list[str], dict]:
    """Each image's label from ``labels_csv`` joined on ``labels_on`` (first row per key)."""
    extra = _read_labels_csv(labels_csv)
    cols = ", ".join(extra.columns)
    if column not in extra.columns:
        raise UserError(f"--labels-csv {labels_csv}: no column {column!r} (columns: {cols})")
    if labels_on == ON_NAME:
        key_col = next((c for c in (ON_NAME, "file") if c in extra.columns), None)
        if key_col is None:
            raise UserError(f"--labels-on name: {labels_csv} has no 'name' or 'file' column of image file "
                            f"names (columns: {cols})")
        csv_keys = extra[key_col].map(lambda f: Path(f.strip()).name if f.strip() else "")
        image_keys = [Path(str(nm)).name for nm in names]
    else:
        key_col = labels_on
        if labels_on not in extra.columns:
            raise UserError(f"--labels-on {labels_on}: {labels_csv} has no column {labels_on!r} (columns: {cols})")
        if not paths.manifest.exists():
            raise LabelsUnavailable(f"{paths.manifest} does not exist, and --labels-on {labels_on} joins "
                                    "through it (--labels-on name joins on the image file names)")
        manifest = manifest_by_name(paths.manifest)
        if labels_on not in manifest.columns:
            raise UserError(f"--labels-on {labels_on}: {paths.manifest} has no column {labels_on!r} "
                            f"(columns: {', '.join(c for c in manifest.columns if c != 'name')})")
        by_name = manifest[labels_on].str.strip()
        image_keys = [by_name.get(str(nm), "") for nm in names]
        csv_keys = extra[key_col].str.strip()
    table = dict.fromkeys(k for k in csv_keys if k)
    for key, label in zip(csv_keys, extra[column]):
        if key and table[key] is None:
            table[key] = label
    matched = {k for k in image_keys if k and k in table}
    labels = [table.get(k) or "" if k else "" for k in image_keys]
    n_rows = int(sum(1 for k in csv_keys if k))
    return labels, {"label_source": f"{Path(labels_csv).name}:{column} joined on {labels_on}",
                    "labels_on": labels_on, "labels_csv_rows": n_rows,
                    "labels_csv_duplicate_keys": n_rows - len(table),
                    "labels_csv_matched": len(matched),
                    "images_matched": int(sum(1 for k in image_keys if k in matched))}


def load_labels(paths, names: np.ndarray, column: str, labels_csv: str | None = None,
                labels_on: str = "objectid",
                placeholders: Sequence[str] = PLACEHOLDER_LABELS) -> tuple[np.ndarray, list[str], dict]:
    """Integer label codes per row of ``image_names.npy`` (-1 = unknown) and the label strings.

    The label comes from the manifest column ``column`` (any column, extra ones included), or,
    with ``labels_csv``, from that CSV's column joined on ``labels_on``: a column present in the
    CSV and the manifest, or ``"name"``, the image file name (no manifest needed). Labels are
    compared as exact strings after trimming; empty and ``placeholders`` mean unknown.
    """
    if labels_csv:
        labels, info = _csv_labels(paths, names, column, labels_csv, labels_on)
    else:
        if not paths.manifest.exists():
            raise LabelsUnavailable(f"{paths.manifest.name} not present (labels come from it)")
        manifest = manifest_by_name(paths.manifest)
        if column not in manifest.columns:
            raise UserError(f"--label-column {column!r} is not a column of {paths.manifest} "
                            f"({', '.join(c for c in manifest.columns if c != 'name')}); pass --labels-csv "
                            "for labels kept elsewhere")
        by_name = manifest[column]
        labels = [by_name.get(str(nm), "") for nm in names]
        info = {"label_source": f"{paths.manifest.name}:{column}"}
    labels = np.array([str(lab).strip() for lab in labels], dtype=object)
    holders = {_norm(p) for p in placeholders}
    is_placeholder = np.array([lab != "" and _norm(lab) in holders for lab in labels], dtype=bool)
    values, counts = np.unique(labels[is_placeholder].astype(str), return_counts=True)
    known = (labels != "") & ~is_placeholder
    uniq, codes = (np.unique(labels[known].astype(str), return_inverse=True) if known.any()
                   else (np.array([]), np.array([], int)))
    out = np.full(len(names), -1, dtype=np.int64)
    out[known] = codes
    info.update(unlabelled=int((labels == "").sum()), placeholder_excluded=int(is_placeholder.sum()),
                placeholder_values={str(v): int(c) for v, c in zip(values, counts)},
                placeholder_labels=list(placeholders))
    return out, [str(u) for u in uniq], info


def chance_flags(section: dict) -> list[str]:
    """Metrics whose interval contains their chance level: not distinguishable from random."""
    return [m for m, ci in section.get("ci95", {}).items()
            if m in section.get("chance", {}) and metrics.contains(ci, section["chance"][m])]


def retrieval_section(index: np.ndarray, codes: np.ndarray, label_names: list[str],
                      ks: Sequence[int] = RETRIEVAL_KS, n_boot: int = 1000, seed: int = 0,
                      per_query_out: dict | None = None) -> dict:
    """precision@k, recall@k, mAP@k over queries whose label has at least one other member, each
    with a bootstrap interval over the queries and its chance level (a random ranking).
    ``per_query_out`` receives each metric's per-query values (a comparison pairs them)."""
    n = len(codes)
    counts = np.bincount(codes[codes >= 0], minlength=len(label_names)) if len(label_names) else np.zeros(0, int)
    n_rel = np.where(codes >= 0, counts[np.maximum(codes, 0)] - 1 if len(counts) else 0, 0)
    queries = np.flatnonzero(n_rel > 0)
    ks = [k for k in ks if k <= index.shape[1]]
    out: dict[str, Any] = {"n_images": int(n), "n_labels": len(label_names),
                           "n_queries": int(queries.size),
                           "n_labels_with_2_or_more": int((counts >= 2).sum()) if len(counts) else 0}
    if queries.size == 0:
        out["status"] = "skipped: no label has two or more images"
        return out
    rel = metrics.relevance_matrix(codes[index[queries]], codes[queries])
    r = n_rel[queries]
    per_query: dict[str, np.ndarray] = {}
    chance: dict[str, float] = {}
    for k in ks:
        per_query[f"precision@{k}"] = metrics.precision_at_k(rel, k)
        per_query[f"recall@{k}"] = metrics.recall_at_k(rel, r, k)
        per_query[f"mAP@{k}"] = metrics.average_precision_at_k(rel, r, k)
        chance[f"precision@{k}"] = float(metrics.chance_precision_at_k(r, n - 1, k).mean())
        chance[f"recall@{k}"] = float(metrics.chance_recall_at_k(r, n - 1, k).mean())
        chance[f"mAP@{k}"] = float(metrics.chance_average_precision_at_k(r, n - 1, k).mean())
    out.update({m: float(v.mean()) for m, v in per_query.items()})
    if per_query_out is not None:
        per_query_out.update(per_query)
    # what a random ranking would score: expected precision = R / (N - 1)
    out["random_precision"] = float((r / (n - 1)).mean())
    out.update(interval_and_chance(per_query, chance, n_boot, seed, resampled="queries"))
    return out


def interval_and_chance(per_query: dict[str, np.ndarray], chance: dict[str, float], n_boot: int,
                        seed: int, resampled: str) -> dict:
    """The ``ci95``, ``chance``, ``indistinguishable_from_chance`` and ``bootstrap`` keys of a
    section, all metrics resampled together (the same draws of queries)."""
    names = list(per_query)
    lo, hi = metrics.bootstrap_ci(np.stack([per_query[m] for m in names], axis=1), n_boot=n_boot, seed=seed)
    out = {"ci95": {m: [float(a), float(b)] for m, a, b in zip(names, lo, hi)},
           "chance": {m: chance[m] for m in names},
           "bootstrap": {"resampled": resampled, "n_boot": int(n_boot), "seed": int(seed), "level": 0.95,
                         "method": "percentile"}}
    out["indistinguishable_from_chance"] = chance_flags(out)
    return out
