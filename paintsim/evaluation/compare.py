"""Which backbone, fusion or boost gives the most meaningful neighbours on this collection?

``evaluate_unsupervised.py --compare A B ...`` evaluates several feature sets (folders written by
``extract_features.py --output-dir``, the data dir itself) or neighbour tables (a ``.npy`` table,
e.g. a boosted one; its features are those of its folder) of one collection with one config:
the same labels (the data dir's manifest), the same queries, the same seeds. Because the queries
are the same, each retrieval and copy metric is compared *paired*: the difference of two entries
is bootstrapped over the queries, and a difference counts only when its 95% interval excludes 0.
``comparison.json`` and ``figures/comparison.png`` are written and read here.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import metrics
from ..embeddings import Embeddings
from ..errors import UserError
from .run import EvalConfig, evaluate

log = logging.getLogger(__name__)

#: (section, metric) pairs compared; retrieval and copies are paired over the same queries.
#: (section, metric, label): the label keys ``comparison.json`` and names the row and the bar.
COMPARED = (("retrieval", "precision@1", "precision@1"), ("retrieval", "precision@5", "precision@5"),
            ("retrieval", "precision@10", "precision@10"), ("retrieval", "mAP@10", "mAP@10"),
            ("copies", "precision@1", "copies precision@1"), ("copies", "recall@5", "copies recall@5"),
            ("similarity", "intra", "intra"), ("similarity", "inter", "inter"),
            ("similarity", "auc", "separation AUC"), ("similarity", "d_prime", "separation d'"))


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    features_dir: Path
    table: Path | None


def parse_entries(items: Sequence[str]) -> list[Entry]:
    """Each item: a folder holding features.npy, or a neighbour table ``.npy`` file."""
    entries, seen = [], set()
    for item in items:
        p = Path(item)
        if p.is_dir():
            if not (p / "features.npy").exists():
                raise UserError(f"--compare {item}: no features.npy in this folder (write one with "
                                "extract_features.py --output-dir)")
            e = Entry(p.name or str(p), p, None)
        elif p.is_file() and p.suffix == ".npy":
            e = Entry(f"{p.parent.name}/{p.stem}", p.parent, p)
        else:
            raise UserError(f"--compare {item}: neither a folder of features nor a neighbour table (.npy)")
        name, i = e.name, 2
        while name in seen:
            name, i = f"{e.name} ({i})", i + 1
        seen.add(name)
        entries.append(dataclasses.replace(e, name=name))
    if len(entries) < 2:
        raise UserError("--compare needs two or more feature sets or neighbour tables")
    return entries


def _check_same_images(entries: list[Entry]) -> None:
    first = None
    for e in entries:
        emb = Embeddings.load(e.features_dir)
        if first is None:
            first = (e, emb.names)
        elif not np.array_equal(emb.names, first[1]):
            a, b = set(first[1].tolist()), set(emb.names.tolist())
            raise UserError(f"--compare: {e.features_dir} and {first[0].features_dir} hold different images or "
                            f"another order ({len(a - b)} only in the first, {len(b - a)} only in the second): "
                            "extract every set from the same manifest of the same --data-dir")


def _value(section: dict, metric: str) -> float | None:
    if metric in ("auc", "d_prime"):
        return (section.get("separation") or {}).get(metric)
    v = section.get(metric)
    return float(v) if isinstance(v, (int, float)) else None


def _describe(rep: dict) -> dict:
    meta = rep.get("features_meta", {})
    fusion = meta.get("fusion") or {}
    pca = fusion.get("pca") if isinstance(fusion, dict) else None
    return {"backbone": meta.get("backbone"), "preprocessing": (meta.get("preprocessing") or {}).get("mode"),
            "dim": rep.get("dim"), "pca": (pca or {}).get("dimension") if pca else None,
            "whiten": (pca or {}).get("whiten") if pca else None,
            "boost": rep.get("neighbours_boost")}


def compare(data_dir: str, items: Sequence[str], cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate every entry with ``cfg`` (faces left out) and compare them; nothing written."""
    entries = parse_entries(items)
    _check_same_images(entries)
    evals = []
    for e in entries:
        log.info("evaluating %s", e.name)
        ecfg = dataclasses.replace(cfg, neighbours=str(e.table) if e.table else None, skip_faces=True)
        evals.append(evaluate(data_dir, ecfg, features_dir=str(e.features_dir)))
    out: dict[str, Any] = {"data_dir": evals[0].report["data_dir"], "n_images": evals[0].report["n_images"],
                           "config": evals[0].report["config"], "entries": [], "paired": {}, "best": {}}
    for e, ev in zip(entries, evals):
        rep = ev.report
        row: dict[str, Any] = {"name": e.name, "features_dir": str(e.features_dir),
                               "neighbours_from": rep["neighbours_from"], **_describe(rep), "metrics": {}}
        for sec, m, label in COMPARED:
            section = rep.get(sec, {})
            v = _value(section, m)
            if v is None:
                continue
            row["metrics"][label] = {"value": v, "ci95": section.get("ci95", {}).get(m),
                                 "chance": section.get("chance", {}).get(m)}
        for sec in ("retrieval", "copies"):
            if "status" in rep.get(sec, {}):
                row[f"{sec}_status"] = rep[sec]["status"]
        if rep.get("retrieval", {}).get("circular"):
            row["retrieval_circular"] = rep["retrieval"]["circular"]
        out["entries"].append(row)
    # paired differences against the best entry of each metric
    for sec, m, label in COMPARED:
        have = [(e, ev) for e, ev in zip(entries, evals) if m in ev.per_query.get(sec, {})]
        if sec == "similarity" or len(have) < 2:
            continue
        means = [float(ev.per_query[sec][m].mean()) for _, ev in have]
        b = int(np.argmax(means))
        best_e, best_ev = have[b]
        base = best_ev.per_query[sec][m]
        diffs = {}
        for e, ev in have:
            if e is best_e:
                continue
            other = ev.per_query[sec][m]
            if other.shape != base.shape:
                continue
            d = base.astype(np.float64) - other
            lo, hi = metrics.bootstrap_ci(d[:, None], n_boot=cfg.n_boot, seed=cfg.seed)
            diffs[e.name] = {"difference": float(d.mean()), "ci95": [float(lo[0]), float(hi[0])],
                             "exceeds_interval": bool(lo[0] > 0)}
        out["paired"][label] = {"best": best_e.name, "versus": diffs, "n": int(base.size),
                            "resampled": "queries" if sec == "retrieval" else "originals"}
        out["best"][label] = {"name": best_e.name, "paired": True,
                          "clearly_best": bool(diffs) and all(v["exceeds_interval"] for v in diffs.values())}
    return out


def write_comparison(path: str | Path, comparison: dict) -> None:
    from ..artifacts import write_json_atomic

    write_json_atomic(path, comparison)


def read_comparison(path: str | Path) -> dict:
    from ..artifacts import read_json_object

    c = read_json_object(path)
    if not isinstance(c.get("entries"), list):
        raise UserError(f"{path} is not a comparison (no 'entries')")
    return c


def save_comparison_figure(comparison: dict, path: str | Path, show: bool = False) -> Path:
    """Bars per metric (groups) and entry (bars), with 95% intervals and chance levels."""
    from .. import figures

    groups: dict[str, dict[str, float]] = {}
    cis: dict[str, dict[str, tuple]] = {}
    chance: dict[str, dict[str, float]] = {}
    for sec, m, label in COMPARED:
        if sec == "similarity" and m != "auc":
            continue
        for row in comparison["entries"]:
            v = row["metrics"].get(label)
            if v is None:
                continue
            groups.setdefault(label, {})[row["name"]] = v["value"]
            if v.get("ci95"):
                cis.setdefault(label, {})[row["name"]] = tuple(v["ci95"])
            if v.get("chance") is not None:
                chance.setdefault(label, {})[row["name"]] = v["chance"]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return figures.metric_bars(groups, path, title=f"comparison of {len(comparison['entries'])} feature sets "
                               f"({comparison['n_images']:,} images; bars: 95% intervals, ticks: chance)",
                               intervals=cis, chance=chance, show=show)


def comparison_table(comparison: dict) -> str:
    """Entries as columns, metrics as rows; the best of a row is starred, with ``*`` when its paired
    interval against every other entry excludes 0 and ``?`` when it does not."""
    entries = comparison["entries"]
    rows: list[tuple[str, list[str]]] = [("", [r["name"] for r in entries])]
    for label, key in (("backbone", "backbone"), ("preprocessing", "preprocessing"), ("dimension", "dim"),
                       ("pca", "pca")):
        rows.append((label, [str(r.get(key) or "-") for r in entries]))
    rows.append(("boost", [",".join(f"{f}={w}" for f, w in (r["boost"] or {}).get("fields", {}).items())
                           if r.get("boost") else "-" for r in entries]))
    for _, _, m in COMPARED:
        cells = []
        best = comparison["best"].get(m, {})
        for r in entries:
            v = r["metrics"].get(m)
            if v is None:
                cells.append("-")
                continue
            mark = ""
            if best.get("name") == r["name"] and best.get("paired"):
                mark = "*" if best.get("clearly_best") else "?"
            ci = v.get("ci95")
            cells.append(f"{v['value']:.3f}" + (f" ±{(ci[1] - ci[0]) / 2:.3f}" if ci else "") + mark)
        rows.append((m, cells))
    head = max(len(label) for label, _ in rows)
    widths = [max(len(cells[i]) for _, cells in rows) for i in range(len(entries))]
    lines = [f"{label:<{head}}" + "".join(f"  {c:>{w}}" for c, w in zip(cells, widths)) for label, cells in rows]
    lines.append("\n±: half the 95% interval; *: best, and its paired difference to every other entry excludes 0;"
                 " ?: best, but not distinguishable from the next by the paired interval")
    for r in comparison["entries"]:
        for sec in ("retrieval", "copies"):
            if r.get(f"{sec}_status"):
                lines.append(f"{r['name']}: {sec} {r[f'{sec}_status']}")
        if r.get("retrieval_circular"):
            lines.append(f"{r['name']}: retrieval CIRCULAR: {r['retrieval_circular']}")
    return "\n".join(lines)
