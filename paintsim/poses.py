"""Stage 3c, poses: the people a painting shows, their 17 COCO keypoints, one descriptor each.

Detection is torchvision's Keypoint R-CNN (:mod:`paintsim.pose_model`): a box, a score and 17
keypoints per person. Every person scoring above ``min_score`` becomes a row of ``poses.csv`` (box
and keypoints in the image's own pixels) and, unless its keypoints are degenerate, a row of
``pose_features.npy``: the descriptor of :mod:`paintsim.pose_descriptor`, L2-normalised float32 so
the project's one exact kernel (cosine = dot product, :mod:`paintsim.knn`) ranks poses as it ranks
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
from .devices import configure_threads, resolve_device
from .embedder import library_versions
from .embeddings import array_sha256, write_embeddings
from .errors import BadValue, UserError
from .items import Item, items_from_dir, items_from_manifest
from .images import ImageDecodeError, is_image_file, load_rgb
from .pose_descriptor import DESCRIPTOR_DIM, DESCRIPTOR_VERSION, KEYPOINT_NAMES, N_KEYPOINTS, pose_descriptor
from .pose_model import (DEFAULT_MAX_PERSONS, DEFAULT_MAX_SIZE, DEFAULT_MIN_SCORE, MODEL_NAME, Detections,
                         PoseDetector)
from .progress import ChunkFolder, key_arrays

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 64
#: Auto batch sizes: images of different shapes are padded to one batch, which buys nothing on a CPU.
CPU_BATCH_SIZE = 1
CUDA_BATCH_SIZE = 8

_KP_COLUMNS = [f"{name}_{part}" for name in KEYPOINT_NAMES for part in ("x", "y", "conf")]
#: The columns of poses.csv.
CSV_HEADER = ["image", "person", "name", "feature_row", "score", "box_x0", "box_y0", "box_x1",
              "box_y1", "image_width", "image_height", *_KP_COLUMNS]


def poses_csv(data_dir: str | os.PathLike[str] | DataPaths) -> Path:
    """``<data-dir>/poses.csv``: every detected person, box and keypoints in original pixels."""
    root = data_dir.root if isinstance(data_dir, DataPaths) else Path(data_dir)
    return root / "poses.csv"




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
                                            "cubes (paintsim.pose_descriptor.asymmetry)"},
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
