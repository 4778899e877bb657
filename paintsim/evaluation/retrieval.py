"""Retrieval against metadata: do the neighbours share the painting's artist (or school, ...)?

Relevance = the same value of a label column (the manifest's ``attribution`` by default);
precision@k, recall@k and mAP@k over the queries whose label has at least one other member, and
what a random ranking would score.
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


def load_labels(paths, names: np.ndarray, column: str,
                labels_csv: str | None = None) -> tuple[np.ndarray, list[str], dict]:
    """Integer label codes per row of ``image_names.npy`` (-1 = unknown) and the label strings.

    The label comes from the manifest column ``column``, or, with ``labels_csv``, from that CSV's
    column joined on ``objectid`` (for labels the manifest does not carry, such as a school).
    Labels are compared as exact strings after trimming; empty means unknown.
    """
    import pandas as pd

    manifest = manifest_by_name(paths.manifest).reset_index(drop=True)
    source = f"{paths.manifest.name}:{column}"
    if labels_csv:
        lp = Path(labels_csv)
        if not lp.is_file():
            raise UserError(f"--labels-csv {lp}: no such file")
        try:
            extra = pd.read_csv(lp, dtype=str, keep_default_na=False, encoding="utf-8")
        except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise UserError(f"--labels-csv {lp}: not a readable UTF-8 CSV ({str(exc).strip()})") from None
        for col in ("objectid", column):
            if col not in extra.columns:
                raise UserError(f"--labels-csv {lp}: no column {col!r} (columns: {', '.join(extra.columns)})")
        extra = extra[["objectid", column]].drop_duplicates("objectid")
        manifest = manifest.drop(columns=[column], errors="ignore").merge(extra, on="objectid", how="left")
        source = f"{lp.name}:{column} joined on objectid"
    elif column not in manifest.columns:
        raise UserError(f"--label-column {column!r} is not a column of {paths.manifest} "
                        f"({', '.join(manifest.columns)}); pass --labels-csv for labels kept elsewhere")
    by_name = dict(zip(manifest["name"], manifest[column].fillna("").astype(str).str.strip()))
    labels = np.array([by_name.get(str(nm), "") for nm in names], dtype=object)
    known = labels != ""
    uniq, codes = np.unique(labels[known].astype(str), return_inverse=True) if known.any() else (np.array([]), np.array([], int))
    out = np.full(len(names), -1, dtype=np.int64)
    out[known] = codes
    return out, [str(u) for u in uniq], {"label_source": source,
                                         "unlabelled": int((~known).sum())}


def retrieval_section(index: np.ndarray, codes: np.ndarray, label_names: list[str],
                      ks: Sequence[int] = RETRIEVAL_KS) -> dict:
    """precision@k, recall@k, mAP@k over queries whose label has at least one other member."""
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
    for k in ks:
        out[f"precision@{k}"] = float(metrics.precision_at_k(rel, k).mean())
        out[f"recall@{k}"] = float(metrics.recall_at_k(rel, r, k).mean())
        out[f"mAP@{k}"] = float(metrics.average_precision_at_k(rel, r, k).mean())
    # what a random ranking would score: expected precision = R / (N - 1)
    out["random_precision"] = float((r / (n - 1)).mean())
    return out
