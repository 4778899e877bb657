"""Recovery of perturbed copies: does each painting find its own slightly different photographs?

Copies of a seeded sample of paintings (crop, rotation, colour jitter, blur, JPEG:
``paintsim.perturb``) are embedded with the model recorded in ``features_meta.json`` and mixed
into the collection; each original must find its copies among the collection plus all copies.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .. import knn, metrics
from .retrieval import interval_and_chance

log = logging.getLogger(__name__)

#: Ranks reported for perturbed-copy recovery.
COPY_KS = (1, 3, 5)
#: One copy of each of these is made per sampled painting (strengths: paintsim/perturb.py).
COPY_KINDS = ("crop", "rotate", "jitter", "blur", "jpeg")


def copies_section(emb, cfg, per_query_out: dict | None = None) -> dict:
    """Embed perturbed copies of a seeded sample and find them among the collection + all copies,
    once per seed of ``cfg.seed``, ``cfg.seed + 1``, ... (``cfg.copy_seeds``): the report is the
    first seed's, with intervals and chance levels, plus the spread over the seeds.

    Raises ``UserError`` when the model cannot be built (no meta, no weights offline).
    """
    from ..devices import resolve_device
    from ..embedder import Embedder

    device = resolve_device(cfg.device)
    embedder = Embedder.for_collection(emb, device=device, weights=cfg.weights)
    seeds = [cfg.seed + i for i in range(max(1, cfg.copy_seeds))]
    runs = [_one_seed(emb, embedder, device, cfg, s, check_originals=i == 0) for i, s in enumerate(seeds)]
    out, per_query = runs[0]
    if per_query is None:
        return out
    if per_query_out is not None:
        per_query_out.update(per_query)
    chance = _chance(out)
    out.update(interval_and_chance(per_query, chance, cfg.n_boot, cfg.seed, resampled="originals"))
    done = [(s, pq) for s, (_, pq) in zip(seeds, runs) if pq is not None]
    out["seeds"] = [s for s, _ in done]
    out["per_seed"] = {m: [float(pq[m].mean()) for _, pq in done] for m in per_query}
    out["spread"] = {m: _spread(v) for m, v in out["per_seed"].items()}
    return out


def _spread(values: list[float]) -> dict:
    """Mean, min, max and standard deviation (ddof 1; 0 for one seed) of one metric over seeds."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()),
            "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}


def _chance(out: dict) -> dict[str, float]:
    """A random ranking of the collection (minus the original) plus all copies, its own copies
    relevant: the same for every original."""
    m, r = out["searched_among"], out["copies_per_original"]
    chance = {}
    for k in COPY_KS:
        chance[f"precision@{k}"] = float(metrics.chance_precision_at_k([r], m, k)[0])
        chance[f"recall@{k}"] = float(metrics.chance_recall_at_k([r], m, k)[0])
        chance[f"f1@{k}"] = float(metrics.chance_f1_at_k([r], m, k)[0])
    return chance


def _one_seed(emb, embedder, device, cfg, seed: int, check_originals: bool = True) -> tuple[dict, dict | None]:
    """One copy experiment: (report keys, per-original metric values or None when nothing ran).
    ``check_originals`` re-embeds the originals too (the check that the model is the collection's;
    once is enough)."""
    from ..images import ImageDecodeError, load_rgb
    from ..perturb import perturb

    features = emb.features
    n = features.shape[0]
    kinds = list(cfg.copy_kinds)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(cfg.copy_sample, n), replace=False))
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

    for row in tqdm(sample, desc=f"perturbed copies (seed {seed})", unit="painting", disable=not cfg.progress):
        try:
            img = load_rgb(emb.image_path(int(row)))
        except ImageDecodeError as exc:
            unreadable.append(str(exc))
            continue
        originals.append(int(row))
        if check_originals:
            pending.append(img)
            pending_tags.append(("orig", int(row), -1))
        for kind_idx, kind in enumerate(kinds):
            krng = np.random.default_rng([seed, int(row), kind_idx])
            pending.append(perturb(img, kind, krng))
            pending_tags.append(("copy", int(row), kind_idx))
        if len(pending) >= cfg.batch_size:
            flush()
    flush()
    if not originals:
        return {"status": "skipped: no sampled image could be read", "unreadable": unreadable}, None
    q_rows = np.asarray(originals)
    copies_arr = np.stack(copies)
    owners_arr = np.asarray(owners)
    kinds_arr = np.asarray(kind_of)
    queries = np.asarray(features[q_rows], dtype=np.float32)
    self_cos = np.einsum("qd,qd->q", queries, np.stack(reembedded)) if reembedded else None
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
    }
    if self_cos is not None:
        out["reembedded_original_cosine_min"] = float(self_cos.min())
        out["reembedded_original_cosine_mean"] = float(self_cos.mean())
    per_query: dict[str, np.ndarray] = {}
    for k in COPY_KS:
        hits = np.asarray(hits_by_k[k], dtype=np.float64)
        p, r = hits / k, hits / n_copies
        per_query[f"precision@{k}"], per_query[f"recall@{k}"] = p, r
        per_query[f"f1@{k}"] = metrics.f1_score(p, r)
    out.update({m: float(v.mean()) for m, v in per_query.items()})
    out[f"found_in_top{kmax}_by_kind"] = {kind: float(found_by_kind[:, i].mean()) for i, kind in enumerate(kinds)}
    if self_cos is not None and self_cos.min() < 0.98:
        log.warning("re-embedding the originals gives cosine %.3f (min) to their stored features: "
                    "features_meta.json may not describe how features.npy was made", self_cos.min())
    return out, per_query
