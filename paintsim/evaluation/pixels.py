"""Pixel baselines: SSIM and RMSE between a painting and its neighbours, against random paintings.

Embedding neighbours are similar in composition and palette, rarely pixel by pixel; these numbers
show how far pixel measures agree with the embedding.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .. import metrics



def _grey(emb, row: int, size: int, cache: dict) -> np.ndarray | None:
    if row in cache:
        return cache[row]
    from PIL import Image

    from ..images import ImageDecodeError, load_rgb

    try:
        img = load_rgb(emb.image_path(row))
        arr = np.asarray(img.convert("L").resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0
    except ImageDecodeError:
        arr = None
    if len(cache) > 4096:
        cache.clear()
    cache[row] = arr
    return arr


def pixel_section(emb, index: np.ndarray, nb_sim: np.ndarray, cfg) -> dict:
    """SSIM and RMSE of each sampled query to its neighbours, and to as many random paintings."""
    n, k = index.shape
    rng = np.random.default_rng(cfg.seed + 2)
    sample = np.sort(rng.choice(n, size=min(cfg.pixel_sample, n), replace=False))
    cache: dict = {}
    res = {"neighbours": {"ssim": [], "rmse": [], "score": []}, "random": {"ssim": [], "rmse": []}}
    skipped = 0
    for q in tqdm(sample, desc="pixel baselines", unit="query", disable=not cfg.progress):
        a = _grey(emb, int(q), cfg.pixel_size, cache)
        if a is None:
            skipped += 1
            continue
        rand = rng.integers(0, n - 1, size=k)
        rand += rand >= q
        for group, rows in (("neighbours", index[q]), ("random", rand)):
            for r_i, r in enumerate(rows):
                b = _grey(emb, int(r), cfg.pixel_size, cache)
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
