"""The pose descriptor (pure functions): a person's 17 COCO keypoints as one vector, invariant to
translation and scale, weighted by confidence, and the same for a pose and its mirror image (the
rule is docs/poses.md's). Rows are L2-normalised so the one exact kernel ranks poses by cosine."""
from __future__ import annotations

import numpy as np

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
