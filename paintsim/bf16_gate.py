"""Which backbones may be embedded in bf16 autocast on the CPU without being asked: the quality gate.

Speed alone does not decide it (that is :mod:`paintsim.precision`'s probe): bf16 keeps 8 bits of
mantissa, so every activation is rounded to ~3 significant digits, and the neighbours of a
collection could change. ``benchmarks/check_bf16_extraction.py`` measures it on the sample (79 real
NGA paintings) with a backbone's real ImageNet weights: the stage's rows in float32 and in bf16
autocast, the exact top-10 table of each (``knn.top_k_neighbors(..., precision="fp32")``), and
passes when

* the mean overlap of the two neighbour sets is at least :data:`MIN_OVERLAP` (0.95), and
* bf16's same-artist precision@5 lies inside the 95 % bootstrap interval of float32's (the
  evaluation's own ``retrieval_section``, 1,000 resamples of the queries, seed 0).

Its verdicts are kept in the committed table ``bf16_gate.json`` beside this module:

* ``measured``: backbones gated with their own real weights (``--record`` writes the entry), each
  with its numbers, date, machine, the result file and the bf16 recipe it measured
  (``paintsim.embedder.BF16_RECIPE``; an entry of another recipe is stale and does not pass);
* ``follows``: backbones without a measurement of their own that take the verdict of a measured one
  of the same make (convolutions, batch norm, ReLU, pooling: ResNets, VGG16 and DenseNet121 follow
  MobileNetV2; their real weights are not available offline here to measure them). A measured
  entry of their own always wins over ``follows``.

Backbones in neither (``efficientnet_b3``, ``convnext_base``, ``vit_b_16``: SiLU/squeeze-excite,
layer norm, GELU, attention) stay float32 under ``--precision auto``; ``--precision bf16`` still
runs any backbone in bf16. The gate is per backbone, whatever its weights file (the decision is
about the architecture's arithmetic; ``--weights none`` test runs follow it too).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

TABLE = Path(__file__).with_name("bf16_gate.json")
#: the least mean overlap of the bf16 and float32 top-10 neighbour sets on the sample
MIN_OVERLAP = 0.95
#: neighbours compared per painting
K = 10


def load_table(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The gate table (an empty one when the file is missing or unreadable: nothing passes)."""
    try:
        data = json.loads(Path(path or TABLE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {"measured": {}, "follows": {}}
    if not isinstance(data, dict):
        return {"measured": {}, "follows": {}}
    measured = data.get("measured") if isinstance(data.get("measured"), dict) else {}
    follows = data.get("follows") if isinstance(data.get("follows"), dict) else {}
    return {**data, "measured": measured, "follows": follows}


def verdict(backbone: str, table: dict[str, Any] | None = None) -> dict[str, Any]:
    """Whether ``backbone`` passed the gate, and on what evidence (recorded in features_meta.json).

    ``{"backbone", "passed": bool, "status": "passed"|"failed"|"not gated", "measured_on": the
    backbone whose measurement counts (itself, or the one it follows), and that measurement's
    figures}``."""
    table = load_table() if table is None else table
    measured, follows = table["measured"], table["follows"]
    source = backbone if backbone in measured else follows.get(backbone)
    entry = measured.get(source) if isinstance(source, str) else None
    if not isinstance(entry, dict):
        return {"backbone": backbone, "passed": False, "status": "not gated",
                "why": f"{backbone} has no bf16 quality measurement (paintsim/bf16_gate.json)"}
    from .embedder import BF16_RECIPE

    stale = entry.get("bf16_recipe") != BF16_RECIPE
    passed = entry.get("passed") is True and not stale
    status = ("stale" if stale and entry.get("passed") is True else "passed" if passed else "failed")
    out = {"backbone": backbone, "passed": passed, "status": status, "measured_on": source}
    if stale:
        out["why"] = (f"measured with the bf16 recipe {entry.get('bf16_recipe')!r}, not this version's "
                      f"{BF16_RECIPE!r}: rerun benchmarks/check_bf16_extraction.py --record")
    elif source != backbone:
        out["why"] = (f"{backbone} follows {source}'s measurement (same kind of network; its own real "
                      "weights were not measured)")
    for key in ("bf16_recipe", "weights", "neighbour_overlap_mean", "precision_at_5", "date", "machine", "result"):
        if key in entry:
            out[key] = entry[key]
    return out


def record(backbone: str, entry: dict[str, Any], path: str | os.PathLike[str] | None = None) -> Path:
    """Write ``backbone``'s measured verdict into the table (atomically), keeping the rest."""
    target = Path(path or TABLE)
    table = load_table(target)
    table["measured"] = {**table["measured"], backbone: entry}
    fd, tmp = tempfile.mkstemp(prefix=".gate-", suffix=".json", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(table, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
