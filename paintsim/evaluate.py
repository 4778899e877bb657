"""Do the neighbours mean anything? Every judgement the prior art made, computed one correct way.

Four sections, each bounded in memory for the whole NGA set (N = 122,477, D = 2048: nothing N x N
is ever held; the features are memory-mapped and streamed in blocks):

1. **Intra vs inter similarity.** *intra* = mean cosine similarity of each painting to its top-k
   neighbours; *inter* = mean cosine similarity of ``n_pairs`` random pairs (i != j, seeded).
   Both are dot products of rows of ``features.npy``. :func:`inter_similarity` takes the features
   and a seed and nothing else, so "inter" can never be computed from the neighbour table (the
   prior art's mistake, which reported 0.86 instead of 0.58: the top-10 table only holds the
   *most* similar pairs). When ``similarity_scores.h5`` exists, the same random pairs are read
   from it and compared.
2. **Retrieval against metadata.** Relevance = same value of a label column (the manifest's
   ``attribution`` by default); precision@k, recall@k, mAP@k over queries whose label has at
   least one other member.
3. **Recovery of perturbed copies.** Copies of a seeded sample of paintings (crop, rotation,
   colour jitter, blur, JPEG: ``paintsim.perturb``) are embedded with the model recorded in
   ``features_meta.json`` and mixed into the collection; each original must find its copies.
4. **Pixel baselines.** SSIM and RMSE between a query and its neighbours (greyscale, resized to
   one size), against the same for random paintings.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import metrics
from .artifacts import DataPaths, load_neighbors, read_json
from .cli import UserError

log = logging.getLogger(__name__)

#: Ranks reported for retrieval against metadata and for perturbed-copy recovery.
RETRIEVAL_KS = (1, 5, 10)
COPY_KS = (1, 3, 5)
#: One copy of each of these is made per sampled painting (strengths: paintsim/perturb.py).
COPY_KINDS = ("crop", "rotate", "jitter", "blur", "jpeg")
#: Working-set budget of one streamed block, in float32 values (32 Mi values = 128 MiB).
BLOCK_VALUES = 1 << 25


@dataclass
class EvalConfig:
    """Every knob of the evaluation; its defaults are the documented ones (the README's evaluation section)."""

    k: int = 10
    n_pairs: int = 100_000
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


# --------------------------------------------------------------------------- helpers

def _tqdm(iterable=None, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


def _block_rows(n_cols: int) -> int:
    return max(1, BLOCK_VALUES // max(1, n_cols))


def neighbor_similarities(features: np.ndarray, index: np.ndarray, progress: bool = False) -> np.ndarray:
    """``out[i, r] = features[i] . features[index[i, r]]``, streamed in blocks of rows."""
    n, k = index.shape
    d = features.shape[1]
    out = np.empty((n, k), dtype=np.float32)
    step = _block_rows(k * d)
    for s in _tqdm(range(0, n, step), desc="neighbour similarities", unit="block",
                   disable=not progress or n <= step):
        e = min(n, s + step)
        q = np.asarray(features[s:e], dtype=np.float32)
        nb = np.asarray(features[index[s:e].ravel()], dtype=np.float32).reshape(e - s, k, d)
        out[s:e] = np.einsum("bd,bkd->bk", q, nb)
    return out


def random_pairs(n: int, n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n_pairs`` ordered pairs (i, j), i != j, each uniform over the n*(n-1) such pairs."""
    if n < 2:
        raise UserError(f"random pairs need at least 2 paintings, the collection has {n}")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, size=n_pairs)
    j = rng.integers(0, n - 1, size=n_pairs)
    j += j >= i  # skip i itself: uniform over the other n - 1 rows
    return i.astype(np.int64), j.astype(np.int64)


def pair_similarities(features: np.ndarray, i: np.ndarray, j: np.ndarray, progress: bool = False) -> np.ndarray:
    """``features[i[p]] . features[j[p]]`` for every pair p, streamed."""
    d = features.shape[1]
    out = np.empty(len(i), dtype=np.float32)
    step = _block_rows(2 * d)
    for s in _tqdm(range(0, len(i), step), desc="random-pair similarities", unit="block",
                   disable=not progress or len(i) <= step):
        e = min(len(i), s + step)
        a = np.asarray(features[i[s:e]], dtype=np.float32)
        b = np.asarray(features[j[s:e]], dtype=np.float32)
        out[s:e] = np.einsum("pd,pd->p", a, b)
    return out


def inter_similarity(features: np.ndarray, n_pairs: int, seed: int,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inter-class baseline: similarities of random pairs, computed from the features only.

    Deliberately takes no neighbour table: the mean over the top-k table is the *intra* number,
    and using it as "inter" is the error this tool exists to avoid. When the collection has no
    more than ``n_pairs`` distinct pairs, every pair i < j is used once (the exact mean).
    Returns (i, j, similarity).
    """
    n = features.shape[0]
    if n * (n - 1) // 2 <= n_pairs:  # small collection: every pair once, the exact mean
        i, j = np.triu_indices(n, k=1)
        i, j = i.astype(np.int64), j.astype(np.int64)
    else:
        i, j = random_pairs(n, n_pairs, seed)
    return i, j, pair_similarities(features, i, j, progress)


# --------------------------------------------------------------------------- neighbours

def collection_neighbors(paths: DataPaths, features: np.ndarray, k: int, device: str = "auto",
                         progress: bool = False) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Top-k neighbour rows of every painting: from the neighbour table when it fits, else computed.

    Returns (index int64 [N, k], the table's stored scores or None, where they came from).
    """
    n = features.shape[0]
    if not 1 <= k < n:
        raise UserError(f"--k {k}: must be between 1 and {n - 1} (the collection has {n} images)")
    for path in sorted(paths.root.glob("top_*_similar.npy"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            table = load_neighbors(path)
        except ValueError as exc:
            log.warning("ignoring %s: %s", path, exc)
            continue
        if len(table) != n or table["index"].shape[1] < k:
            log.info("not using %s (%d rows x %d neighbours; need %d x %d)", path, len(table),
                     table["index"].shape[1], n, k)
            continue
        if path.stat().st_mtime < paths.features.stat().st_mtime:
            log.warning("%s is older than %s; it may be stale (its scores are checked below)", path,
                        paths.features)
        index = table["index"][:, :k].astype(np.int64)
        if index.min() < 0 or index.max() >= n:
            raise UserError(f"{path}: neighbour indices outside 0..{n - 1}; rerun optimized_similarity.py")
        return index, table["score"][:, :k].astype(np.float32), str(path)
    from . import knn
    from .cli import resolve_device

    log.info("no usable neighbour table in %s: computing the top-%d neighbours from %s", paths.root, k,
             paths.features)
    index, score = knn.top_k_neighbors(features, k, device=resolve_device(device), exclude_self=True,
                                       progress=progress)
    return np.asarray(index, dtype=np.int64), np.asarray(score, dtype=np.float32), "computed from features.npy"


# --------------------------------------------------------------------------- section 1

def similarity_section(paths: DataPaths, features: np.ndarray, index: np.ndarray,
                       table_scores: np.ndarray | None, cfg: EvalConfig) -> tuple[dict, dict]:
    """Intra vs inter; returns (report section, distributions for the histogram)."""
    nb_sim = neighbor_similarities(features, index, cfg.progress)
    intra_per_painting = nb_sim.mean(axis=1)
    i, j, inter = inter_similarity(features, cfg.n_pairs, cfg.seed, cfg.progress)
    sep = metrics.separation(nb_sim, inter)
    section: dict[str, Any] = {
        "k": int(index.shape[1]),
        "intra": float(intra_per_painting.mean()),
        "intra_definition": f"mean over paintings of the mean cosine similarity to its top-{index.shape[1]} "
                            "neighbours, dot products of features.npy rows",
        "intra_std_over_paintings": float(intra_per_painting.std()),
        "inter": float(inter.mean()),
        "inter_definition": (f"mean cosine similarity of {inter.size:,} random pairs (i != j, uniform, "
                             f"seed {cfg.seed})" if inter.size == cfg.n_pairs else
                             f"mean cosine similarity of all {inter.size:,} pairs i < j (fewer than "
                             f"{cfg.n_pairs:,})") + ", dot products of features.npy rows",
        "inter_std": float(inter.std()),
        "n_pairs": int(inter.size),
        "all_pairs": bool(inter.size != cfg.n_pairs),
        "ratio_intra_over_inter": float(intra_per_painting.mean() / inter.mean()) if inter.mean() else None,
        "separation": sep,
    }
    if table_scores is not None:
        section["table_vs_features_max_abs_diff"] = float(np.max(np.abs(table_scores - nb_sim)))
    section["matrix_check"] = matrix_check(paths, i, j, inter, cfg)
    return section, {f"top-{index.shape[1]} neighbours": nb_sim, "random pairs": inter}


def matrix_check(paths: DataPaths, i: np.ndarray, j: np.ndarray, inter: np.ndarray, cfg: EvalConfig) -> dict:
    """Read the same random pairs from ``similarity_scores.h5`` (when complete) and compare.

    Pairs are grouped by the matrix's row chunks; whole chunks are read in a seeded random order
    until ``h5_max_rows`` rows have been read, so the check costs at most that many rows of I/O
    and one chunk of memory, whatever N is.
    """
    path = paths.similarity
    if not path.exists():
        return {"status": "skipped", "reason": f"{path.name} not present (compute_similarity.py not run)"}
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        return {"status": "skipped", "reason": f"{path.name} unreadable ({exc})"}
    with f:
        if "similarity" not in f:
            return {"status": "skipped", "reason": f"{path.name} has no 'similarity' dataset"}
        ds = f["similarity"]
        n = int(np.load(paths.features, mmap_mode="r", allow_pickle=False).shape[0])
        if ds.ndim != 2 or ds.shape[0] != ds.shape[1]:
            return {"status": "skipped", "reason": f"'similarity' has shape {ds.shape}, not N x N"}
        incomplete = _incomplete_reason(f, ds)
        if incomplete:
            return {"status": "skipped", "reason": incomplete}
        if "image_names" in f:
            h5_names = np.asarray(f["image_names"][()]).astype(str)
            names = np.load(paths.image_names, allow_pickle=False).astype(str)
            if h5_names.shape != names.shape or not np.array_equal(h5_names, names):
                return {"status": "skipped",
                        "reason": f"{path.name} was computed for other images than image_names.npy (stale)"}
        if ds.shape[0] != n:
            return {"status": "skipped", "reason": f"{path.name} is {ds.shape[0]} x {ds.shape[0]} but "
                                                   f"features.npy has {n} rows (stale)"}
        chunk_rows = int(ds.chunks[0]) if ds.chunks else 64
        chunk_rows = max(1, min(chunk_rows, _block_rows(ds.shape[1]) * 2))
        blocks = i // chunk_rows
        order = np.random.default_rng(cfg.seed + 1).permutation(np.unique(blocks))
        from_h5, from_feat = [], []
        rows_read = 0
        for b in _tqdm(order, desc="reading pairs from the matrix", unit="block", disable=not cfg.progress):
            if rows_read >= cfg.h5_max_rows:
                break
            s = int(b) * chunk_rows
            e = min(ds.shape[0], s + chunk_rows)
            block = ds[s:e, :]
            rows_read += e - s
            sel = np.flatnonzero(blocks == b)
            from_h5.append(block[i[sel] - s, j[sel]].astype(np.float32))
            from_feat.append(inter[sel])
        h5v = np.concatenate(from_h5)
        fv = np.concatenate(from_feat)
        diff = np.abs(h5v - fv)
        tol = 2e-3 if ds.dtype == np.float16 else 1e-4
        return {
            "status": "agree" if float(diff.max()) <= tol else "DISAGREE",
            "dtype": str(ds.dtype),
            "pairs_compared": int(h5v.size),
            "rows_read": int(rows_read),
            "inter_from_matrix": float(h5v.mean()),
            "inter_from_features_same_pairs": float(fv.mean()),
            "max_abs_diff": float(diff.max()),
            "tolerance": tol,
        }


def _incomplete_reason(f, ds) -> str | None:
    """The matrix writer marks completion in attributes; anything not marked complete is refused."""
    for obj in (ds, f):
        attrs = obj.attrs
        for key in ("complete", "completed", "is_complete"):
            if key in attrs:
                return None if bool(attrs[key]) else f"{Path(f.filename).name} is not complete ({key}=False)"
        for key in ("rows_done", "next_row", "completed_rows"):
            if key in attrs and int(attrs[key]) < ds.shape[0]:
                return f"{Path(f.filename).name} is not complete ({key}={int(attrs[key])} of {ds.shape[0]})"
        if "status" in attrs:
            status = attrs["status"]
            status = status.decode() if isinstance(status, bytes) else str(status)
            return None if status in ("complete", "done", "finished") else \
                f"{Path(f.filename).name} is not complete (status={status})"
    return None


# --------------------------------------------------------------------------- section 2

def load_labels(paths: DataPaths, names: np.ndarray, column: str,
                labels_csv: str | None = None) -> tuple[np.ndarray, list[str], dict]:
    """Integer label codes per row of ``image_names.npy`` (-1 = unknown) and the label strings.

    The label comes from the manifest column ``column``, or, with ``labels_csv``, from that CSV's
    column joined on ``objectid`` (for labels the manifest does not carry, such as a school).
    Labels are compared as exact strings after trimming; empty means unknown.
    """
    import pandas as pd

    from .artifacts import read_manifest

    manifest = read_manifest(paths.manifest)
    manifest = manifest.assign(name=manifest["file"].map(lambda f: Path(f).name)).drop_duplicates("name")
    source = f"{paths.manifest.name}:{column}"
    if labels_csv:
        lp = Path(labels_csv)
        if not lp.is_file():
            raise UserError(f"--labels-csv {lp}: no such file")
        extra = pd.read_csv(lp, dtype=str, keep_default_na=False)
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


# --------------------------------------------------------------------------- section 3

def copies_section(paths: DataPaths, features: np.ndarray, names: np.ndarray, cfg: EvalConfig) -> dict:
    """Embed perturbed copies of a seeded sample and find them among the collection + all copies."""
    from .extract import Embedder
    from .images import ImageDecodeError, load_rgb
    from .perturb import perturb

    if not paths.features_meta.exists():
        raise UserError(f"{paths.features_meta} is missing: the copies must be embedded with the same model")
    n = features.shape[0]
    kinds = list(cfg.copy_kinds)
    rng = np.random.default_rng(cfg.seed)
    sample = np.sort(rng.choice(n, size=min(cfg.copy_sample, n), replace=False))
    from .cli import resolve_device

    device = resolve_device(cfg.device)
    meta = read_json(paths.features_meta)
    image_dir = paths.images_source(meta)
    embedder = Embedder.from_meta(meta, device=device, weights=cfg.weights)
    originals, copies, owners, kind_of, unreadable = [], [], [], [], []
    reembedded: list[np.ndarray] = []
    pending: list = []
    pending_tags: list[tuple[str, int, int]] = []

    def flush() -> None:
        if not pending:
            return
        emb = np.asarray(embedder.embed(pending), dtype=np.float32)
        for (tag, owner, kind_idx), vec in zip(pending_tags, emb):
            if tag == "orig":
                reembedded.append(vec)
            else:
                copies.append(vec)
                owners.append(owner)
                kind_of.append(kind_idx)
        pending.clear()
        pending_tags.clear()

    for row in _tqdm(sample, desc="perturbed copies", unit="painting", disable=not cfg.progress):
        path = image_dir / Path(str(names[row])).name
        try:
            img = load_rgb(path)
        except ImageDecodeError as exc:
            unreadable.append(str(exc))
            continue
        originals.append(int(row))
        pending.append(img)
        pending_tags.append(("orig", int(row), -1))
        for kind_idx, kind in enumerate(kinds):
            krng = np.random.default_rng([cfg.seed, int(row), kind_idx])
            pending.append(perturb(img, kind, krng))
            pending_tags.append(("copy", int(row), kind_idx))
        if len(pending) >= cfg.batch_size:
            flush()
    flush()
    if not originals:
        return {"status": "skipped: no sampled image could be read", "unreadable": unreadable}
    q_rows = np.asarray(originals)
    copies_arr = np.stack(copies)
    owners_arr = np.asarray(owners)
    kinds_arr = np.asarray(kind_of)
    queries = np.asarray(features[q_rows], dtype=np.float32)
    self_cos = np.einsum("qd,qd->q", queries, np.stack(reembedded))

    from . import knn

    kmax = max(COPY_KS)
    coll_idx, coll_score = knn.search(queries, features, min(n, kmax + 1), device=device)
    copy_score = queries @ copies_arr.T  # [Q, Q * kinds], small
    n_copies = len(kinds)
    hits_by_k = {k: [] for k in COPY_KS}
    found_by_kind = np.zeros((len(q_rows), len(kinds)), dtype=bool)
    for qi, row in enumerate(q_rows):
        keep = coll_idx[qi] != row
        cand_score = np.concatenate([coll_score[qi][keep][:kmax], copy_score[qi]])
        is_copy = np.concatenate([np.zeros(int(min(keep.sum(), kmax)), bool), owners_arr == row])
        cand_kind = np.concatenate([np.full(int(min(keep.sum(), kmax)), -1), np.where(owners_arr == row, kinds_arr, -1)])
        order = np.argsort(-cand_score, kind="stable")[:kmax]
        rel = is_copy[order]
        for k in COPY_KS:
            hits_by_k[k].append(rel[:k].sum())
        for kk in cand_kind[order][rel]:
            found_by_kind[qi, kk] = True
    out: dict[str, Any] = {
        "n_originals": int(len(q_rows)), "copies_per_original": n_copies, "kinds": kinds,
        "n_copies": int(len(copies_arr)), "searched_among": int(n - 1 + len(copies_arr)),
        "unreadable": len(unreadable),
        "reembedded_original_cosine_min": float(self_cos.min()),
        "reembedded_original_cosine_mean": float(self_cos.mean()),
    }
    for k in COPY_KS:
        hits = np.asarray(hits_by_k[k], dtype=np.float64)
        p, r = hits / k, hits / n_copies
        out[f"precision@{k}"] = float(p.mean())
        out[f"recall@{k}"] = float(r.mean())
        out[f"f1@{k}"] = float(metrics.f1_score(p, r).mean())
    out[f"found_in_top{kmax}_by_kind"] = {kind: float(found_by_kind[:, i].mean()) for i, kind in enumerate(kinds)}
    if self_cos.min() < 0.98:
        log.warning("re-embedding the originals gives cosine %.3f (min) to their stored features: "
                    "features_meta.json may not describe how features.npy was made", self_cos.min())
    return out


# --------------------------------------------------------------------------- section 4

def _grey(image_dir: Path, names: np.ndarray, row: int, size: int, cache: dict) -> np.ndarray | None:
    if row in cache:
        return cache[row]
    from PIL import Image

    from .images import ImageDecodeError, open_image

    try:
        img = open_image(image_dir / Path(str(names[row])).name)
        arr = np.asarray(img.convert("L").resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0
    except ImageDecodeError:
        arr = None
    if len(cache) > 4096:
        cache.clear()
    cache[row] = arr
    return arr


def pixel_section(paths: DataPaths, names: np.ndarray, index: np.ndarray, nb_sim: np.ndarray,
                  cfg: EvalConfig) -> dict:
    """SSIM and RMSE of each sampled query to its neighbours, and to as many random paintings."""
    n, k = index.shape
    rng = np.random.default_rng(cfg.seed + 2)
    sample = np.sort(rng.choice(n, size=min(cfg.pixel_sample, n), replace=False))
    cache: dict = {}
    image_dir = paths.images_source(read_json(paths.features_meta) if paths.features_meta.exists() else None)
    res = {"neighbours": {"ssim": [], "rmse": [], "score": []}, "random": {"ssim": [], "rmse": []}}
    skipped = 0
    for q in _tqdm(sample, desc="pixel baselines", unit="query", disable=not cfg.progress):
        a = _grey(image_dir, names, int(q), cfg.pixel_size, cache)
        if a is None:
            skipped += 1
            continue
        rand = rng.integers(0, n - 1, size=k)
        rand += rand >= q
        for group, rows in (("neighbours", index[q]), ("random", rand)):
            for r_i, r in enumerate(rows):
                b = _grey(image_dir, names, int(r), cfg.pixel_size, cache)
                if b is None:
                    skipped += 1
                    continue
                res[group]["ssim"].append(metrics.ssim(a, b))
                res[group]["rmse"].append(metrics.rmse(a, b))
                if group == "neighbours":
                    res[group]["score"].append(float(nb_sim[q, r_i]))
    out: dict[str, Any] = {"n_queries": int(len(sample)), "k": int(k), "size": cfg.pixel_size,
                           "unreadable_pairs": skipped}
    for group in ("neighbours", "random"):
        for m in ("ssim", "rmse"):
            vals = np.asarray(res[group][m])
            out[f"{m}_{group}"] = float(vals.mean()) if vals.size else None
    s, sc = np.asarray(res["neighbours"]["ssim"]), np.asarray(res["neighbours"]["score"])
    out["pearson_score_vs_ssim"] = (float(np.corrcoef(s, sc)[0, 1])
                                    if s.size > 2 and s.std() > 0 and sc.std() > 0 else None)
    return out


# --------------------------------------------------------------------------- the whole run

@dataclass
class Evaluation:
    report: dict
    distributions: dict = field(default_factory=dict)
    figures: list = field(default_factory=list)


def evaluate(data_dir: str, cfg: EvalConfig) -> Evaluation:
    """Run every section on one data directory and return the report (nothing written)."""
    from .artifacts import load_npy

    paths = DataPaths.of(data_dir)
    features = load_npy(paths.features, mmap=True)
    names = load_npy(paths.image_names).astype(str)
    if features.ndim != 2 or len(names) != features.shape[0]:
        raise UserError(f"{paths.features} {features.shape} and {paths.image_names} {names.shape} do not match")
    t0 = time.perf_counter()
    meta = read_json(paths.features_meta) if paths.features_meta.exists() else {}
    report: dict[str, Any] = {
        "data_dir": str(paths.root), "n_images": int(features.shape[0]), "dim": int(features.shape[1]),
        "features_meta": {k: meta.get(k) for k in ("backbone", "weights", "preprocessing", "crop")
                          if k in meta},
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()
                   if k not in ("progress",)},
    }
    index, table_scores, source = collection_neighbors(paths, features, cfg.k, cfg.device, cfg.progress)
    report["neighbours_from"] = source
    sim, dists = similarity_section(paths, features, index, table_scores, cfg)
    report["similarity"] = sim
    if paths.manifest.exists():
        codes, label_names, label_info = load_labels(paths, names, cfg.label_column, cfg.labels_csv)
        retrieval = retrieval_section(index, codes, label_names)
        retrieval.update(label_info, label_column=cfg.label_column)
    else:
        retrieval = {"status": f"skipped: {paths.manifest.name} not present (labels come from it)",
                     "label_column": cfg.label_column}
    report["retrieval"] = retrieval
    if cfg.skip_copies:
        report["copies"] = {"status": "skipped (--skip-copies)"}
    else:
        report["copies"] = copies_section(paths, features, names, cfg)
    if cfg.skip_pixels:
        report["pixels"] = {"status": "skipped (--skip-pixels)"}
    else:
        report["pixels"] = pixel_section(paths, names, index, dists[f"top-{index.shape[1]} neighbours"], cfg)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return Evaluation(report=report, distributions=dists)


def save_figures(ev: Evaluation, figures_dir: Path, show: bool = False) -> list[Path]:
    from . import figures

    figures_dir.mkdir(parents=True, exist_ok=True)
    rep = ev.report
    sim = rep["similarity"]
    out = [figures.similarity_histogram(
        ev.distributions, figures_dir / "eval_similarity_hist.png",
        title=(f"intra {sim['intra']:.3f} vs inter {sim['inter']:.3f}  |  AUC {sim['separation']['auc']:.3f}, "
               f"d' {sim['separation']['d_prime']:.2f}  ({rep['n_images']:,} images)"), show=show)]
    groups: dict[str, dict[str, float]] = {}
    ret = rep["retrieval"]
    for k in RETRIEVAL_KS:
        if f"precision@{k}" in ret:
            groups[f"{ret['label_column']} @{k}"] = {"precision": ret[f"precision@{k}"],
                                                      "recall": ret[f"recall@{k}"], "mAP": ret[f"mAP@{k}"]}
    cop = rep.get("copies", {})
    for k in COPY_KS:
        if f"precision@{k}" in cop:
            groups[f"copies @{k}"] = {"precision": cop[f"precision@{k}"], "recall": cop[f"recall@{k}"],
                                      "F1": cop[f"f1@{k}"]}
    if groups:
        out.append(figures.metric_bars(groups, figures_dir / "eval_retrieval.png",
                                       title="retrieval against metadata and recovery of perturbed copies",
                                       show=show))
    ev.figures = out
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def summary_table(report: dict) -> str:
    """A plain-text table of the headline numbers (also pasted into the README's evaluation section)."""
    lines: list[str] = []
    meta = report.get("features_meta", {})
    lines.append(f"evaluation of {report['data_dir']}: {report['n_images']:,} images, D={report['dim']}"
                 + (f", {meta.get('backbone')}" if meta.get("backbone") else ""))
    rows: list[tuple[str, str, str]] = []
    sim = report["similarity"]
    k = sim["k"]
    rows.append(("similarity", f"intra: mean sim. to top-{k} neighbours", _fmt(sim["intra"])))
    pairs = f"all {sim['n_pairs']:,} pairs" if sim.get("all_pairs") else f"{sim['n_pairs']:,} random pairs"
    rows.append(("", f"inter: mean sim. of {pairs}", _fmt(sim["inter"])))
    rows.append(("", "separation: gap / d' / AUC",
                 f"{_fmt(sim['separation']['gap'])} / {_fmt(sim['separation']['d_prime'], 2)} / "
                 f"{_fmt(sim['separation']['auc'])}"))
    mc = sim.get("matrix_check", {})
    if mc.get("status") in ("agree", "DISAGREE"):
        rows.append(("", f"inter from the h5 matrix ({mc['pairs_compared']:,} pairs)",
                     f"{_fmt(mc['inter_from_matrix'])} vs {_fmt(mc['inter_from_features_same_pairs'])} "
                     f"({mc['status']}, max diff {mc['max_abs_diff']:.1e})"))
    else:
        rows.append(("", "h5 matrix check", mc.get("reason", mc.get("status", "-"))))
    ret = report["retrieval"]
    title = f"same {ret.get('label_column')}"
    if "precision@1" in ret:
        ks = [kk for kk in RETRIEVAL_KS if f"precision@{kk}" in ret]
        head = " / ".join(f"@{kk}" for kk in ks)
        rows.append((title, f"queries with >= 1 other member", f"{ret['n_queries']:,} of {ret['n_images']:,}"))
        for m in ("precision", "recall", "mAP"):
            rows.append(("", f"{m} {head}", " / ".join(_fmt(ret[f'{m}@{kk}']) for kk in ks)))
        rows.append(("", "random ranking precision", _fmt(ret["random_precision"])))
    else:
        rows.append((title, "retrieval", ret.get("status", "-")))
    cop = report.get("copies", {})
    if "precision@1" in cop:
        head = " / ".join(f"@{kk}" for kk in COPY_KS)
        rows.append(("perturbed copies", f"{cop['n_originals']} originals x {cop['copies_per_original']} copies",
                     f"among {cop['searched_among']:,}"))
        for m, key in (("precision", "precision"), ("recall", "recall"), ("F1", "f1")):
            rows.append(("", f"{m} {head}", " / ".join(_fmt(cop[f'{key}@{kk}']) for kk in COPY_KS)))
        by_kind = cop.get(f"found_in_top{max(COPY_KS)}_by_kind", {})
        if by_kind:
            rows.append(("", f"found in top {max(COPY_KS)}: " + " / ".join(by_kind),
                         " / ".join(_fmt(v, 2) for v in by_kind.values())))
    else:
        rows.append(("perturbed copies", "", cop.get("status", "-")))
    pix = report.get("pixels", {})
    if "ssim_neighbours" in pix:
        rows.append(("pixel baselines", f"SSIM neighbours / random ({pix['n_queries']} queries)",
                     f"{_fmt(pix['ssim_neighbours'])} / {_fmt(pix['ssim_random'])}"))
        rows.append(("", "RMSE neighbours / random", f"{_fmt(pix['rmse_neighbours'])} / {_fmt(pix['rmse_random'])}"))
        rows.append(("", "Pearson(embedding score, SSIM)", _fmt(pix["pearson_score_vs_ssim"])))
    else:
        rows.append(("pixel baselines", "", pix.get("status", "-")))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines.append(f"{'section':<{w0}}  {'metric':<{w1}}  value")
    lines.append(f"{'-' * w0}  {'-' * w1}  {'-' * 24}")
    lines.extend(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)
    return "\n".join(lines)
