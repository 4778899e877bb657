"""The pose detector: torchvision's Keypoint R-CNN (``keypointrcnn_resnet50_fpn``), its weights
resolved like the backbones' (torchvision's cache, a local state dict with strict keys, or seeded
random weights for plumbing), and batched detection on images resized to a bounded size."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .backbones import ResolvedWeights, _unwrap_state_dict, ensure_cached, sha256_file
from .errors import BadValue, UserError
from .pose_descriptor import N_KEYPOINTS, keypoint_confidence

log = logging.getLogger(__name__)

MODEL_NAME = "keypointrcnn_resnet50_fpn"
WEIGHTS_ENUM = "KeypointRCNN_ResNet50_FPN_Weights"

DEFAULT_MIN_SCORE = 0.8
DEFAULT_MAX_SIZE = 800
DEFAULT_MAX_PERSONS = 20
#: Version of what the detection stores (changes discard the progress of older runs).
_DETECTOR_VERSION = 1



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
