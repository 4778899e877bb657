"""One evaluation of one data directory: every section, from one validated ``Embeddings``.

Memory stays bounded for the whole NGA set (N = 122,477, D = 2048): nothing N x N is ever held;
the features are memory-mapped and streamed in blocks, and the copy and pixel sections touch only
their samples.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from .. import neighbours
from ..artifacts import DataPaths
from ..embeddings import Embeddings
from ..errors import UserError
from .copies import COPY_KINDS, copies_section
from .pixels import pixel_section
from .report import Evaluation
from .retrieval import LabelsUnavailable, load_labels, parse_placeholders, retrieval_section
from .similarity import similarity_section

log = logging.getLogger(__name__)


#: What a field left at None means. None = not asked for: a section that cannot run is then a
#: "skipped" line, while a section the user asked for (a value given) that cannot run is an error.
DEFAULTS = {"label_column": "attribution", "labels_on": "objectid", "copy_sample": 50, "copy_seeds": 3,
            "pixel_sample": 100}


@dataclass
class EvalConfig:
    """Every knob of the evaluation; field names are the flags' (docs/evaluation.md defines them).
    Fields of :data:`DEFAULTS` are None unless the user chose them."""

    k: int = 10
    pairs: int = 100_000
    seed: int = 0
    label_column: str | None = None
    labels_csv: str | None = None
    labels_on: str | None = None
    placeholder_labels: str | None = None  # comma-separated; None = retrieval.PLACEHOLDER_LABELS
    n_boot: int = 1000
    copy_sample: int | None = None
    copy_seeds: int | None = None
    copy_kinds: Sequence[str] = COPY_KINDS
    pixel_sample: int | None = None
    pixel_size: int = 128
    h5_max_rows: int = 8192
    device: str = "auto"  # auto|cpu|cuda, resolved only where a model or a search runs
    batch_size: int = 32
    weights: str | None = None
    skip_copies: bool = False
    skip_pixels: bool = False
    skip_faces: bool = False
    neighbours: str | None = None   # a neighbour table to evaluate instead of the one the lookup finds
    allow_circular: bool = False    # compute retrieval on a label the table was boosted with (marked)
    progress: bool = True


def resolve(cfg: EvalConfig) -> tuple[EvalConfig, frozenset[str]]:
    """(the config with every None of :data:`DEFAULTS` filled in, the fields the user chose)."""
    asked = frozenset(f for f in DEFAULTS if getattr(cfg, f) is not None)
    if "labels_on" in asked and not cfg.labels_csv:
        raise UserError(f"--labels-on {cfg.labels_on}: only joins a --labels-csv; give one, or drop --labels-on")
    return dataclasses.replace(cfg, **{f: DEFAULTS[f] for f in DEFAULTS if f not in asked}), asked


def _labels(emb: Embeddings, paths: DataPaths, cfg: EvalConfig,
            asked: bool) -> tuple[np.ndarray, list[str], dict] | dict:
    """Label codes for retrieval (from the manifest of ``paths``), read before any long pass so that
    a retrieval the user asked for and that cannot run stops at once; returns a "skipped" section
    when it was not asked for."""
    flag = f"--labels-csv {cfg.labels_csv}" if cfg.labels_csv else f"--label-column {cfg.label_column}"
    try:
        codes, label_names, info = load_labels(paths, emb.names, cfg.label_column, cfg.labels_csv,
                                               cfg.labels_on, parse_placeholders(cfg.placeholder_labels))
    except LabelsUnavailable as exc:
        if asked:
            hint = "" if cfg.labels_csv else "; --labels-csv CSV --labels-on name labels images by file name"
            raise UserError(f"{flag}: retrieval cannot run: {exc}{hint}") from None
        return {"status": f"skipped: {exc}", "label_column": cfg.label_column}
    if asked and not np.any(np.bincount(codes[codes >= 0], minlength=1) >= 2):
        matched = (f"; {info['labels_csv_matched']} of {info['labels_csv_rows']} CSV rows matched an image on "
                   f"{cfg.labels_on}" if cfg.labels_csv else "")
        raise UserError(f"{flag}: retrieval cannot run: no {cfg.label_column!r} label has two or more of the "
                        f"{len(emb):,} images ({info['unlabelled']} empty, {info['placeholder_excluded']} "
                        f"placeholders left out{matched})")
    return codes, label_names, info


def circularity(boost: dict | None, label_column: str) -> str | None:
    """Why retrieval on ``label_column`` would measure the boost rather than the pictures, or None."""
    if boost and label_column in (boost.get("fields") or {}):
        return (f"the neighbour table was boosted by {label_column!r} (weight {boost['fields'][label_column]}, "
                f"mix {boost.get('mix')}): same-{label_column} precision on it measures the boost, not the pictures")
    return None


def _neighbours(emb: Embeddings, cfg: EvalConfig) -> tuple[np.ndarray, np.ndarray | None, str, dict | None]:
    """(index, the table's cosines or None, where they came from, the table's boost or None)."""
    if cfg.neighbours:
        table = neighbours.named_table(cfg.neighbours, emb, cfg.k)
        boost = table.record.get("boost")
        index = np.asarray(table.index[:, :cfg.k], dtype=np.int64)
        # a boosted table's scores are final scores, not cosines: intra uses the features
        scores = None if boost else np.asarray(table.score[:, :cfg.k], dtype=np.float32)
        return index, scores, table.describe(), boost
    index, scores, source = neighbours.neighbours_of_all(emb, cfg.k, cfg.device, cfg.progress)
    return index, scores, source, None


def evaluate(data_dir: str, cfg: EvalConfig, features_dir: str | None = None) -> Evaluation:
    """Run every section on one data directory and return the report (nothing written).

    ``features_dir``: evaluate the feature set kept there (``extract_features.py --output-dir``)
    with the labels of ``data_dir``'s manifest. A section the config asks for explicitly (see
    :data:`DEFAULTS`) and that cannot run raises ``UserError``; left at its defaults it reports
    ``status: skipped: <why>``. Retrieval on a label the table was boosted with is refused (an
    error when asked for) unless ``allow_circular``, which computes it marked ``circular``.
    """
    cfg, asked = resolve(cfg)
    emb = Embeddings.load(features_dir or data_dir)
    label_asked = "label_column" in asked or bool(cfg.labels_csv)
    labels = _labels(emb, DataPaths.of(data_dir), cfg, label_asked)
    index, table_scores, source, boost = _neighbours(emb, cfg)
    why_circular = circularity(boost, cfg.label_column)
    if why_circular and not cfg.allow_circular:
        if label_asked:
            raise UserError(f"--label-column {cfg.label_column}: {why_circular}; choose another label, evaluate "
                            "the unboosted table, or pass --allow-circular to compute it marked as circular")
        labels = {"status": f"refused: circular: {why_circular} (--allow-circular computes it anyway)",
                  "label_column": cfg.label_column}
    t0 = time.perf_counter()
    meta = emb.meta
    report: dict[str, Any] = {
        "data_dir": str(DataPaths.of(data_dir).root), "features_dir": str(emb.paths.root), "n_images": len(emb),
        "dim": emb.dim,
        "features_meta": {k: meta.get(k) for k in ("backbone", "weights", "preprocessing", "crop", "fusion")
                          if k in meta},
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()
                   if k not in ("progress",)},
    }
    report["config"]["asked"] = sorted(asked)
    report["neighbours_from"] = source
    per_query: dict[str, dict[str, np.ndarray]] = {}
    if boost:
        report["neighbours_boost"] = boost
    sim, dists = similarity_section(emb, index, table_scores, cfg)
    report["similarity"] = sim
    if isinstance(labels, dict):
        report["retrieval"] = labels
    else:
        codes, label_names, info = labels
        report["retrieval"] = retrieval_section(index, codes, label_names, n_boot=cfg.n_boot, seed=cfg.seed,
                                                per_query_out=per_query.setdefault("retrieval", {}))
        report["retrieval"].update(info, label_column=cfg.label_column)
        if why_circular:
            report["retrieval"]["circular"] = why_circular
    report["copies"] = ({"status": "skipped (--skip-copies)"} if cfg.skip_copies
                        else copies_section(emb, cfg, per_query_out=per_query.setdefault("copies", {})))
    if {"copy_sample", "copy_seeds"} & asked and not cfg.skip_copies and "status" in report["copies"]:
        flag = (f"--copy-sample {cfg.copy_sample}" if "copy_sample" in asked else f"--copy-seeds {cfg.copy_seeds}")
        raise UserError(f"{flag}: the perturbed-copy section cannot run: "
                        f"{report['copies']['status'].removeprefix('skipped: ')}")
    report["pixels"] = ({"status": "skipped (--skip-pixels)"} if cfg.skip_pixels
                        else pixel_section(emb, index, dists[f"top-{index.shape[1]} neighbours"], cfg))
    if "pixel_sample" in asked and report["pixels"].get("ssim_neighbours") is None and not cfg.skip_pixels:
        raise UserError(f"--pixel-sample {cfg.pixel_sample}: the pixel baselines cannot run: no sampled pair of "
                        f"images could be read from {emb.images_dir}")
    from .faces import faces_section

    report["faces"] = ({"status": "skipped (--skip-faces)"} if cfg.skip_faces else
                       faces_section(emb, None if isinstance(labels, dict) else labels[0], cfg.label_column, cfg))
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return Evaluation(report=report, distributions=dists, per_query=per_query)
