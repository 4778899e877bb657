"""A small synthetic collection with planted structure, written in the artifact contract's formats.

Groups of near-copies (an "original" and a few slightly perturbed copies, in feature space and in
pixels, all with one artist) hidden among unrelated random paintings. An evaluation that works must
find the groups; one that does not, cannot.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from paintsim.artifacts import save_npy_atomic
from paintsim.embeddings import array_sha256
from paintsim.manifest import MANIFEST_COLUMNS, write_manifest
from paintsim.neighbours import save_table
from reference import brute_force_float64


def _image(grid: np.ndarray, size: int) -> Image.Image:
    return Image.fromarray(grid.clip(0, 255).astype(np.uint8)).resize((size, size), Image.NEAREST)


def make_collection(root: Path, n_random: int = 60, n_groups: int = 5, copies: int = 3, dim: int = 64,
                    seed: int = 0, noise: float = 0.05, k: int = 10, image_size: int = 48,
                    with_table: bool = True) -> dict:
    """Write features.npy, image_names.npy, manifest.csv, images/ (and top_k_similar.npy) under root."""
    rng = np.random.default_rng(seed)
    feats, grids, artists, group_of = [], [], [], []
    for g in range(n_groups):
        base = rng.normal(size=dim)
        grid = rng.uniform(0, 255, size=(6, 6, 3))
        for c in range(copies + 1):
            feats.append(base + (noise * rng.normal(size=dim) * np.linalg.norm(base) / np.sqrt(dim) if c else 0))
            grids.append(grid + (rng.normal(0, 8, size=grid.shape) if c else 0))
            artists.append(f"Planted Artist {g}")
            group_of.append(g)
    for r in range(n_random):
        feats.append(rng.normal(size=dim))
        grids.append(rng.uniform(0, 255, size=(6, 6, 3)))
        artists.append(f"Random Artist {r}")
        group_of.append(-1)
    order = rng.permutation(len(feats))
    feats = np.asarray(feats, dtype=np.float64)[order]
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    feats = feats.astype(np.float32)
    grids = [grids[i] for i in order]
    artists = [artists[i] for i in order]
    group_of = np.asarray(group_of)[order]
    n = len(feats)
    uuids = [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(n)]
    names = np.array([f"{u}.jpg" for u in uuids])
    (root / "images").mkdir(parents=True, exist_ok=True)
    for name, grid in zip(names, grids):
        _image(grid, image_size).save(root / "images" / name, quality=95)
    rows = []
    for i, (u, name, artist) in enumerate(zip(uuids, names, artists)):
        row = dict.fromkeys(MANIFEST_COLUMNS, "")
        row.update(uuid=u, objectid=str(1000 + i), url=f"https://api.nga.gov/iiif/{u}/full/!640,640/0/default.jpg",
                   title=f"Painting {i}", attribution=artist,
                   displaydate=str(1400 + i), classification="Painting", file=f"images/{name}", status="ok",
                   width=str(image_size), height=str(image_size))
        rows.append(row)
    write_manifest(root / "manifest.csv", pd.DataFrame(rows))
    save_npy_atomic(root / "features.npy", feats)
    save_npy_atomic(root / "image_names.npy", names)
    index, score = brute_force_float64(feats, k)
    score = score.astype(np.float32)
    if with_table:
        save_table(root / f"top_{k}_similar.npy", index, score, route="streamed",
                   features_sha256=array_sha256(feats))
    return {"root": root, "features": feats, "names": names, "group_of": group_of, "index": index,
            "score": score, "objectids": [str(1000 + i) for i in range(n)], "uuids": uuids}
