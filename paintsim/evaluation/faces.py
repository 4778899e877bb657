"""The faces section: how many paintings have a face, whether a face's nearest faces (in other
paintings) share its painting's label, and whether a perturbed face crop finds its own face.

Every figure has a seeded bootstrap interval and, where a random ranking has one, its chance level.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .. import knn, metrics

log = logging.getLogger(__name__)

#: Ranks of the face-level same-label precision.
FACE_KS = (1, 5, 10)
#: Faces whose perturbed crops are searched for.
FACE_COPY_SAMPLE = 50


def faces_section(emb, codes: np.ndarray | None, label_column: str, cfg) -> dict[str, Any]:
    """``emb``: the paintings' Embeddings; ``codes``: their label codes (-1 unknown) or None."""
    from ..embeddings import Embeddings
    from ..faces import faces_csv, read_faces_csv

    from ..errors import UserError

    paths = emb.paths.of_kind("faces")
    if not paths.features.exists():
        return {"status": "skipped: no face_features.npy (run extract_faces.py)"}
    try:
        faces = Embeddings.load(emb.paths.root, kind="faces")
        boxes = read_faces_csv(faces_csv(paths))
    except UserError as exc:
        return {"status": f"skipped: {exc}"}
    row_of = {str(nm): i for i, nm in enumerate(emb.names)}
    owner = np.array([row_of.get(faces.image_name(i), -1) for i in range(len(faces))])
    if (owner < 0).any():
        log.warning("%d face(s) belong to no painting of features.npy (stale faces?); left out",
                    int((owner < 0).sum()))
    has_face = np.zeros(len(emb), dtype=np.float64)
    has_face[owner[owner >= 0]] = 1.0
    lo, hi = metrics.bootstrap_ci(has_face[:, None], n_boot=cfg.n_boot, seed=cfg.seed)
    out: dict[str, Any] = {"n_faces": int(len(faces)), "n_paintings": int(len(emb)),
                           "paintings_with_faces": int(has_face.sum()),
                           "share_with_faces": float(has_face.mean()),
                           "share_with_faces_ci95": [float(lo[0]), float(hi[0])],
                           "faces_from": str(paths.features.name)}
    out.update(_same_label(faces, owner, codes, label_column, cfg))
    out.update(_crop_recovery(emb, faces, boxes, cfg))
    return out


def _same_label(faces, owner: np.ndarray, codes: np.ndarray | None, label_column: str, cfg) -> dict:
    if codes is None:
        return {"same_label": {"status": "skipped: no labels"}}
    owned = np.flatnonzero(owner >= 0)  # faces of paintings of the collection only
    if owned.size < 2:
        return {"same_label": {"status": "skipped: too few faces"}}
    owner = owner[owned]
    feats = np.asarray(faces.features[owned], dtype=np.float32)
    face_codes = codes[owner]
    n_other = len(owner) - np.bincount(owner, minlength=owner.max() + 1)[owner]
    kmax = min(max(FACE_KS), int(n_other.min()))
    if kmax < 1 or (face_codes >= 0).sum() < 2:
        return {"same_label": {"status": "skipped: too few faces in other paintings"}}
    index, _ = knn.top_k_other_groups(feats, owner, kmax, device=cfg.device)
    # relevant: faces of other paintings with the same label; queries: faces with at least one
    same = np.zeros(len(faces), dtype=np.int64)
    for c in np.unique(face_codes[face_codes >= 0]):
        members = face_codes == c
        per_owner = np.bincount(owner[members], minlength=owner.max() + 1)
        same[members] = members.sum() - per_owner[owner[members]]
    queries = np.flatnonzero((face_codes >= 0) & (same > 0))
    res: dict[str, Any] = {"label_column": label_column, "n_queries": int(queries.size),
                           "note": "faces of one painting are resampled independently, so the interval "
                                   "may be narrow where a painting has many faces"}
    if queries.size == 0:
        res["status"] = "skipped: no face shares its label with a face of another painting"
        return {"same_label": res}
    rel = face_codes[index[queries]] == face_codes[queries, None]
    per_query, chance = {}, {}
    for k in FACE_KS:
        if k <= kmax:
            per_query[f"precision@{k}"] = rel[:, :k].mean(axis=1)
            chance[f"precision@{k}"] = float((same[queries] / n_other[queries]).mean())
    from .retrieval import interval_and_chance

    res.update({m: float(v.mean()) for m, v in per_query.items()})
    res.update(interval_and_chance(per_query, chance, cfg.n_boot, cfg.seed, resampled="faces"))
    return {"same_label": res}


def _crop_recovery(emb, faces, boxes, cfg) -> dict:
    """Perturbed crops of a seeded sample of faces, embedded as the faces were, searched among all
    faces: recall@1 is the share whose own face comes first (chance: 1 / number of faces)."""
    from ..faces import FaceConfig, crop_face, make_embedder
    from ..images import ImageDecodeError, load_rgb
    from ..perturb import perturb

    if getattr(cfg, "skip_copies", False):
        return {"crop_recovery": {"status": "skipped (--skip-copies)"}}
    rng = np.random.default_rng(cfg.seed)
    sample = np.sort(rng.choice(len(faces), size=min(FACE_COPY_SAMPLE, len(faces)), replace=False))
    model = faces.meta.get("model", {}) if faces.meta else {}
    fcfg = FaceConfig(face_model="vggface2" if model.get("kind") == "vggface2" else "backbone",
                      weights=cfg.weights, device=cfg.device)
    try:
        embedder, _ = make_embedder(fcfg, emb.paths, cfg.device if cfg.device != "auto" else "cpu")
    except Exception as exc:  # noqa: BLE001 - the section says why, the report goes on
        return {"crop_recovery": {"status": f"skipped: {exc}"}}
    crops, rows = [], []
    recorded = faces.meta.get("crop", {}) if faces.meta else {}
    if model.get("kind") == "backbone" and model.get("fingerprint") not in (None, embedder.fingerprint()):
        return {"crop_recovery": {"status": "skipped: the faces were embedded by another model than "
                                            "features_meta.json describes (rerun extract_faces.py)"}}
    for r in sample:
        image, i = str(faces.names[r]).rsplit("#", 1)
        image = Path(image).name  # a name is looked up in the folder, never a path
        try:
            img = load_rgb(emb.images_dir / image)
            face = boxes[image][int(i)]
        except (ImageDecodeError, KeyError, IndexError, ValueError):
            continue
        crop = crop_face(img, face, recorded.get("margin", 0.3), recorded.get("align", True))
        crops.append(perturb(crop, "crop+jitter+blur", np.random.default_rng([cfg.seed, int(r)])))
        rows.append(int(r))
    if not crops:
        return {"crop_recovery": {"status": "skipped: no sampled face could be read"}}
    vecs = np.asarray(embedder.embed(crops), dtype=np.float32)
    idx, _ = knn.search(vecs, faces.features, 1, device="cpu")
    hit = (idx[:, 0] == np.array(rows)).astype(np.float64)
    lo, hi = metrics.bootstrap_ci(hit[:, None], n_boot=cfg.n_boot, seed=cfg.seed)
    chance = 1.0 / len(faces)
    return {"crop_recovery": {"n": len(rows), "perturbation": "crop+jitter+blur", "recall@1": float(hit.mean()),
                              "ci95": [float(lo[0]), float(hi[0])], "chance": chance,
                              "indistinguishable_from_chance": bool(lo[0] <= chance <= hi[0])}}
