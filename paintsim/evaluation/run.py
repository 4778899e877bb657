"""One evaluation of one data directory: every section, from one validated ``Embeddings``.

Memory stays bounded for the whole NGA set (N = 122,477, D = 2048): nothing N x N is ever held;
the features are memory-mapped and streamed in blocks, and the copy and pixel sections touch only
their samples.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from .. import knn, neighbours
from ..embeddings import Embeddings
from .copies import COPY_KINDS, copies_section
from .pixels import pixel_section
from .report import Evaluation
from .retrieval import load_labels, retrieval_section
from .similarity import similarity_section

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Every knob of the evaluation; field names are the flags' (docs/evaluation.md defines them)."""

    k: int = 10
    pairs: int = 100_000
    seed: int = 0
    label_column: str = "attribution"
    labels_csv: str | None = None
    copy_sample: int = 50
    copy_kinds: Sequence[str] = COPY_KINDS
    pixel_sample: int = 100
    pixel_size: int = 128
    h5_max_rows: int = 8192
    device: str = "auto"  # auto|cpu|cuda, resolved only where a model or a search runs
    batch_size: int = 32
    weights: str | None = None
    skip_copies: bool = False
    skip_pixels: bool = False
    progress: bool = True


def collection_neighbors(emb: Embeddings, k: int, device: str = "auto",
                         progress: bool = False) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Top-k neighbour rows of every painting: from the neighbour table the lookup finds, else
    computed. Returns (index int64 [N, k], the table's stored scores or None, where they came from).
    """
    n = len(emb)
    k = knn.validate_k(k, n)
    table = neighbours.find_table(emb.paths, k, n, emb.sha256)
    if table is not None:
        return (table.index[:, :k].astype(np.int64), table.score[:, :k].astype(np.float32),
                table.describe())
    log.info("no usable neighbour table in %s: computing the top-%d neighbours from %s", emb.paths.root, k,
             emb.paths.features)
    index, score = knn.top_k_neighbors(emb.features, k, device=device, exclude_self=True, progress=progress)
    return np.asarray(index, dtype=np.int64), np.asarray(score, dtype=np.float32), "computed from features.npy"


def evaluate(data_dir: str, cfg: EvalConfig) -> Evaluation:
    """Run every section on one data directory and return the report (nothing written)."""
    emb = Embeddings.load(data_dir)
    t0 = time.perf_counter()
    meta = emb.meta
    report: dict[str, Any] = {
        "data_dir": str(emb.paths.root), "n_images": len(emb), "dim": emb.dim,
        "features_meta": {k: meta.get(k) for k in ("backbone", "weights", "preprocessing", "crop")
                          if k in meta},
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()
                   if k not in ("progress",)},
    }
    index, table_scores, source = collection_neighbors(emb, cfg.k, cfg.device, cfg.progress)
    report["neighbours_from"] = source
    sim, dists = similarity_section(emb, index, table_scores, cfg)
    report["similarity"] = sim
    if emb.paths.manifest.exists():
        codes, label_names, label_info = load_labels(emb.paths, emb.names, cfg.label_column, cfg.labels_csv)
        retrieval = retrieval_section(index, codes, label_names)
        retrieval.update(label_info, label_column=cfg.label_column)
    else:
        retrieval = {"status": f"skipped: {emb.paths.manifest.name} not present (labels come from it)",
                     "label_column": cfg.label_column}
    report["retrieval"] = retrieval
    report["copies"] = ({"status": "skipped (--skip-copies)"} if cfg.skip_copies
                        else copies_section(emb, cfg))
    report["pixels"] = ({"status": "skipped (--skip-pixels)"} if cfg.skip_pixels
                        else pixel_section(emb, index, dists[f"top-{index.shape[1]} neighbours"], cfg))
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return Evaluation(report=report, distributions=dists)
