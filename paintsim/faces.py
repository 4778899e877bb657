"""Faces in paintings: MTCNN detection (facenet-pytorch, whose wheel ships the weights), aligned
crops, and their embeddings, as a resumable stage (``extract_faces.py``).

Detection runs on a copy of each painting scaled so its longest edge is at most ``max_size`` (the
image pyramid is capped there), and images of one size go through MTCNN together as one batch.
Boxes and landmarks are mapped back to the original image's pixels. Each face is cropped with a
margin, turned so the eyes are level when MTCNN found them, and embedded by the collection's own
backbone (``Embedder.for_collection``), or by a face model (InceptionResnetV1 trained on VGGFace2)
when ``face_model = "vggface2"``. Outputs (kind ``faces`` of ``DataPaths``): ``faces.csv``,
``face_features.npy``, ``face_names.npy`` (``<image>#<i>``), ``face_meta.json``,
``faces_errors.csv``; finished images are kept in ``faces_progress/`` so a killed run resumes and a
rerun only looks at new images.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .artifacts import DataPaths
from .errors import BadValue, UserError
from .progress import ChunkFolder, key_arrays

log = logging.getLogger(__name__)

#: Columns of faces.csv: boxes and the five landmarks (eyes, nose, mouth corners) in original pixels.
FACES_COLUMNS = ["image", "face", "x0", "y0", "x1", "y1", "prob",
                 "left_eye_x", "left_eye_y", "right_eye_x", "right_eye_y", "nose_x", "nose_y",
                 "mouth_left_x", "mouth_left_y", "mouth_right_x", "mouth_right_y"]
FACE_MODELS = ("backbone", "vggface2")
#: facenet-pytorch's VGGFace2 weights, as it downloads them into torch's hub cache.
VGGFACE2_FILE = "20180402-114759-vggface2.pt"
VGGFACE2_URL = "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/" + VGGFACE2_FILE
DESCRIPTOR_VERSION = 1


def faces_csv(paths: DataPaths) -> Path:
    return paths.root / "faces.csv"


@dataclass
class Face:
    box: tuple[float, float, float, float]      # x0, y0, x1, y1 in original pixels
    prob: float
    landmarks: np.ndarray | None                # [5, 2] in original pixels, or None


@dataclass
class FaceConfig:
    data_dir: str = "data"
    images_dir: str | None = None
    min_face_size: int = 20
    min_prob: float = 0.9
    max_size: int = 1024
    margin: float = 0.3
    no_align: bool = False
    face_model: str = "backbone"
    weights: str | None = None
    device: str = "auto"
    batch_size: int = 16
    chunk_size: int = 256
    progress: bool = True

    def check(self) -> None:
        if self.min_face_size < 4:
            raise BadValue("min_face_size", self.min_face_size, "must be at least 4 pixels")
        if not 0.0 <= self.min_prob <= 1.0:
            raise BadValue("min_prob", self.min_prob, "must be between 0 and 1")
        if self.max_size < 32:
            raise BadValue("max_size", self.max_size, "must be at least 32 pixels")
        if self.face_model not in FACE_MODELS:
            raise BadValue("face_model", self.face_model, f"must be one of {', '.join(FACE_MODELS)}")


# ------------------------------------------------------------------------------------ detection
class Detector:
    """MTCNN over batches of equal-size images, scaled down to ``max_size`` at most."""

    def __init__(self, min_face_size: int = 20, min_prob: float = 0.9, max_size: int = 1024,
                 device: str = "cpu"):
        from facenet_pytorch import MTCNN

        self.min_face_size, self.min_prob, self.max_size = min_face_size, min_prob, max_size
        self.mtcnn = MTCNN(keep_all=True, min_face_size=min_face_size, device=device, post_process=False,
                           select_largest=False)

    def detect(self, images: Sequence) -> list[list[Face]]:
        """The faces of each PIL image (RGB), boxes and landmarks in that image's own pixels."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        scaled, scales = [], []
        for i, img in enumerate(images):
            w, h = img.size
            s = min(1.0, self.max_size / max(w, h))
            small = img if s == 1.0 else img.resize((max(1, round(w * s)), max(1, round(h * s))))
            scaled.append(small)
            scales.append((w / small.size[0], h / small.size[1]))
            # one batch per scaled size *and* scale: the smallest face asked for is the same for all
            groups[(small.size, round(scales[-1][0], 6))].append(i)
        out: list[list[Face]] = [[] for _ in images]
        for (size, sx), idx in groups.items():
            # the smallest face asked for, in the scaled image's pixels (MTCNN needs at least 12)
            self.mtcnn.min_face_size = max(12, int(round(self.min_face_size / sx)))
            if min(size) < self.mtcnn.min_face_size:  # no face that large fits: MTCNN has no scale to try
                continue
            boxes, probs, points = self.mtcnn.detect([scaled[i] for i in idx], landmarks=True)
            for j, i in enumerate(idx):
                if boxes[j] is None:
                    continue
                fx, fy = scales[i]
                w, h = images[i].size
                for b, p, lm in zip(boxes[j], probs[j], points[j]):
                    if p is None or float(p) < self.min_prob:
                        continue
                    box = (max(0.0, float(b[0]) * fx), max(0.0, float(b[1]) * fy),
                           min(float(w), float(b[2]) * fx), min(float(h), float(b[3]) * fy))
                    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                        continue
                    land = None if lm is None else np.asarray(lm, dtype=np.float64) * [fx, fy]
                    out[i].append(Face(box, float(p), land))
        return out


def crop_face(img, face: Face, margin: float = 0.3, align: bool = True):
    """A square crop around the face, ``margin`` of its size on each side, eyes made level when
    the landmarks are known (the image is turned about the eyes' midpoint first)."""
    x0, y0, x1, y1 = face.box
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    # work on a padded region around the face, not the whole painting (a turn of a 6,000 px
    # painting per face costs seconds); coordinates below are the region's
    pad = side * 1.5
    ox, oy = round((x0 + x1) / 2 - pad), round((y0 + y1) / 2 - pad)
    img = img.crop((ox, oy, ox + round(2 * pad), oy + round(2 * pad)))
    x0, x1, y0, y1 = x0 - ox, x1 - ox, y0 - oy, y1 - oy
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    landmarks = None if face.landmarks is None else face.landmarks - [ox, oy]
    if align and landmarks is not None:
        (lx, ly), (rx, ry) = landmarks[0], landmarks[1]
        angle = math.degrees(math.atan2(ry - ly, rx - lx))
        if abs(angle) > 1.0 and abs(angle) < 60:
            ex, ey = (lx + rx) / 2, (ly + ry) / 2
            img = img.rotate(angle, resample=3, center=(ex, ey))  # 3: bicubic
            # where the box centre went: PIL turns counter-clockwise on screen by ``angle``
            t = math.radians(angle)
            dx, dy = cx - ex, cy - ey
            cx, cy = ex + dx * math.cos(t) + dy * math.sin(t), ey - dx * math.sin(t) + dy * math.cos(t)
    return img.crop((round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2)))


def faces_box(faces: Sequence[Face], margin: float = 0.3, size: tuple[int, int] | None = None):
    """The box around all faces (with ``margin`` of its size), clipped to ``size``; None without faces."""
    if not faces:
        return None
    x0 = min(f.box[0] for f in faces)
    y0 = min(f.box[1] for f in faces)
    x1 = max(f.box[2] for f in faces)
    y1 = max(f.box[3] for f in faces)
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    box = [x0 - mx, y0 - my, x1 + mx, y1 + my]
    if size is not None:
        box = [max(0, box[0]), max(0, box[1]), min(size[0], box[2]), min(size[1], box[3])]
    return tuple(int(round(v)) for v in box)


# ------------------------------------------------------------------------------------ embedding
class VGGFace2:
    """facenet-pytorch's InceptionResnetV1 (VGGFace2): 512-d face embeddings. Its weights are
    downloaded once into torch's hub cache; offline with nothing cached it stops with one line."""

    dim = 512

    def __init__(self, device: str = "cpu", weights: str | None = None):
        import torch
        from facenet_pytorch import InceptionResnetV1

        path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / VGGFACE2_FILE
        if not path.is_file():
            if weights:
                raise UserError(f"--weights {weights}: no such file")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(VGGFACE2_URL, str(path), progress=False)
            except Exception as exc:  # offline, proxy, refused: one line saying what to do
                raise UserError(f"the VGGFace2 face model weights {VGGFACE2_FILE} are not cached and could not be "
                                f"downloaded ({exc}). Download {VGGFACE2_URL} on a machine with internet access and "
                                f"put it in {path.parent}/ (torch.hub.get_dir()/checkpoints; set TORCH_HOME to "
                                "move it), or pass --weights PATH") from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"{path}: not a readable state dict ({exc})") from None
        self.model = InceptionResnetV1(pretrained=None, classify=False).eval()
        state = {k: v for k, v in state.items() if not k.startswith("logits.")}
        self.model.load_state_dict(state)
        self.device = device
        self.model.to(device)
        self.meta = {"kind": "vggface2", "file": path.name,
                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}

    def embed(self, crops: Sequence) -> np.ndarray:
        import torch

        if not crops:
            return np.zeros((0, self.dim), np.float32)
        batch = torch.stack([torch.from_numpy(np.asarray(c.convert("RGB").resize((160, 160)), dtype=np.float32))
                             .permute(2, 0, 1) for c in crops])
        batch = (batch - 127.5) / 128.0  # facenet-pytorch's fixed_image_standardization
        with torch.inference_mode():
            out = self.model(batch.to(self.device)).float().cpu().numpy()
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def make_embedder(cfg: FaceConfig, paths: DataPaths, device: str):
    """(an object with ``.embed(list of PIL) -> [n, D]`` and ``.dim``, what it is, for the meta)."""
    if cfg.face_model == "vggface2":
        model = VGGFace2(device, cfg.weights)
        return model, model.meta
    from .embedder import Embedder
    from .embeddings import Embeddings

    if not paths.features_meta.exists():
        raise UserError(f"{paths.features_meta} is missing: faces are embedded by the collection's backbone, "
                        "so run extract_features.py first (or pass --face-model vggface2)")
    emb = Embeddings.load(paths.root)
    embedder = Embedder.for_collection(emb, device=device, weights=cfg.weights)
    meta = {k: emb.meta.get(k) for k in ("backbone", "weights", "preprocessing")}
    return embedder, dict(meta, kind="backbone", fingerprint=embedder.fingerprint())


# ------------------------------------------------------------------------------------ the stage
@dataclass
class _Done:
    faces: list[Face] = field(default_factory=list)
    feats: np.ndarray | None = None
    error: str = ""


class _Progress:
    """Finished images (their faces and embeddings, or their error) in atomic chunk files."""

    def __init__(self, directory: Path, fingerprint: str, dim: int):
        self.folder = ChunkFolder(directory, fingerprint, dimension=dim)
        self.dim = dim
        self.done: dict[tuple[str, int, int], _Done] = {}

    def load(self) -> None:
        self.folder.open(self._read)

    def _read(self, z) -> None:
        start = 0
        for name, size, mtime, count, err in zip(z["names"].tolist(), z["sizes"].tolist(), z["mtimes"].tolist(),
                                                 z["counts"].tolist(), z["errors"].tolist()):
            sl = slice(start, start + count)
            start += count
            faces = [Face(tuple(map(float, b)), float(p), lm.reshape(5, 2) if np.isfinite(lm).all() else None)
                     for b, p, lm in zip(z["boxes"][sl], z["probs"][sl], z["landmarks"][sl])]
            self.done[(name, size, mtime)] = _Done(faces, z["features"][sl], err)

    def write(self, batch: list[tuple[Any, _Done]]) -> None:
        if not batch:
            return
        faces = [(f, d.feats[i]) for _, d in batch for i, f in enumerate(d.faces)]
        lm = np.array([f.landmarks.reshape(-1) if f.landmarks is not None else np.full(10, np.nan)
                       for f, _ in faces], dtype=np.float64).reshape(-1, 10)
        names, sizes, mtimes = key_arrays(it for it, _ in batch)
        self.folder.write(
            names=names, sizes=sizes, mtimes=mtimes,
            counts=np.array([len(d.faces) for _, d in batch], dtype=np.int64),
            errors=np.array([d.error for _, d in batch], dtype=str).reshape(-1),
            boxes=np.array([f.box for f, _ in faces], dtype=np.float64).reshape(-1, 4),
            probs=np.array([f.prob for f, _ in faces], dtype=np.float64),
            landmarks=lm,
            features=np.stack([v for _, v in faces]).astype(np.float32) if faces
            else np.zeros((0, self.dim), np.float32))
        for it, d in batch:
            self.done[(it.name, it.size, it.mtime_ns)] = d


def write_faces_csv(path: Path, rows: list[tuple[str, int, Face]]) -> None:
    """``faces.csv``, exact (read back by later stages), atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(FACES_COLUMNS)
    for image, i, f in rows:
        lm = f.landmarks.reshape(-1).tolist() if f.landmarks is not None else [""] * 10
        w.writerow([image, i, *(round(v, 2) for v in f.box), round(f.prob, 5),
                    *(round(v, 2) if v != "" else "" for v in lm)])
    from .artifacts import write_text_atomic

    write_text_atomic(path, buf.getvalue())


def read_faces_csv(path: Path) -> dict[str, list[Face]]:
    """``faces.csv`` by image name (faces in their index order); one clear line when damaged."""
    if not path.exists():
        raise UserError(f"{path} does not exist: run extract_faces.py first")
    out: dict[str, list[Face]] = defaultdict(list)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames != FACES_COLUMNS:
                raise ValueError(f"columns {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                lm = [row[c] for c in FACES_COLUMNS[7:]]
                land = np.array(lm, dtype=np.float64).reshape(5, 2) if all(lm) else None
                box = tuple(float(row[c]) for c in ("x0", "y0", "x1", "y1"))
                prob = float(row["prob"])
                if not (all(math.isfinite(v) for v in box) and 0 <= box[0] < box[2] and 0 <= box[1] < box[3]
                        and 0 <= prob <= 1 and (land is None or np.isfinite(land).all())):
                    raise ValueError(f"line {line}: not a face box ({row['x0']}, {row['y0']}, {row['x1']}, "
                                     f"{row['y1']}, prob {row['prob']})")
                if int(row["face"]) != len(out[row["image"]]):
                    raise ValueError(f"line {line}: face {row['face']} of {row['image']} is out of order")
                out[row["image"]].append(Face(box, prob, land))
    except (ValueError, KeyError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path} is damaged ({exc}); rerun extract_faces.py") from None
    return dict(out)


def run_faces(cfg: FaceConfig) -> dict[str, Any]:
    """The whole stage; returns a summary."""
    from tqdm.auto import tqdm

    from .devices import resolve_device
    from .embeddings import write_embeddings
    from .items import items_from_dir, items_from_manifest
    from .images import ImageDecodeError, load_rgb

    cfg.check()
    t0 = time.perf_counter()
    paths = DataPaths.of(cfg.data_dir, "faces")
    device = resolve_device(cfg.device)
    items = items_from_dir(cfg.images_dir) if cfg.images_dir else items_from_manifest(paths)
    if not items:
        raise UserError("no images to look for faces in")
    embedder, model_meta = make_embedder(cfg, paths.of_kind("paintings"), device)
    recipe = {"min_face_size": cfg.min_face_size, "min_prob": cfg.min_prob, "max_size": cfg.max_size,
              "margin": cfg.margin, "align": not cfg.no_align, "model": model_meta, "version": DESCRIPTOR_VERSION}
    fingerprint = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
    store = _Progress(paths.features_progress_dir, fingerprint, int(embedder.dim))
    store.load()
    todo = [it for it in items if (it.name, it.size, it.mtime_ns) not in store.done]
    log.info("%d image(s), %d already done, %d to look at", len(items), len(items) - len(todo), len(todo))
    detector = Detector(cfg.min_face_size, cfg.min_prob, cfg.max_size, device) if todo else None
    pending: list[tuple[Any, _Done]] = []
    bar = tqdm(total=len(todo), desc="faces", unit="img", disable=not cfg.progress)
    for start in range(0, len(todo), cfg.batch_size):
        batch = todo[start:start + cfg.batch_size]
        imgs, ok = [], []
        for it in batch:
            try:
                imgs.append(load_rgb(it.path))
                ok.append(it)
            except (ImageDecodeError, OSError) as exc:
                pending.append((it, _Done(error=str(exc).replace(f"{it.path}: ", ""),
                                          feats=np.zeros((0, embedder.dim), np.float32))))
        try:
            found = detector.detect(imgs) if imgs else []
        except (ValueError, RuntimeError) as exc:  # one odd image must not stop the run: look alone
            found = []
            for it, img in zip(list(ok), list(imgs)):
                try:
                    found.append(detector.detect([img])[0])
                except (ValueError, RuntimeError) as one:
                    pending.append((it, _Done(error=f"face detection failed: {one}",
                                              feats=np.zeros((0, embedder.dim), np.float32))))
                    i = ok.index(it)
                    ok.pop(i)
                    imgs.pop(i)
            log.debug("batch detection failed (%s): images looked at one by one", exc)
        crops = [crop_face(img, f, cfg.margin, not cfg.no_align) for img, faces in zip(imgs, found) for f in faces]
        vecs = np.asarray(embedder.embed(crops), dtype=np.float32) if crops else np.zeros((0, embedder.dim), np.float32)
        at = 0
        for it, faces in zip(ok, found):
            rows_ = vecs[at:at + len(faces)]
            good = np.isfinite(rows_).all(axis=1) & (np.abs(rows_).sum(axis=1) > 0)
            if not good.all():
                log.warning("%s: %d face(s) gave a degenerate embedding and are left out", it.file, int((~good).sum()))
            pending.append((it, _Done([f for f, g in zip(faces, good) if g], rows_[good])))
            at += len(faces)
        bar.update(len(batch))
        if len(pending) >= cfg.chunk_size:
            store.write(pending)
            pending = []
    store.write(pending)
    bar.close()

    rows, feats, names, errors = [], [], [], []
    with_faces = 0
    for it in items:
        d = store.done[(it.name, it.size, it.mtime_ns)]
        if d.error:
            errors.append((it.file, d.error))
            continue
        with_faces += bool(d.faces)
        for i, f in enumerate(d.faces):
            rows.append((it.name, i, f))
            feats.append(d.feats[i])
            names.append(f"{it.name}#{i}")
    write_faces_csv(faces_csv(paths), rows)
    from .artifacts import write_csv_for_people

    write_csv_for_people(paths.features_errors, ["file", "error"], errors)
    source = f"images-dir:{Path(cfg.images_dir).resolve()}" if cfg.images_dir else "manifest"
    meta = {"model": model_meta, "detector": {"name": "MTCNN (facenet-pytorch)", "min_face_size": cfg.min_face_size,
                                               "min_prob": cfg.min_prob, "max_size": cfg.max_size},
            "crop": {"margin": cfg.margin, "align": not cfg.no_align}, "fingerprint": fingerprint,
            "source": source, "images": len(items), "images_with_faces": with_faces, "device": device,
            "config": asdict(cfg)}
    if feats:
        write_embeddings(paths, np.stack(feats), names, meta)
    else:
        log.warning("no faces found in %d images: no face_features.npy written", len(items))
        for stale in (paths.features_meta, paths.features, paths.image_names):  # an earlier run's faces
            stale.unlink(missing_ok=True)
    return {"images": len(items), "processed": len(todo), "faces": len(rows), "images_with_faces": with_faces,
            "unreadable": len(errors), "seconds": time.perf_counter() - t0, "csv": faces_csv(paths),
            "features": paths.features if feats else None}
