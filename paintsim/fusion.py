"""Several backbones as one embedding: weighted concatenation, optionally through a PCA of the collection.

The recipe (``extract_features.py --backbone a,b,c [--fusion-weights wa,wb,wc] [--pca N [--whiten]]``):

1. each model embeds every image as the single-backbone stage does (its own L2-normalised row
   ``x_m``, its own resumable progress, see :mod:`paintsim.extract`);
2. the rows are weighted by their blend weight and concatenated in ``--backbone`` order,
   ``x = [w_1 x_1, ..., w_M x_M]`` (float64);
3. optionally projected onto the ``N`` leading principal components of the collection
   (``z = (x - mean) @ components.T``; divided by ``sqrt(explained_variance)`` with whitening);
4. L2-normalised, float32.

Without PCA the cosine of two fused rows is ``sum w_m^2 cos_m / sum w_m^2``.

Steps 2-4 are one function, :func:`fuse`, used for the collection's rows and for any outside
image (:class:`FusedEmbedder`), so both land in the same space. The PCA is the artifact
``features_pca.npz``, written only by :func:`save_pca` and read only by :func:`load_pca`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .artifacts import DataPaths, load_npz, save_npz_atomic
from .backbones import BACKBONES
from .errors import BadValue, UserError

#: Version of the features_pca.npz layout.
PCA_FORMAT_VERSION = 1
#: Whitening refuses components whose variance is below this fraction of the total (no direction).
MIN_WHITEN_VARIANCE_RATIO = 1e-10
#: Rows per block when fusing or fitting (bounded memory: ~32 MB of float64 per block).
BLOCK_BYTES = 32 * 2**20


# --------------------------------------------------------------------------------------------
# the recipe


#: ``--backbone NAME:SUFFIX``: one model's preprocessing, whatever ``--no-crop`` says (so that a
#: centre-crop and a letterbox embedding of one backbone can be fused).
PREPROCESS_SUFFIXES = {"letterbox": True, "crop": False, "center-crop": False}


@dataclass(frozen=True)
class ModelChoice:
    """One model of a fusion: its backbone, where its weights come from, its blend weight."""

    backbone: str
    weights: str | None
    blend: float = 1.0
    letterbox: bool | None = None   # None: --no-crop decides; a ``:letterbox`` / ``:crop`` suffix overrides it


def _split(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",")]


def parse_models(backbone: str, weights: str | None = "default",
                 fusion_weights: str | float | None = None) -> list[ModelChoice]:
    """The models named by ``backbone`` (one name or a comma list), each with its weights source
    (``weights``: one value for all, or a comma list aligned with the backbones; a single backbone
    takes ``weights`` whole, so a path may hold a comma) and blend weight (``fusion_weights``: one
    positive number for all, or a comma list; default 1). Raises :class:`BadValue` naming the
    parameter."""
    names, boxes = [], []
    for part in _split(backbone):
        name, _, mode = part.partition(":")
        if mode and mode not in PREPROCESS_SUFFIXES:
            raise BadValue("backbone", backbone, f"{part!r}: a model's preprocessing suffix is one of "
                           f"{', '.join(':' + m for m in PREPROCESS_SUFFIXES)}")
        names.append(name.strip())
        boxes.append(PREPROCESS_SUFFIXES[mode] if mode else None)
    if any(not n for n in names):
        raise BadValue("backbone", backbone, "an empty name in the list; give names separated by commas, "
                       "e.g. resnet50,vit_b_16")
    unknown = [n for n in names if n not in BACKBONES]
    if unknown:
        raise BadValue("backbone", backbone, f"unknown backbone{'s' if len(unknown) > 1 else ''} "
                       f"{', '.join(unknown)}; choose from {', '.join(BACKBONES)}")
    n = len(names)
    if n == 1 or weights is None:
        sources: list[str | None] = [weights] * n
    else:
        sources = [w or "default" for w in _split(weights)]
        if len(sources) == 1:
            sources = sources * n
        elif len(sources) != n:
            raise BadValue("weights", weights, f"{len(sources)} values for {n} backbones; give one value "
                           "for all of them or one per backbone, in --backbone order")
    if fusion_weights is None or (isinstance(fusion_weights, str) and not fusion_weights.strip()):
        blends = [1.0] * n
    else:
        texts = _split(str(fusion_weights))
        try:
            blends = [float(t) for t in texts]
        except ValueError:
            raise BadValue("fusion_weights", fusion_weights, "blend weights must be numbers, e.g. 1,0.5,2") from None
        if not all(math.isfinite(b) and b > 0 for b in blends):
            raise BadValue("fusion_weights", fusion_weights, "blend weights must be positive finite numbers")
        if len(blends) == 1:
            blends = blends * n
        elif len(blends) != n:
            raise BadValue("fusion_weights", fusion_weights, f"{len(blends)} values for {n} backbones; give one "
                           "value for all of them or one per backbone, in --backbone order")
    return [ModelChoice(b, w, float(x), lb) for b, w, x, lb in zip(names, sources, blends, boxes)]


def check_pca_size(n_components: int, n_rows: int, dim: int) -> None:
    """A PCA of ``n_components`` needs at most the rank of the centred collection, min(N - 1, D)."""
    if n_components < 0:
        raise BadValue("pca", n_components, "must be 0 (no PCA) or a number of components")
    limit = min(n_rows - 1, dim)
    if n_components > limit:
        raise BadValue("pca", n_components, f"must be at most min(N - 1, D) = min({n_rows} - 1, {dim}) = "
                       f"{limit} (N images, D the fused dimension: the rank of the centred collection)")


def recipe_fingerprint(model_fingerprints: Sequence[str], blends: Sequence[float], pca_dim: int,
                       whiten: bool, extra: str | None = None) -> str:
    """Identity of the whole recipe: each model's embedding fingerprint, the blend, the PCA asked for."""
    key = {"fusion": 1, "models": [[fp, float(b)] for fp, b in zip(model_fingerprints, blends)],
           "pca": int(pca_dim), "whiten": bool(whiten), "extra": extra}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# the math


def weighted_concat(parts: Sequence[np.ndarray], blends: Sequence[float]) -> np.ndarray:
    """``[w_1 x_1, ..., w_M x_M]`` in float64 (each ``x_m`` one model's unit rows)."""
    if len(parts) != len(blends) or not parts:
        raise ValueError(f"{len(parts)} parts for {len(blends)} blend weights")
    rows = {int(np.shape(p)[0]) for p in parts}
    if len(rows) != 1:
        raise ValueError(f"the models gave different numbers of rows: {sorted(rows)}")
    return np.concatenate([np.asarray(p, dtype=np.float64) * float(w) for p, w in zip(parts, blends)], axis=1)


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """Unit rows, float32; a zero or non-finite row comes back as NaN (a degenerate embedding)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(norms > 0, x / norms, np.nan)
    return out.astype(np.float32)


@dataclass
class PCA:
    """A PCA fitted on the collection's fused rows (before normalisation)."""

    mean: np.ndarray                        # float64 [D_in]
    components: np.ndarray                  # float64 [n, D_in], orthonormal rows, descending variance
    explained_variance: np.ndarray          # float64 [n] (ddof = 1)
    explained_variance_ratio: np.ndarray    # float64 [n], of the total variance
    whiten: bool = False

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def input_dim(self) -> int:
        return int(self.components.shape[1])

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Project (and whiten) rows, float64, not normalised."""
        z = (np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T
        if self.whiten:
            z = z / np.sqrt(self.explained_variance)
        return z


def fuse(parts: Sequence[np.ndarray], blends: Sequence[float], pca: PCA | None = None) -> np.ndarray:
    """THE fusion of one block of images: weighted concatenation, PCA (when given), unit rows float32.

    Used for the collection's rows and for outside images alike."""
    x = weighted_concat(parts, blends)
    if pca is not None:
        if x.shape[1] != pca.input_dim:
            raise UserError(f"the PCA expects {pca.input_dim} fused features, the models give {x.shape[1]}")
        x = pca.transform(x)
    return normalise_rows(x)


def block_rows(dim: int) -> int:
    return max(1, BLOCK_BYTES // (8 * max(1, dim)))


def _sign_fix(components: np.ndarray) -> np.ndarray:
    """Deterministic signs: the largest-|coefficient| entry of each component is positive."""
    idx = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(len(components)), idx])
    signs[signs == 0] = 1.0
    return components * signs[:, None]


def fit_pca(blocks: Callable[[], Iterable[np.ndarray]], n_rows: int, dim: int, n_components: int,
            whiten: bool = False) -> tuple[PCA, str]:
    """Fit a PCA on the rows that ``blocks()`` yields (float64 blocks ``[b, dim]``, ``n_rows`` in all;
    called once or twice). Mean-centred; SVD of the centred matrix when N <= D, else ``eigh`` of the
    covariance accumulated block by block. Returns the PCA and the method (``svd``/``eigh``)."""
    check_pca_size(n_components, n_rows, dim)
    if n_components < 1:
        raise BadValue("pca", n_components, "must be at least 1")
    total_sum = np.zeros(dim, np.float64)
    count = 0
    for b in blocks():
        total_sum += b.sum(axis=0)
        count += len(b)
    if count != n_rows:
        raise ValueError(f"the blocks hold {count} rows, expected {n_rows}")
    mean = total_sum / n_rows
    if n_rows <= dim:
        method = "svd"
        xc = np.concatenate([b - mean for b in blocks()])
        _, s, vt = np.linalg.svd(xc, full_matrices=False)
        variances = s ** 2 / (n_rows - 1)
        total = float(np.einsum("ij,ij->", xc, xc)) / (n_rows - 1)
        components = vt[:n_components]
        ev = variances[:n_components]
    else:
        method = "eigh"
        cov = np.zeros((dim, dim), np.float64)
        for b in blocks():
            bc = b - mean
            cov += bc.T @ bc
        cov /= n_rows - 1
        total = float(np.trace(cov))
        w, v = np.linalg.eigh(cov)
        order = np.argsort(w)[::-1][:n_components]
        components = v[:, order].T
        ev = np.clip(w[order], 0.0, None)
    components = _sign_fix(np.ascontiguousarray(components, dtype=np.float64))
    ratio = ev / total if total > 0 else np.zeros_like(ev)
    if whiten:
        tiny = np.nonzero(ev <= MIN_WHITEN_VARIANCE_RATIO * max(total, 0.0))[0]
        if len(tiny):
            raise BadValue("pca", n_components, f"component {int(tiny[0]) + 1} has (numerically) no variance, "
                           "and whitening would divide by zero; choose a smaller number of components "
                           "(are many images identical?)")
    return PCA(mean=mean, components=components, explained_variance=np.asarray(ev, np.float64),
               explained_variance_ratio=np.asarray(ratio, np.float64), whiten=bool(whiten)), method


# --------------------------------------------------------------------------------------------
# the artifact: features_pca.npz (one writer, one reader)


def file_sha256(path: str | os.PathLike[str]) -> str:
    from .backbones import sha256_file

    return sha256_file(path)


def save_pca(path: str | os.PathLike[str], pca: PCA) -> str:
    """Write ``features_pca.npz`` atomically (plain arrays, no pickle); return its SHA-256."""
    save_npz_atomic(path, version=np.array(PCA_FORMAT_VERSION, np.int64),
                    mean=np.asarray(pca.mean, np.float64), components=np.asarray(pca.components, np.float64),
                    explained_variance=np.asarray(pca.explained_variance, np.float64),
                    explained_variance_ratio=np.asarray(pca.explained_variance_ratio, np.float64),
                    whiten=np.array(bool(pca.whiten)))
    return file_sha256(path)


def load_pca(path: str | os.PathLike[str], sha256: str | None = None) -> PCA:
    """Read ``features_pca.npz``, checked: the SHA-256 the meta records (when given), keys, shapes,
    finite values. Any problem is one :class:`UserError` naming the file."""
    path = Path(path)
    redo = "rerun extract_features.py with the same --backbone/--pca flags"
    if not path.is_file():
        raise UserError(f"{path} is missing: the features were projected through this PCA; {redo}")
    if sha256 is not None:
        actual = file_sha256(path)
        if actual != sha256:
            raise UserError(f"{path} does not match the checksum features_meta.json records for it "
                            f"(sha256 {actual[:12]}... vs {sha256[:12]}...): changed or damaged since "
                            f"extraction; {redo}")
    try:
        z = load_npz(path)
        mean = np.asarray(z["mean"], np.float64)
        comps = np.asarray(z["components"], np.float64)
        ev = np.asarray(z["explained_variance"], np.float64)
        ratio = np.asarray(z["explained_variance_ratio"], np.float64)
        whiten = z["whiten"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a readable PCA file ({exc}); {redo}") from None
    n = comps.shape[0] if comps.ndim == 2 else -1
    if (comps.ndim != 2 or mean.shape != (comps.shape[1],) or ev.shape != (n,) or ratio.shape != (n,)
            or whiten.shape != () or whiten.dtype != np.bool_):
        raise UserError(f"{path}: unexpected shapes (mean {mean.shape}, components {comps.shape}, "
                        f"explained_variance {ev.shape}, whiten {whiten.shape}); {redo}")
    if not all(np.isfinite(a).all() for a in (mean, comps, ev, ratio)) or (bool(whiten) and not (ev > 0).all()):
        raise UserError(f"{path}: non-finite values or zero variances; {redo}")
    return PCA(mean, comps, ev, ratio, bool(whiten))


# --------------------------------------------------------------------------------------------
# features_meta.json


def model_entry(embedder_meta: dict[str, Any], blend: float) -> dict[str, Any]:
    """One model of the recipe as features_meta.json records it under ``fusion.models``."""
    entry = {"backbone": embedder_meta["backbone"], "weights": embedder_meta["weights"],
             "random_weights": embedder_meta.get("random_weights", False),
             "preprocessing": embedder_meta["preprocessing"], "precision": embedder_meta["precision"],
             "dimension": int(embedder_meta["dimension"]), "blend_weight": float(blend)}
    for key in ("bf16_recipe", "precision_choice"):   # how bf16 runs; how --precision was resolved
        if key in embedder_meta:
            entry[key] = embedder_meta[key]
    return entry


def fused_meta(entries: list[dict[str, Any]], first: dict[str, Any], pca_info: dict[str, Any] | None,
               dimension: int) -> dict[str, Any]:
    """The embedder part of a fused features_meta.json: top-level keys as a single backbone has them
    (backbone ``a+b+c``, the first model's preprocessing, the output dimension) plus ``fusion``."""
    return {"backbone": "+".join(e["backbone"] for e in entries),
            "weights": {"kind": "fusion", "id": "+".join(e["weights"]["id"] for e in entries)},
            "random_weights": any(e.get("random_weights") for e in entries),
            "preprocessing": entries[0]["preprocessing"], "precision": entries[0]["precision"],
            **({"precision_choice": entries[0]["precision_choice"]} if "precision_choice" in entries[0] else {}),
            "dimension": int(dimension), "device": first.get("device"),
            "channels_last": first.get("channels_last"), "batch_size": first.get("batch_size"),
            "versions": first.get("versions"),
            "fusion": {"models": entries, "input_dimension": sum(e["dimension"] for e in entries),
                       "pca": pca_info}}


def pca_meta(pca: PCA, sha256: str, method: str, n_rows: int) -> dict[str, Any]:
    return {"dimension": pca.n_components, "whiten": pca.whiten, "input_dimension": pca.input_dim,
            "explained_variance_ratio_total": float(pca.explained_variance_ratio.sum()),
            "method": method, "fitted_on": int(n_rows), "file": DataPaths.of(".").features_pca.name,
            "sha256": sha256}


# --------------------------------------------------------------------------------------------
# embedding an outside image like the fused collection


class FusedEmbedder:
    """Every model of the recipe, the blend and the saved PCA: PIL images in, the collection's rows out.

    Offers what consumers use of :class:`~paintsim.embedder.Embedder`: ``embed``, ``dim``,
    ``fingerprint()``, ``meta``."""

    def __init__(self, embedders: list, blends: list[float], pca: PCA | None, meta: dict[str, Any],
                 pca_sha256: str | None = None):
        self.embedders = embedders            # one per model, in --backbone order (shared when identical)
        self.blends = [float(b) for b in blends]
        self.pca = pca
        self._meta = meta
        self.pca_sha256 = pca_sha256

    @classmethod
    def from_meta(cls, meta: dict[str, Any], device: str = "auto", weights: str | None = None,
                  data_dir: str | os.PathLike[str] | None = None) -> "FusedEmbedder":
        from .embedder import Embedder

        fusion = meta.get("fusion")
        try:
            models = list(fusion["models"])
            blends = [float(m["blend_weight"]) for m in models]
            pca_info = fusion.get("pca")
        except (KeyError, TypeError, ValueError, AttributeError):
            raise UserError("features_meta.json: malformed 'fusion' entry; rerun extract_features.py") from None
        if not models:
            raise UserError("features_meta.json: 'fusion' lists no models; rerun extract_features.py")
        overrides: list[str | None] = [None] * len(models)
        if weights is not None:
            given = _split(weights) if len(models) > 1 else [weights]
            if len(given) == 1:
                given = given * len(models)
            if len(given) != len(models):
                raise UserError(f"weights {weights!r}: {len(given)} values for the {len(models)} models of the "
                                "fusion; give one per model, in the recorded order")
            overrides = [g or None for g in given]
        built: dict[str, Any] = {}
        embedders = []
        for m, override in zip(models, overrides):
            sub = {"backbone": m.get("backbone"), "weights": m.get("weights"), "preprocessing": m.get("preprocessing"),
                   "precision": m.get("precision", "fp32"), "dimension": m.get("dimension"),
                   "device": meta.get("device"), "channels_last": meta.get("channels_last"),
                   "batch_size": meta.get("batch_size") or 32}
            if "bf16_recipe" in m:
                sub["bf16_recipe"] = m["bf16_recipe"]
            key = json.dumps([sub, override], sort_keys=True, default=str)
            if key not in built:
                built[key] = Embedder.from_meta(sub, device=device, weights=override)
            embedders.append(built[key])
        pca, sha = None, None
        if pca_info:
            if data_dir is None:
                raise UserError("the features were projected through a PCA (features_pca.npz): pass the "
                                "features' folder (data_dir=...) or use Embedder.for_collection")
            sha = pca_info.get("sha256") if isinstance(pca_info, dict) else None
            pca = load_pca(DataPaths.of(data_dir).features_pca, sha256=sha)
            want = sum(e.dim for e in embedders)
            if pca.input_dim != want:
                raise UserError(f"{DataPaths.of(data_dir).features_pca} expects {pca.input_dim} fused features, "
                                f"the recorded models give {want}; rerun extract_features.py")
        emb = cls(embedders, blends, pca, meta, sha)
        if "dimension" in meta and int(meta["dimension"]) != emb.dim:
            raise UserError(f"features_meta.json says dimension {meta['dimension']} but the fusion gives {emb.dim}")
        return emb

    @property
    def dim(self) -> int:
        return self.pca.n_components if self.pca is not None else sum(e.dim for e in self.embedders)

    @property
    def meta(self) -> dict[str, Any]:
        """The recipe as features_meta.json records it (without counts)."""
        keep = ("backbone", "weights", "random_weights", "preprocessing", "precision", "precision_choice",
                "dimension", "device", "channels_last", "batch_size", "versions", "fusion")
        return {k: self._meta[k] for k in keep if k in self._meta}

    def fingerprint(self) -> str:
        """Identity of everything that changes a fused row: each model, the blend, the PCA file."""
        pca = self.pca
        extra = None if pca is None else f"pca-sha256:{self.pca_sha256}"
        return recipe_fingerprint([e.fingerprint() for e in self.embedders], self.blends,
                                  pca.n_components if pca is not None else 0,
                                  bool(pca.whiten) if pca is not None else False, extra)

    def embed(self, images: Sequence) -> np.ndarray:
        """float32 ``[n, D]`` unit rows, exactly as the collection's rows were made (:func:`fuse`)."""
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        cache: dict[int, np.ndarray] = {}
        parts = []
        for e in self.embedders:
            if id(e) not in cache:
                cache[id(e)] = e.embed(images)
            parts.append(cache[id(e)])
        return fuse(parts, self.blends, self.pca)
