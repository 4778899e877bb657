"""Metadata boost: re-rank each painting's neighbours by what the catalogue says as well as by
what the pictures look like, exactly.

A pair's final score is ``(1 - mix) * visual + mix * meta``, where ``visual`` is the cosine of the
two rows and ``meta = sum of w_f over the boosted fields f on which the two paintings agree``
(same value after trimming and ignoring case; empty and placeholder values such as "Unknown"
never agree). ``decade`` and ``century`` are derived from the manifest's ``displaydate``.

Exactness. The boost is at most ``B = sum w_f``, so a painting ``j`` outside a row's top ``K``
visual candidates has ``final <= (1 - mix) * v_K + mix * B``, with ``v_K`` the K-th visual score.
Once that bound is below the row's k-th final score among the candidates, no painting outside
them can enter its top k; rows where it is not yet below are searched again with twice the
candidates, until it is (or every painting is a candidate). The result equals a brute-force
re-ranking of all pairs; the side record says how many candidates were scored.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import knn
from .errors import BadValue, UserError

log = logging.getLogger(__name__)

#: Fields computed from ``displaydate`` rather than read from a column.
DERIVED_FIELDS = ("decade", "century")
DEFAULT_MIX = 0.3
_FIELD_RE = re.compile(r"^\s*([^=,]+?)\s*=\s*([^=,]+?)\s*$")


@dataclass(frozen=True)
class Boost:
    """Fields and their weights, and the weight ``mix`` of the metadata score in the final one."""

    fields: tuple[tuple[str, float], ...]
    mix: float = DEFAULT_MIX

    @classmethod
    def parse(cls, text: str, mix: float = DEFAULT_MIX) -> "Boost":
        """``"attribution=0.3,medium=0.1"`` -> a Boost; raises ``BadValue`` naming ``boost``."""
        fields: dict[str, float] = {}
        for part in str(text).split(","):
            m = _FIELD_RE.match(part)
            if not m:
                raise BadValue("boost", text, "expected FIELD=WEIGHT[,FIELD=WEIGHT...], "
                                              "e.g. attribution=0.3,medium=0.1")
            name, value = m.group(1), m.group(2)
            try:
                weight = float(value)
            except ValueError:
                raise BadValue("boost", text, f"the weight of {name!r} is not a number: {value!r}") from None
            if not (weight > 0 and np.isfinite(weight)):
                raise BadValue("boost", text, f"the weight of {name!r} must be a positive number")
            if name in fields:
                raise BadValue("boost", text, f"{name!r} is given twice")
            fields[name] = weight
        if not (0 < mix <= 1):
            raise BadValue("boost_mix", mix, "must be in (0, 1]")
        return cls(tuple(fields.items()), float(mix))

    @property
    def max_boost(self) -> float:
        return float(sum(w for _, w in self.fields))

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f for f, _ in self.fields)

    def to_record(self) -> dict:
        return {"fields": dict(self.fields), "mix": self.mix, "max_boost": self.max_boost,
                "score": "(1 - mix) * cosine + mix * sum of the weights of the fields that agree"}


def field_codes(paths, names: Sequence[str], boost: Boost) -> np.ndarray:
    """Integer codes ``[F, N]`` of each boosted field per row (-1: unknown, never agrees), from
    the manifest with the evaluation's label rules (placeholders such as "Unknown" are unknown)."""
    from .evaluation.retrieval import load_labels
    from .manifest import manifest_by_name
    from .site.records import year_of

    names = np.asarray(names)
    out = np.full((len(boost.fields), len(names)), -1, dtype=np.int64)
    manifest = None
    for f, (field, _) in enumerate(boost.fields):
        if field in DERIVED_FIELDS:
            if manifest is None:
                manifest = manifest_by_name(paths.manifest)
            step = 10 if field == "decade" else 100
            dates = manifest["displaydate"] if "displaydate" in manifest.columns else {}
            years = [year_of(str(dates.get(str(nm), ""))) for nm in names]
            out[f] = [-1 if y is None else y // step for y in years]
            continue
        try:
            codes, _, _ = load_labels(paths, names, field)
        except UserError as exc:  # a missing column or manifest: name the flag
            raise BadValue("boost", field, str(exc)) from None
        out[f] = codes
    return out


def meta_scores(codes: np.ndarray, weights: np.ndarray, rows: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """``[len(rows), K]`` sum of the weights of the fields on which row and candidate agree."""
    out = np.zeros(cand.shape, dtype=np.float64)
    for f in range(codes.shape[0]):
        a = codes[f][rows][:, None]
        b = codes[f][cand]
        out += weights[f] * ((a == b) & (a >= 0))
    return out


def _visual64(features: np.ndarray, rows: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Float64 cosines of each row with its candidates (identical vectors score identically)."""
    out = np.empty(cand.shape, dtype=np.float64)
    step = max(1, (16 * 2**20) // (8 * max(1, cand.shape[1]) * features.shape[1]))
    for s in range(0, len(rows), step):
        q = features[rows[s:s + step]].astype(np.float64)
        c = features[cand[s:s + step]].astype(np.float64)
        out[s:s + step] = np.einsum("bd,bkd->bk", q, c, optimize=False)
    return out


def _rank(final: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k of each row by descending final score, ties to the lower index."""
    order = np.lexsort((cand, -final), axis=1)[:, :k]
    return np.take_along_axis(cand, order, 1), np.take_along_axis(final, order, 1)


def _candidates(features: np.ndarray, rows: np.ndarray, width: int, device: str) -> np.ndarray:
    """Each row's ``width`` best visual neighbours (self excluded)."""
    n = len(features)
    if width >= n - 1:
        allc = np.arange(n)
        return np.stack([allc[allc != r] for r in rows])
    idx, _ = knn.search(features[rows], features, width + 1, device=device)
    is_self = idx == rows[:, None]
    # drop the row itself; where ties pushed it out of the list, drop the last one instead
    drop = np.where(is_self.any(1), is_self.argmax(1), width)
    keep = np.ones_like(idx, dtype=bool)
    keep[np.arange(len(rows)), drop] = False
    return idx[keep].reshape(len(rows), width).astype(np.int64)


def boosted_top_k(features: np.ndarray, codes: np.ndarray, boost: Boost, k: int, *, device: str = "cpu",
                  initial: int | None = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """Exact top-``k`` neighbours of every row by final score (see the module docstring).

    Returns ``(index int32 [N, k], final score float32 [N, k], stats)``; ``stats`` says how many
    candidates were scored (``initial`` per row, then doubled for the rows that needed more).
    """
    features = np.ascontiguousarray(features, dtype=np.float32)
    n = len(features)
    k = knn.validate_k(k, n)
    weights = np.array([w for _, w in boost.fields], dtype=np.float64)
    width = first = min(n - 1, initial or max(2 * k, k + 32))
    index, _ = knn.top_k_neighbors(features, width, device=device, progress=progress)
    cand = index.astype(np.int64)
    rows = np.arange(n)
    out_i = np.empty((n, k), dtype=np.int32)
    out_s = np.empty((n, k), dtype=np.float32)
    scored = np.full(n, width, dtype=np.int64)
    rounds = 0
    while True:
        rounds += 1
        vis = _visual64(features, rows, cand)
        final = (1 - boost.mix) * vis + boost.mix * meta_scores(codes, weights, rows, cand)
        top_i, top_f = _rank(final, cand, k)
        # the best any painting outside the candidates could reach
        # (plus the float32 kernel's rounding, which may order candidates near the K-th one wrongly)
        bound = (1 - boost.mix) * (vis.min(axis=1) + knn.NEAR_TIE) + boost.mix * boost.max_boost
        done = (bound < top_f[:, -1]) | (cand.shape[1] >= n - 1)
        out_i[rows[done]] = top_i[done]
        out_s[rows[done]] = top_f[done]
        scored[rows] = cand.shape[1]
        if done.all():
            break
        rows = rows[~done]
        width = min(n - 1, 2 * cand.shape[1])
        cand = _candidates(features, rows, width, device)
    stats = {"k": k, "initial_candidates": int(first),
             "rounds": rounds, "rows_widened": int((scored > scored.min()).sum()),
             "max_candidates": int(scored.max()), "mean_candidates": float(scored.mean()),
             "candidates_beyond_k": float(scored.mean() - k)}
    return out_i, out_s, stats
