"""The evaluation as people read it: ``evaluation.json`` (written and read here), the summary
table and the two charts."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .copies import COPY_KS
from .retrieval import RETRIEVAL_KS


@dataclass
class Evaluation:
    report: dict
    distributions: dict = field(default_factory=dict)
    figures: list = field(default_factory=list)


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


def save_figures(ev: Evaluation, figures_dir: Path, show: bool = False) -> list[Path]:
    """The histogram of neighbour vs random-pair similarity and the metric bars, each naming the
    neighbour table it was computed from."""
    from .. import figures

    figures_dir.mkdir(parents=True, exist_ok=True)
    rep = ev.report
    sim = rep["similarity"]
    out = [figures.similarity_histogram(
        ev.distributions, figures_dir / "eval_similarity_hist.png",
        title=(f"intra {sim['intra']:.3f} vs inter {sim['inter']:.3f}  |  AUC {sim['separation']['auc']:.3f}, "
               f"d' {sim['separation']['d_prime']:.2f}  ({rep['n_images']:,} images)\n"
               f"neighbours: {rep['neighbours_from']}"), show=show)]
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
                                       title="retrieval against metadata and recovery of perturbed copies\n"
                                             f"neighbours: {rep['neighbours_from']}",
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
    """A plain-text table of the headline numbers (docs/evaluation.md shows the demo's)."""
    lines: list[str] = []
    meta = report.get("features_meta", {})
    lines.append(f"evaluation of {report['data_dir']}: {report['n_images']:,} images, D={report['dim']}"
                 + (f", {meta.get('backbone')}" if meta.get("backbone") else "")
                 + f"; neighbours from {report.get('neighbours_from', '?')}")
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
        rows.append((title, "queries with >= 1 other member", f"{ret['n_queries']:,} of {ret['n_images']:,}"))
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
