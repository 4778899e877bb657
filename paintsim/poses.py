"""Poses: the people a painting shows, their 17 COCO keypoints, and one pose descriptor each.

Detection is torchvision's Keypoint R-CNN (``keypointrcnn_resnet50_fpn``): a box, a score and 17
keypoints per person. Every person scoring above ``min_score`` becomes a row of ``poses.csv`` (box
and keypoints in the image's own pixels) and, unless its keypoints are degenerate, a row of
``pose_features.npy``: the descriptor of :func:`pose_descriptor`, L2-normalised float32 so the
project's one exact kernel (cosine = dot product, :mod:`paintsim.knn`) ranks poses as it ranks
paintings. Descriptor rows are named ``<image file name>#<person index>``.

Weights are resolved like the backbones' (:mod:`paintsim.backbones`): torchvision's
``KeypointRCNN_ResNet50_FPN_Weights.DEFAULT`` through its cache (offline with nothing cached: one
line naming the file, its URL and the folder), a local state dict (``weights_only=True``, strict
keys), or seeded random weights for plumbing and tests (recorded; the poses then mean nothing).

The stage is resumable like the features stage (:mod:`paintsim.extract`): detections are kept in
atomically written chunk files under ``poses_progress/``, keyed by image name, size and mtime and a
fingerprint of the detector's configuration, so a killed run resumes and a rerun after new images
detects only in the new ones. Descriptors are recomputed from the stored keypoints at the end (they
are cheap), so a new descriptor version needs no new detection. See docs/poses.md.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from . import artifacts
from .artifacts import DataPaths
from .backbones import ResolvedWeights, _unwrap_state_dict, ensure_cached, sha256_file
from .devices import resolve_device
from .embedder import library_versions
from .embeddings import array_sha256, write_embeddings
from .errors import BadValue, UserError
from .extract import Item, configure_threads, items_from_dir, items_from_manifest
from .progress import ChunkFolder, key_arrays
from .images import ImageDecodeError, is_image_file, load_rgb

log = logging.getLogger(__name__)

MODEL_NAME = "keypointrcnn_resnet50_fpn"
WEIGHTS_ENUM = "KeypointRCNN_ResNet50_FPN_Weights"

#: COCO's 17 keypoints, in the order of the model's output (and of poses.csv).
KEYPOINT_NAMES = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
                  "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
                  "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")
N_KEYPOINTS = len(KEYPOINT_NAMES)
#: Keypoint i of a pose is keypoint FLIP[i] of its left-right mirror image (left <-> right).
FLIP = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)

#: Version of the descriptor (formula, confidence mapping, mirroring rule) recorded in pose_meta.json.
DESCRIPTOR_VERSION = 1
DESCRIPTOR_DIM = 2 * N_KEYPOINTS
#: |asymmetry| below this counts as a tie, settled by comparing the two candidate vectors.
_TIE = 1e-12

DEFAULT_MIN_SCORE = 0.8
DEFAULT_MAX_SIZE = 800
DEFAULT_MAX_PERSONS = 20
DEFAULT_CHUNK_SIZE = 64
#: Auto batch sizes: images of different shapes are padded to one batch, which buys nothing on a CPU.
CPU_BATCH_SIZE = 1
CUDA_BATCH_SIZE = 8
#: Version of what the detection stores (changes discard the progress of older runs).
_DETECTOR_VERSION = 1

_KP_COLUMNS = [f"{name}_{part}" for name in KEYPOINT_NAMES for part in ("x", "y", "conf")]
#: The columns of poses.csv.
CSV_HEADER = ["image", "person", "name", "feature_row", "score", "box_x0", "box_y0", "box_x1",
              "box_y1", "image_width", "image_height", *_KP_COLUMNS]


def poses_csv(data_dir: str | os.PathLike[str] | DataPaths) -> Path:
    """``<data-dir>/poses.csv``: every detected person, box and keypoints in original pixels."""
    root = data_dir.root if isinstance(data_dir, DataPaths) else Path(data_dir)
    return root / "poses.csv"


# --------------------------------------------------------------------------------------------
# the descriptor (pure functions)


def keypoint_confidence(logits: np.ndarray) -> np.ndarray:
    """Keypoint R-CNN's ``keypoints_scores`` (the peak logit of each keypoint's heatmap) -> [0, 1]
    by the logistic function: monotone, so more confident keypoints weigh more (not calibrated)."""
    x = np.asarray(logits, dtype=np.float64)
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)  # = 1 / (1 + exp(-x)), no overflow


def _checked(keypoints: np.ndarray) -> np.ndarray:
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.shape != (N_KEYPOINTS, 3):
        raise ValueError(f"keypoints must have shape ({N_KEYPOINTS}, 3) (x, y, confidence), got {kp.shape}")
    if not np.all(np.isfinite(kp)):
        raise ValueError("keypoints contain NaN or infinity")
    return kp


def _normalised(kp: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Centred on the confidence-weighted centroid, divided by the weighted RMS distance to it;
    None when no two distinct points carry weight (nothing to compare)."""
    xy, w = kp[:, :2], np.clip(kp[:, 2], 0.0, 1.0)
    total = w.sum()
    if total <= 1e-12:
        return None
    q = xy - (w[:, None] * xy).sum(axis=0) / total
    scale = np.sqrt((w * (q * q).sum(axis=1)).sum() / total)
    if not scale > 1e-9 * (1.0 + np.abs(xy).max()):
        return None
    return q / scale, w


def _vector(q: np.ndarray, w: np.ndarray) -> np.ndarray:
    v = (w[:, None] * q).reshape(-1)
    return v / np.linalg.norm(v)


def mirror_keypoints(keypoints: np.ndarray) -> np.ndarray:
    """The left-right mirror image of a pose: x negated, left and right keypoints swapped."""
    kp = np.array(_checked(keypoints)[list(FLIP)])
    kp[:, 0] = -kp[:, 0]
    return kp


def _mirror_vector(v: np.ndarray) -> np.ndarray:
    """The descriptor vector of the mirrored pose, from the vector itself (exact: a signed permutation)."""
    u = v.reshape(N_KEYPOINTS, 2)[list(FLIP)] * np.array([-1.0, 1.0])
    return u.reshape(-1)


_LEFT = np.arange(1, N_KEYPOINTS, 2)   # left_eye, left_ear, ..., left_ankle


def _asymmetry(v: np.ndarray) -> float:
    a = 0.5 * (v - _mirror_vector(v)).reshape(N_KEYPOINTS, 2)
    parts = np.concatenate([a[:1, 0], a[_LEFT, 0], a[_LEFT, 1]])
    return float((parts ** 3).sum())


def asymmetry(keypoints: np.ndarray) -> float:
    """The mirroring rule's statistic: the sum of cubes of the 17 mirror-antisymmetric coordinates
    of the (unoriented) descriptor v, i.e. of ``(v - mirror(v)) / 2`` read at the nose's x and the
    x and y of the 8 left keypoints (the right ones repeat them). Mirroring negates it; it is
    0 for a mirror-symmetric pose, and its sign follows the pose's strongest left-right asymmetry
    (a raised arm, a step, a turned head). 0.0 for a degenerate pose."""
    norm = _normalised(_checked(keypoints))
    return 0.0 if norm is None else _asymmetry(_vector(*norm))


def pose_descriptor(keypoints: np.ndarray) -> np.ndarray | None:
    """The pose descriptor of one person, float32 ``[34]`` with unit L2 norm, or None when the
    pose is degenerate (fewer than two distinct keypoints with confidence above 0).

    ``keypoints``: ``[17, 3]`` rows ``(x, y, confidence)`` in COCO order (:data:`KEYPOINT_NAMES`),
    any pixel units. With weights ``w_i = clip(c_i, 0, 1)``, centroid ``m = sum w_i p_i / sum w_i``
    and scale ``s = sqrt(sum w_i |p_i - m|^2 / sum w_i)``, the vector is
    ``v = (w_i (p_i - m) / s)_i`` flattened and L2-normalised: the same for a shifted or scaled
    pose, and a keypoint enters the dot product of two poses with the product of its two
    confidences, so an unsure keypoint counts little. Rotation is not normalised away (a
    reclining figure is not a standing one).

    Mirroring: a pose and its left-right mirror (:func:`mirror_keypoints`) get the same
    descriptor: of the two vectors, the one stored has a positive :func:`asymmetry`; a tie
    (|asymmetry| < 1e-12, a mirror-symmetric pose, whose two vectors nearly agree anyway) takes the
    lexicographically larger one. A pose whose asymmetry is near 0 without being symmetric may be
    stored either way (docs/poses.md).
    """
    norm = _normalised(_checked(keypoints))
    if norm is None:
        return None
    v = _vector(*norm)
    mv = _mirror_vector(v)
    s = _asymmetry(v)
    if s < -_TIE:
        v = mv
    elif abs(s) <= _TIE:
        a, b = np.round(v, 6), np.round(mv, 6)
        diff = np.flatnonzero(a != b)
        if len(diff) and b[diff[0]] > a[diff[0]]:
            v = mv
    return v.astype(np.float32)


def descriptors(keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pose_descriptor` of each of ``[P, 17, 3]`` poses: ``(features float32 [M, 34],
    kept int64 [M])``, the rows of the non-degenerate poses and their indices in the input."""
    kps = np.asarray(keypoints, dtype=np.float64).reshape(-1, N_KEYPOINTS, 3)
    rows, kept = [], []
    for i, kp in enumerate(kps):
        d = pose_descriptor(kp)
        if d is not None:
            rows.append(d)
            kept.append(i)
    feats = np.stack(rows) if rows else np.zeros((0, DESCRIPTOR_DIM), np.float32)
    return feats.astype(np.float32), np.asarray(kept, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# the detector


def _architecture():
    """Keypoint R-CNN exactly as torchvision builds it for its COCO weights (frozen batch norm),
    without downloading anything: the backbone is randomly initialised."""
    from torchvision.models.detection import KeypointRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)
    return KeypointRCNN(backbone, num_classes=2, num_keypoints=N_KEYPOINTS)


def _load_state_dict(model, path: Path) -> None:
    import torch

    if not path.is_file():
        raise UserError(f"--weights {path}: no such file (give a state dict of {MODEL_NAME}, or leave "
                        "--weights out for torchvision's COCO weights)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any file may be named; every failure is the user's
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--weights {path}: cannot be loaded as a plain state dict with "
                        f"weights_only=True ({first})") from None
    state = _unwrap_state_dict(obj, path)
    expected = model.state_dict()
    # a model trained with ordinary batch norm also saves counters the frozen one has no use for
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
           if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or bad:
        parts = [f"{len(missing)} missing key(s), e.g. {missing[0]}"] if missing else []
        parts += [f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}"] if unexpected else []
        parts += [f"{len(bad)} tensor(s) of another shape, e.g. {bad[0]}"] if bad else []
        raise UserError(f"--weights {path} is not a state dict of {MODEL_NAME} with 17 keypoints: "
                        + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def build_pose_model(weights: str | None = None, random_weights: bool = False, seed: int = 0,
                     progress: bool = True):
    """Keypoint R-CNN in eval mode and where its weights came from: ``(model, ResolvedWeights)``.

    ``weights``: None for torchvision's ``KeypointRCNN_ResNet50_FPN_Weights.DEFAULT`` (downloaded
    once into its cache; offline with nothing cached, a one-line :class:`UserError` says what to
    fetch and where to put it), or a path to a local state dict. ``random_weights``: seeded random
    initialisation instead (tests and plumbing; the poses mean nothing).
    """
    import torch
    import torchvision.models.detection as tvd

    tv_weights = getattr(tvd, WEIGHTS_ENUM).DEFAULT
    weights_id = f"{WEIGHTS_ENUM}.{tv_weights.name}"
    if random_weights and weights:
        raise ValueError("random weights and a weights file exclude each other")
    if random_weights:
        log.warning("!!! random weights (seed %d): %s detects noise; the poses mean nothing and are "
                    "only fit for tests !!!", seed, MODEL_NAME)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _architecture()
        resolved = ResolvedWeights("none", "none", weights_id, seed=seed)
    elif weights:
        path = Path(weights).expanduser()
        model = _architecture()
        _load_state_dict(model, path)
        resolved = ResolvedWeights("file", f"file:{path.name}", weights_id, path=str(path.resolve()),
                                   sha256=sha256_file(path))
    else:
        cached = ensure_cached(tv_weights.url, weights_id, progress=progress)
        try:
            model = tvd.keypointrcnn_resnet50_fpn(weights=tv_weights, progress=progress)
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"the cached weights file {cached} could not be loaded ({first}); delete it "
                            "so it is downloaded again") from None
        resolved = ResolvedWeights("torchvision", weights_id, weights_id, url=tv_weights.url, path=str(cached))
    return model.eval(), resolved


@dataclass
class Detections:
    """The persons found in one image, in its original pixels, most confident first."""

    width: int
    height: int
    boxes: np.ndarray       # float32 [P, 4]: x0, y0, x1, y1
    scores: np.ndarray      # float32 [P]
    keypoints: np.ndarray   # float32 [P, 17, 2]: x, y
    logits: np.ndarray      # float32 [P, 17]: torchvision's keypoints_scores

    def keypoints_with_confidence(self) -> np.ndarray:
        """``[P, 17, 3]``: x, y and :func:`keypoint_confidence`."""
        return np.concatenate([self.keypoints, keypoint_confidence(self.logits)[..., None]], axis=2)

    def __len__(self) -> int:
        return len(self.scores)


def resize_for_detection(img, max_size: int):
    """``img`` with its longest edge at ``max_size`` pixels (up or down), aspect kept."""
    from PIL import Image

    w, h = img.size
    s = max_size / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return img if size == (w, h) else img.resize(size, Image.Resampling.BILINEAR)


class PoseDetector:
    """Keypoint R-CNN set up for one run: images in, :class:`Detections` in original pixels out."""

    def __init__(self, model, weights: ResolvedWeights, device: str, min_score: float,
                 max_size: int, max_persons: int):
        if not 0.0 <= min_score < 1.0:
            raise BadValue("min_score", min_score, "must be at least 0 and below 1")
        if max_size < 32:
            raise BadValue("max_size", max_size, "must be at least 32 pixels")
        if max_persons < 1:
            raise BadValue("max_persons", max_persons, "must be at least 1")
        self.weights, self.device = weights, device
        self.min_score, self.max_size, self.max_persons = float(min_score), int(max_size), int(max_persons)
        model.roi_heads.score_thresh = self.min_score
        model.roi_heads.detections_per_img = self.max_persons
        # images arrive with their longest edge at max_size: the model's own resize is then a no-op
        model.transform.min_size = (self.max_size,)
        model.transform.max_size = self.max_size
        self.model = model.to(device)

    @classmethod
    def create(cls, weights: str | None = None, random_weights: bool = False, seed: int = 0,
               device: str = "cpu", min_score: float = DEFAULT_MIN_SCORE, max_size: int = DEFAULT_MAX_SIZE,
               max_persons: int = DEFAULT_MAX_PERSONS, progress: bool = True) -> "PoseDetector":
        model, resolved = build_pose_model(weights, random_weights, seed, progress)
        return cls(model, resolved, device, min_score, max_size, max_persons)

    def fingerprint(self) -> str:
        """Identity of everything that changes a detection; progress of another one is discarded."""
        key = {"model": MODEL_NAME, "weights": self.weights.id, "sha256": self.weights.sha256,
               "seed": self.weights.seed if self.weights.kind == "none" else None,
               "min_score": self.min_score, "max_size": self.max_size, "max_persons": self.max_persons,
               "detector_version": _DETECTOR_VERSION}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def detect(self, images: Sequence[Any]) -> list[Detections]:
        """Detect in RGB PIL images; boxes and keypoints come back in each image's own pixels."""
        import torch

        sizes = [img.size for img in images]
        small = [resize_for_detection(img, self.max_size) for img in images]
        tensors = [torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
                   .to(self.device).float().div_(255.0) for im in small]
        with torch.inference_mode():
            outputs = self.model(tensors)
        result = []
        for (w, h), im, out in zip(sizes, small, outputs):
            sx, sy = w / im.size[0], h / im.size[1]
            boxes = out["boxes"].float().cpu().numpy().reshape(-1, 4) * np.array([sx, sy, sx, sy])
            boxes = np.clip(boxes, 0, [w, h, w, h])
            kps = out["keypoints"].float().cpu().numpy().reshape(-1, N_KEYPOINTS, 3)[..., :2] * np.array([sx, sy])
            kps = np.clip(kps, 0, [w, h])
            result.append(Detections(w, h, boxes.astype(np.float32),
                                     out["scores"].float().cpu().numpy().astype(np.float32),
                                     kps.astype(np.float32),
                                     out["keypoints_scores"].float().cpu().numpy().reshape(-1, N_KEYPOINTS)
                                     .astype(np.float32)))
        return result


# --------------------------------------------------------------------------------------------
# progress store


def _key(item: Item) -> tuple[str, int, int]:
    return (item.name, item.size, item.mtime_ns)


class PoseProgress:
    """Finished detections and errors of one detector configuration, in atomically written chunks
    (``chunk-NNNNNN.npz``, no pickle); an image with nobody in it is finished too."""

    def __init__(self, directory: Path, fingerprint: str):
        self.folder = ChunkFolder(directory, fingerprint)
        self.done_images: dict[tuple[str, int, int], Detections] = {}
        self.errors: dict[tuple[str, int, int], str] = {}

    def load(self) -> None:
        self.folder.open(self._read_chunk)

    def _read_chunk(self, z) -> None:
        counts = z["counts"].astype(np.int64)
        ends = np.cumsum(counts)
        if len(ends) and ends[-1] != len(z["scores"]):
            raise ValueError(f"{int(ends[-1])} persons listed, {len(z['scores'])} stored")
        starts = ends - counts
        entries = {}
        for j, key in enumerate(zip(z["names"].tolist(), z["sizes"].tolist(), z["mtimes"].tolist())):
            a, b = int(starts[j]), int(ends[j])
            entries[key] = Detections(int(z["widths"][j]), int(z["heights"][j]), z["boxes"][a:b].reshape(-1, 4),
                                      z["scores"][a:b], z["keypoints"][a:b].reshape(-1, N_KEYPOINTS, 2),
                                      z["logits"][a:b].reshape(-1, N_KEYPOINTS))
        for key, det in entries.items():
            self.done_images[key] = det
            self.errors.pop(key, None)
        for key, msg in zip(zip(z["err_names"].tolist(), z["err_sizes"].tolist(), z["err_mtimes"].tolist()),
                            z["err_msgs"].tolist()):
            self.errors[key] = msg
            self.done_images.pop(key, None)

    def done(self, item: Item) -> bool:
        return _key(item) in self.done_images or _key(item) in self.errors

    def write_chunk(self, found: list[tuple[Item, Detections]], errors: list[tuple[Item, str]]) -> None:
        if not found and not errors:
            return
        self.folder.write(**self._arrays(found, errors))
        for item, det in found:
            self.done_images[_key(item)] = det
        for item, msg in errors:
            self.errors[_key(item)] = msg

    @staticmethod
    def _arrays(found, errors) -> dict[str, np.ndarray]:
        def cat(parts, shape):
            return np.concatenate(parts).astype(np.float32) if parts else np.zeros(shape, np.float32)

        names, sizes, mtimes = key_arrays(it for it, _ in found)
        dets = [d for _, d in found]
        enames, esizes, emtimes = key_arrays(it for it, _ in errors)
        return dict(names=names, sizes=sizes, mtimes=mtimes,
                        widths=np.array([d.width for d in dets], dtype=np.int64),
                        heights=np.array([d.height for d in dets], dtype=np.int64),
                        counts=np.array([len(d) for d in dets], dtype=np.int64),
                        boxes=cat([d.boxes for d in dets], (0, 4)),
                        scores=cat([d.scores for d in dets], (0,)),
                        keypoints=cat([d.keypoints for d in dets], (0, N_KEYPOINTS, 2)),
                        logits=cat([d.logits for d in dets], (0, N_KEYPOINTS)),
                        err_names=enames, err_sizes=esizes, err_mtimes=emtimes,
                        err_msgs=np.array([m for _, m in errors], dtype=str).reshape(-1))

    def compact(self, items: Sequence[Item]) -> None:
        """Rewrite the store as one chunk holding exactly the current items (drops stale entries)."""
        found = [(it, self.done_images[_key(it)]) for it in items if _key(it) in self.done_images]
        errors = [(it, self.errors[_key(it)]) for it in items if _key(it) in self.errors]
        if len(self.folder.chunks()) <= 1 and len(found) + len(errors) == len(self.done_images) + len(self.errors):
            return
        self.folder.replace_all(**self._arrays(found, errors))


# --------------------------------------------------------------------------------------------
# the stage


@dataclass
class PosesConfig:
    data_dir: str = "data"
    images_dir: str | None = None
    weights: str | None = None          # None: torchvision's COCO weights; else a state-dict path
    random_weights: bool = False
    seed: int = 0
    min_score: float = DEFAULT_MIN_SCORE
    max_size: int = DEFAULT_MAX_SIZE
    max_persons: int = DEFAULT_MAX_PERSONS
    batch_size: int = 0                 # 0: auto (CPU_BATCH_SIZE / CUDA_BATCH_SIZE)
    device: str = "auto"
    threads: int = 0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    progress: bool = True
    extra_meta: dict[str, Any] = field(default_factory=dict)


def _decode(item: Item):
    """The image of ``item`` as RGB, or the reason it cannot be read (never raises)."""
    try:
        if item.size < 0:
            raise ImageDecodeError(f"{item.file}: file not found")
        if not is_image_file(item.path):
            raise ImageDecodeError(f"{item.file}: not an image file name (suffix {item.path.suffix!r})")
        if item.size == 0:
            raise ImageDecodeError(f"{item.file}: empty file")
        return load_rgb(item.path), ""
    except ImageDecodeError as exc:
        return None, str(exc).replace(str(item.path), item.file)
    except Exception as exc:  # noqa: BLE001 - one bad image never stops a run
        return None, f"{item.file}: {type(exc).__name__}: {exc}"


def _decoded(items: Sequence[Item], ahead: int) -> Iterator[tuple[Item, Any, str]]:
    """Decode in two threads, at most ``ahead`` images ahead of the consumer, in order."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        queue: deque = deque()
        it = iter(items)
        for item in it:
            queue.append((item, pool.submit(_decode, item)))
            if len(queue) >= ahead:
                break
        while queue:
            item, fut = queue.popleft()
            nxt = next(it, None)
            if nxt is not None:
                queue.append((nxt, pool.submit(_decode, nxt)))
            img, err = fut.result()
            yield item, img, err


def _batches(decoded: Iterable[tuple[Item, Any, str]], size: int):
    batch: list = []
    for entry in decoded:
        batch.append(entry)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _inputs_sha256(items: Sequence[Item], source: str) -> str:
    h = hashlib.sha256(source.encode())
    for it in items:
        h.update(f"\0{it.name}\0{it.size}\0{it.mtime_ns}".encode())
    return h.hexdigest()


def _outputs_current(paths: DataPaths, fingerprint: str, inputs: str) -> bool:
    """The outputs on disk come from this detector, these images and this descriptor, whole."""
    if not (paths.features_meta.exists() and poses_csv(paths).exists() and paths.features_errors.exists()):
        return False
    try:
        meta = artifacts.read_json_object(paths.features_meta)
        if (meta.get("fingerprint") != fingerprint or meta.get("inputs_sha256") != inputs
                or meta.get("descriptor", {}).get("version") != DESCRIPTOR_VERSION):
            return False
        return (array_sha256(artifacts.load_npy(paths.features)) == meta.get("features_sha256")
                and array_sha256(artifacts.load_npy(paths.image_names)) == meta.get("names_sha256"))
    except (OSError, UserError, AttributeError) as exc:
        log.info("rewriting the outputs: %s", exc)
        return False


def _csv_rows(items: Sequence[Item], store: PoseProgress):
    """poses.csv rows, descriptors and names, in item order, persons most confident first."""
    rows, feats, names = [], [], []
    for it in items:
        det = store.done_images.get(_key(it))
        if det is None:
            continue
        kp3 = det.keypoints_with_confidence()
        for p in range(len(det)):
            d = pose_descriptor(kp3[p])
            name = f"{it.name}#{p}"
            row_no = -1
            if d is not None:
                row_no = len(feats)
                feats.append(d)
                names.append(name)
            x0, y0, x1, y1 = (round(float(v), 2) for v in det.boxes[p])
            kps = [round(float(v), 4 if j % 3 == 2 else 2) for j, v in enumerate(kp3[p].reshape(-1))]
            rows.append([it.name, p, name, row_no, round(float(det.scores[p]), 4), x0, y0, x1, y1,
                         det.width, det.height, *kps])
    features = np.stack(feats) if feats else np.zeros((0, DESCRIPTOR_DIM), np.float32)
    return rows, features.astype(np.float32), names


def extract_poses(cfg: PosesConfig) -> dict[str, Any]:
    """Run the stage; return the summary."""
    from tqdm import tqdm

    if cfg.batch_size < 0:
        raise BadValue("batch_size", cfg.batch_size, "must be at least 1, or 0 for auto")
    if cfg.chunk_size < 1:
        raise BadValue("chunk_size", cfg.chunk_size, "must be at least 1")
    paths = DataPaths.of(cfg.data_dir, "poses")
    items = items_from_dir(cfg.images_dir) if cfg.images_dir else items_from_manifest(paths)
    source = f"images-dir:{Path(cfg.images_dir).resolve()}" if cfg.images_dir else "manifest"
    if not items:
        where = f"--images-dir {cfg.images_dir}" if cfg.images_dir else str(paths.manifest)
        raise UserError(f"nothing to detect poses in: {where} lists no images")

    device = resolve_device(cfg.device)
    threads = configure_threads(cfg.threads, device)
    batch_size = cfg.batch_size or (CUDA_BATCH_SIZE if device == "cuda" else CPU_BATCH_SIZE)
    detector = PoseDetector.create(cfg.weights, cfg.random_weights, cfg.seed, device, cfg.min_score,
                                   cfg.max_size, cfg.max_persons, progress=cfg.progress)
    fingerprint = detector.fingerprint()
    store = PoseProgress(paths.features_progress_dir, fingerprint)
    store.load()
    todo = [it for it in items if not store.done(it)]
    reused = len(items) - len(todo)
    log.info("%s: %d image(s), %d already done, %d to detect in with %s (%s, min score %g, longest edge "
             "%d px, at most %d persons) on %s [batch %d, threads %d]", source, len(items), reused, len(todo),
             MODEL_NAME, detector.weights.id, detector.min_score, detector.max_size, detector.max_persons,
             device, batch_size, threads)

    t0 = time.perf_counter()
    detected = 0
    if todo:
        pend_f: list[tuple[Item, Detections]] = []
        pend_e: list[tuple[Item, str]] = []
        bar = tqdm(total=len(todo), unit="img", disable=not cfg.progress, desc="poses", dynamic_ncols=True)
        try:
            for batch in _batches(_decoded(todo, 2 * batch_size + 2), batch_size):
                good = [(it, img) for it, img, _ in batch if img is not None]
                for it, img, err in batch:
                    if img is None:
                        log.warning("skipped %s", err)
                        pend_e.append((it, err))
                if good:
                    for (it, _), det in zip(good, detector.detect([img for _, img in good])):
                        pend_f.append((it, det))
                        detected += 1
                bar.update(len(batch))
                if len(pend_f) + len(pend_e) >= cfg.chunk_size:
                    store.write_chunk(pend_f, pend_e)
                    pend_f, pend_e = [], []
        except KeyboardInterrupt:
            store.write_chunk(pend_f, pend_e)
            raise
        else:
            store.write_chunk(pend_f, pend_e)
        finally:
            bar.close()
    elapsed = time.perf_counter() - t0

    error_rows = [(it.file, store.errors.get(_key(it), "not processed")) for it in items
                  if _key(it) not in store.done_images]
    if len(error_rows) == len(items):
        artifacts.write_csv_for_people(paths.features_errors, ["file", "error"], error_rows)
        raise UserError(f"none of the {len(items)} image(s) could be read; see {paths.features_errors}")

    rows, features, names = _csv_rows(items, store)
    inputs = _inputs_sha256(items, source)
    up_to_date = not todo and _outputs_current(paths, fingerprint, inputs)
    if not up_to_date:
        meta = {"model": MODEL_NAME, "weights": detector.weights.to_meta(),
                "random_weights": detector.weights.kind == "none", "min_score": detector.min_score,
                "max_size": detector.max_size, "max_persons": detector.max_persons,
                "keypoint_names": list(KEYPOINT_NAMES),
                "keypoint_confidence": "logistic(keypoints_scores), keypoints_scores being the peak logit "
                                       "of each keypoint heatmap",
                "descriptor": {"version": DESCRIPTOR_VERSION, "dimension": DESCRIPTOR_DIM,
                               "formula": "w_i (p_i - m) / s, w = confidence, m = weighted centroid, "
                                          "s = weighted RMS distance to m; L2-normalised",
                               "mirroring": "canonical: a pose and its left-right mirror get the same row, "
                                            "the one whose mirror-antisymmetric part has a positive sum of "
                                            "cubes (paintsim.poses.asymmetry)"},
                "device": device, "source": source, "fingerprint": fingerprint, "inputs_sha256": inputs,
                "images": len(items), "persons": len(rows), "degenerate": len(rows) - len(names),
                "images_with_persons": sum(1 for it in items if len(store.done_images.get(_key(it), ())) > 0),
                "errors": len(error_rows), "poses_csv": poses_csv(paths).name, "threads": threads,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "versions": library_versions(), **cfg.extra_meta}
        # poses.csv first, the arrays and the meta (renamed last) after: the meta vouches for both
        artifacts.write_csv_for_people(poses_csv(paths), CSV_HEADER, rows)
        write_embeddings(paths, features, names, meta)
        artifacts.write_csv_for_people(paths.features_errors, ["file", "error"], error_rows)
        store.compact(items)
    else:
        log.info("outputs are up to date: nothing to write")
    if len(names) < 2:
        log.warning("%d pose descriptor(s): neighbours need at least 2 (lower --min-score, or add images)",
                    len(names))

    return {"images": len(items), "detected": detected, "reused": reused, "errors": len(error_rows),
            "persons": len(rows), "poses": len(names), "device": device, "weights": detector.weights.id,
            "random_weights": detector.weights.kind == "none", "min_score": detector.min_score,
            "seconds": round(elapsed, 2),
            "images_per_s": round(len(todo) / elapsed, 2) if todo and elapsed > 0 else None,
            "up_to_date": up_to_date, "poses_csv": str(poses_csv(paths)), "features": str(paths.features)}
