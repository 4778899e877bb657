"""The evaluation as people read it: ``evaluation.json`` (written and read here), the summary
table and the two charts."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .copies import COPY_KS
from .retrieval import RETRIEVAL_KS

#: Ends a summary-table row holding a metric not distinguishable from chance (legend under the table).
CHANCE_MARK = "  ~ chance"


@dataclass
class Evaluation:
    report: dict
    distributions: dict = field(default_factory=dict)
    figures: list = field(default_factory=list)
    #: section -> metric -> per-query values (the same queries in every evaluation of one collection
    #: with one seed, so a comparison can pair them)
    per_query: dict = field(default_factory=dict)


def write_report(path: str | Path, report: dict) -> None:
    """Write ``evaluation.json`` atomically."""
    from ..artifacts import write_json_atomic

    write_json_atomic(path, report)


def read_report(path: str | Path) -> dict:
    """Read an ``evaluation.json`` written by :func:`write_report`."""
    from ..artifacts import read_json_object

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run evaluate_unsupervised.py first")
    report = read_json_object(path)
    if not isinstance(report.get("similarity"), dict):
        raise ValueError(f"{path} is not an evaluation report (no 'similarity' section)")
    return report


def figure_paths(prefix: str | Path) -> dict[str, Path]:
    """The two plots of one report: ``<prefix>similarity_hist.png`` and ``<prefix>retrieval.png``
    (``prefix`` = a folder plus the start of a file name, e.g. ``runs/a_`` or ``figures/eval_``)."""
    prefix = Path(prefix)
    return {"hist": prefix.parent / f"{prefix.name}similarity_hist.png",
            "bars": prefix.parent / f"{prefix.name}retrieval.png"}


def _bar_groups(rep: dict) -> tuple[dict, dict, dict]:
    """(values, 95% intervals, chance levels) per bar group and metric, for ``figures.metric_bars``."""
    groups: dict[str, dict[str, float]] = {}
    cis: dict[str, dict[str, tuple]] = {}
    chance: dict[str, dict[str, float]] = {}
    sections = (("retrieval", RETRIEVAL_KS, (("precision", "precision"), ("recall", "recall"), ("mAP", "mAP")),
                 rep["retrieval"].get("label_column")),
                ("copies", COPY_KS, (("precision", "precision"), ("recall", "recall"), ("F1", "f1")), "copies"))
    for name, ks, metric_keys, label in sections:
        sec = rep.get(name, {})
        for k in ks:
            if f"precision@{k}" not in sec:
                continue
            group = f"{label} @{k}"
            groups[group] = {m: sec[f"{key}@{k}"] for m, key in metric_keys}
            cis[group] = {m: tuple(sec["ci95"][f"{key}@{k}"]) for m, key in metric_keys
                          if f"{key}@{k}" in sec.get("ci95", {})}
            chance[group] = {m: sec["chance"][f"{key}@{k}"] for m, key in metric_keys
                             if f"{key}@{k}" in sec.get("chance", {})}
    return groups, cis, chance


def save_figures(ev: Evaluation, prefix: str | Path, show: bool = False) -> list[Path]:
    """The histogram of neighbour vs random-pair similarity and the metric bars (with their 95%
    intervals and chance levels), each naming the neighbour table it was computed from; written
    to :func:`figure_paths` of ``prefix``."""
    from .. import figures

    where = figure_paths(prefix)
    where["hist"].parent.mkdir(parents=True, exist_ok=True)
    rep = ev.report
    sim = rep["similarity"]
    out = [figures.similarity_histogram(
        ev.distributions, where["hist"],
        title=(f"intra {sim['intra']:.3f} vs inter {sim['inter']:.3f}  |  AUC {sim['separation']['auc']:.3f}, "
               f"d' {sim['separation']['d_prime']:.2f}  ({rep['n_images']:,} images)\n"
               f"neighbours: {rep['neighbours_from']}"), show=show)]
    groups, cis, chance = _bar_groups(rep)
    if groups:
        out.append(figures.metric_bars(groups, where["bars"],
                                       title="retrieval against metadata and recovery of perturbed copies\n"
                                             f"neighbours: {rep['neighbours_from']}",
                                       intervals=cis, chance=chance, show=show))
    ev.figures = out
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _ci(lo_hi) -> str:
    return f"[{_fmt(lo_hi[0])}, {_fmt(lo_hi[1])}]"


def _face_rows(fac: dict, ret: dict) -> list[tuple[str, str, str]]:
    """The faces section's rows: share with faces, face-level same-label precision beside the
    whole painting's, recovery of perturbed face crops."""
    if "n_faces" not in fac:
        return [("faces", "", fac.get("status", "-"))]
    rows = [("faces", f"paintings with a face ({fac['n_faces']} faces)",
             f"{fac['paintings_with_faces']} of {fac['n_paintings']} = {_fmt(fac['share_with_faces'])} "
             f"{_ci(fac['share_with_faces_ci95'])}")]
    same = fac.get("same_label", {})
    ks = [k for k in (1, 5, 10) if f"precision@{k}" in same]
    if ks:
        flags = set(same.get("indistinguishable_from_chance", []))
        vals = " / ".join(_fmt(same[f"precision@{k}"]) + (CHANCE_MARK if f"precision@{k}" in flags else "")
                          for k in ks)
        rows.append(("", f"face: same {same['label_column']} precision " + " / ".join(f"@{k}" for k in ks), vals))
        rows.append(("", "  95% interval (bootstrap over faces)", " / ".join(_ci(same["ci95"][f"precision@{k}"]) for k in ks)))
        rows.append(("", "  chance (random ranking)", " / ".join(_fmt(same["chance"][f"precision@{k}"]) for k in ks)))
        whole = [_fmt(ret[f"precision@{k}"]) for k in ks if f"precision@{k}" in ret]
        if whole:
            rows.append(("", "  the whole paintings, for comparison", " / ".join(whole)))
    else:
        rows.append(("", "face: same label", same.get("status", "-")))
    rec = fac.get("crop_recovery", {})
    if "recall@1" in rec:
        rows.append(("", f"perturbed face crop finds its face first ({rec['n']})",
                     f"{_fmt(rec['recall@1'])} {_ci(rec['ci95'])}, chance {_fmt(rec['chance'])}"
                     + (CHANCE_MARK if rec.get("indistinguishable_from_chance") else "")))
    else:
        rows.append(("", "perturbed face crops", rec.get("status", "-")))
    return rows


def summary_table(report: dict) -> str:
    """A plain-text table of the headline numbers (docs/evaluation.md shows the demo's)."""
    lines: list[str] = []
    meta = report.get("features_meta", {})
    lines.append(f"evaluation of {report['data_dir']}: {report['n_images']:,} images, D={report['dim']}"
                 + (f", {meta.get('backbone')}" if meta.get("backbone") else "")
                 + f"; neighbours from {report.get('neighbours_from', '?')}"
                 + (f", boosted by {report['neighbours_boost'].get('fields')} (mix {report['neighbours_boost'].get('mix')})"
                    if report.get("neighbours_boost") else ""))
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
        rows.append((title, "queries with >= 1 other member", f"{ret['n_queries']:,} of {ret['n_images']:,}"))
        if ret.get("circular"):
            rows.append(("", "CIRCULAR (--allow-circular)", "the table was boosted by this label: these numbers "
                         "measure the boost, not the pictures"))
        if "placeholder_excluded" in ret:
            vals = ", ".join(f"{v} x{c}" for v, c in ret.get("placeholder_values", {}).items())
            rows.append(("", "placeholder labels left out (unknown)",
                         f"{ret['placeholder_excluded']:,}" + (f" ({_short(vals)})" if vals else "")))
        for m in ("precision", "recall", "mAP"):
            rows.extend(_metric_rows(ret, m, m, ks))
    else:
        rows.append((title, "retrieval", ret.get("status", "-")))
    cop = report.get("copies", {})
    if "precision@1" in cop:
        seeds = cop.get("seeds", [])
        rows.append(("perturbed copies", f"{cop['n_originals']} originals x {cop['copies_per_original']} copies"
                     + (f" (seed {seeds[0]})" if seeds else ""), f"among {cop['searched_among']:,}"))
        for m, key in (("precision", "precision"), ("recall", "recall"), ("F1", "f1")):
            rows.extend(_metric_rows(cop, m, key, COPY_KS))
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
    rows.extend(_face_rows(report.get("faces", {}), report.get("retrieval", {})))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines.append(f"{'section':<{w0}}  {'metric':<{w1}}  value")
    lines.append(f"{'-' * w0}  {'-' * w1}  {'-' * 24}")
    lines.extend(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)
    if any(c.endswith(CHANCE_MARK) for _, _, c in rows):
        lines.append(f"\n{CHANCE_MARK.strip()}: the 95% interval contains the chance level (what a random ranking "
                     "scores): not distinguishable from random")
    return "\n".join(lines)


def _num(v: Any) -> str:
    """A metric, chance level or bound: 3 decimals, or 2 significant digits below 0.01 (the chance
    levels of a large collection) so that it does not print as 0.000."""
    if isinstance(v, float) and 1e-6 <= abs(v) < 0.01:
        import numpy as np

        return np.format_float_positional(v, precision=2, fractional=False, trim="-")
    return _fmt(v)


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _metric_rows(sec: dict, label: str, key: str, ks) -> list[tuple[str, str, str]]:
    """A metric at each k, then its 95% intervals, chance levels and spread over seeds (copies);
    a value whose interval contains its chance level is marked with ``~``."""
    head = " / ".join(f"@{kk}" for kk in ks)
    names = [f"{key}@{kk}" for kk in ks]
    flagged = set(sec.get("indistinguishable_from_chance", []))
    values = " / ".join(_num(sec[n]) + ("~" if n in flagged else "") for n in names)
    rows = [("", f"{label} {head}", values + (CHANCE_MARK if flagged & set(names) else ""))]
    if all(n in sec.get("ci95", {}) for n in names):
        rows.append(("", "  95% interval (bootstrap)",
                     " / ".join(f"[{_num(sec['ci95'][n][0])}, {_num(sec['ci95'][n][1])}]" for n in names)))
    if all(n in sec.get("chance", {}) for n in names):
        rows.append(("", "  chance (random ranking)", " / ".join(_num(sec["chance"][n]) for n in names)))
    spread = sec.get("spread", {})
    if len(sec.get("seeds", [])) > 1 and all(n in spread for n in names):
        seeds = sec["seeds"]
        rows.append(("", f"  {len(seeds)} seeds ({seeds[0]}-{seeds[-1]}): mean ± sd [min, max]",
                     " / ".join(f"{_num(spread[n]['mean'])} ± {_fmt(spread[n]['std'])} "
                                f"[{_num(spread[n]['min'])}, {_num(spread[n]['max'])}]" for n in names)))
    return rows
