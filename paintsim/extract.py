"""Stage 3: one L2-normalised embedding per painting from a torchvision backbone.

Pieces, in the order data flows through them:

* :class:`Preprocessing` - the weights' own transform (resize, centre crop) or a letterbox of the
  whole painting, producing a ``uint8 [3, S, S]`` tensor. It runs in DataLoader workers; the cheap
  float conversion and normalisation run on the compute device (``uint8`` crosses process and
  PCIe boundaries at a quarter of the float size).
* :class:`Embedder` - model + preprocessing + device/precision, also rebuilt by later stages from
  ``features_meta.json`` (:meth:`Embedder.from_meta`) so a query image is embedded exactly like the
  collection was.
* :func:`extract_features` - the resumable batch run: items come from the manifest (status ok) or
  a folder; finished work is kept in chunk files under ``features_progress/`` (written atomically
  at batch boundaries), so a killed run resumes and gives the same arrays as an uninterrupted one,
  and a rerun after new downloads only embeds the new images.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from paintsim import artifacts
from paintsim.artifacts import DataPaths, atomic_path, save_npy_atomic, write_json_atomic
from paintsim.backbones import (DEFAULT_BACKBONE, BackboneSpec, ResolvedWeights, build_backbone,
                                get_spec)
from paintsim.cli import UserError, resolve_device
from paintsim.images import ImageDecodeError, is_image_file, load_rgb

log = logging.getLogger("paintsim.extract")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PREPROCESS_MODES = ("center-crop", "letterbox")
#: Default number of images per progress chunk (rounded up to whole batches).
DEFAULT_CHUNK_SIZE = 512
#: Auto batch sizes: on the CPU small batches keep activations in cache (measured fastest at 4-8,
#: see the README, Stage 3); a GPU wants large ones.
CPU_BATCH_SIZE = 8
CUDA_BATCH_SIZE = 64
META_VERSION = 1


# --------------------------------------------------------------------------------------------
# preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """The exact image -> uint8 tensor transform, recorded in features_meta.json."""

    mode: str                       # "center-crop" (the weights' transform) or "letterbox"
    resize_size: int                # shorter side before the centre crop (center-crop mode)
    crop_size: int                  # the model's square input side
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str              # "bilinear" | "bicubic" | "nearest"

    @classmethod
    def from_weights(cls, tv_weights, letterbox: bool = False) -> "Preprocessing":
        t = tv_weights.transforms()
        return cls(mode="letterbox" if letterbox else "center-crop",
                   resize_size=int(t.resize_size[0]), crop_size=int(t.crop_size[0]),
                   mean=tuple(float(m) for m in t.mean), std=tuple(float(s) for s in t.std),
                   interpolation=t.interpolation.value)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "Preprocessing":
        try:
            p = cls(mode=meta["mode"], resize_size=int(meta["resize_size"]), crop_size=int(meta["crop_size"]),
                    mean=tuple(map(float, meta["mean"])), std=tuple(map(float, meta["std"])),
                    interpolation=str(meta["interpolation"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"features_meta.json: malformed 'preprocessing' entry ({exc!r})") from None
        if p.mode not in PREPROCESS_MODES:
            raise UserError(f"features_meta.json: unknown preprocessing mode {p.mode!r}")
        return p

    def to_meta(self) -> dict[str, Any]:
        meta = {"mode": self.mode, "resize_size": self.resize_size, "crop_size": self.crop_size,
                "mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation}
        if self.mode == "letterbox":
            meta["fill_rgb"] = list(self.fill)
        return meta

    @property
    def fill(self) -> tuple[int, int, int]:
        """Letterbox padding: the normalisation mean, i.e. zero after normalising."""
        return tuple(int(round(m * 255)) for m in self.mean)  # type: ignore[return-value]

    def __call__(self, img) -> "torch.Tensor":  # noqa: F821
        import torchvision.transforms.functional as F
        from torchvision.transforms import InterpolationMode

        interp = InterpolationMode(self.interpolation)
        if img.mode != "RGB":
            img = img.convert("RGB")
        if self.mode == "center-crop":
            img = F.resize(img, [self.resize_size], interpolation=interp, antialias=True)
            img = F.center_crop(img, [self.crop_size])
        else:
            from PIL import Image

            w, h = img.size
            scale = self.crop_size / max(w, h)
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
            img = F.resize(img, [nh, nw], interpolation=interp, antialias=True)
            canvas = Image.new("RGB", (self.crop_size, self.crop_size), self.fill)
            canvas.paste(img, ((self.crop_size - nw) // 2, (self.crop_size - nh) // 2))
            img = canvas
        return F.pil_to_tensor(img)


# --------------------------------------------------------------------------------------------
# the model


def library_versions() -> dict[str, str]:
    import PIL
    import torch
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__, "pillow": PIL.__version__}


def resolve_precision(precision: str, device: str) -> str:
    import torch

    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device == "cpu":
        raise UserError("--precision fp16 is for GPUs; on the CPU use fp32 (fastest measured) or bf16")
    return precision


class Embedder:
    """A headless backbone plus its exact preprocessing: PIL images in, unit vectors out."""

    def __init__(self, model, spec: BackboneSpec, weights: ResolvedWeights, preprocessing: Preprocessing,
                 device: str = "cpu", precision: str = "fp32", channels_last: bool | None = None,
                 batch_size: int = 32):
        import torch

        self.spec = spec
        self.weights = weights
        self.preprocessing = preprocessing
        self.device = torch.device(device)
        self.precision = precision
        # channels_last: on for CUDA (tensor cores) and on the CPU (oneDNN's fast path: measured
        # up to 1.8x over contiguous NCHW on the benchmark CPU, see the README, Stage 3)
        self.channels_last = True if channels_last is None else bool(channels_last)
        self.batch_size = batch_size
        self.model = model.to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._mean = torch.tensor(preprocessing.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._inv_std = 1.0 / (torch.tensor(preprocessing.std, device=self.device).view(1, 3, 1, 1) * 255.0)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    # construction ----------------------------------------------------------------------------
    @classmethod
    def create(cls, backbone: str = DEFAULT_BACKBONE, weights: str | None = "default", no_crop: bool = False,
               device: str = "auto", precision: str = "auto", channels_last: bool | None = None,
               seed: int = 0, batch_size: int = 32, progress: bool = True) -> "Embedder":
        dev = resolve_device(device)
        prec = resolve_precision(precision, dev)
        spec = get_spec(backbone)
        model, resolved, tv_weights = build_backbone(spec.name, weights, progress=progress, seed=seed)
        pre = Preprocessing.from_weights(tv_weights, letterbox=no_crop)
        return cls(model, spec, resolved, pre, dev, prec, channels_last, batch_size)

    @classmethod
    def from_meta(cls, meta: dict, device: str = "auto", weights: str | None = None) -> "Embedder":
        """Rebuild the model and preprocessing recorded in ``features_meta.json``.

        ``weights`` overrides where the weights are read from (needed when the features were made
        from a local file that has since moved); by default the recorded source is used with the
        same resolution rules as extraction (torchvision cache + download, the recorded file, or
        seeded random weights).
        """
        try:
            backbone = meta["backbone"]
            wmeta = meta["weights"]
            kind = wmeta["kind"]
        except (KeyError, TypeError):
            raise UserError("features_meta.json lacks 'backbone'/'weights': rerun extract_features.py") from None
        seed = int(wmeta.get("seed", meta.get("seed", 0)) or 0)
        if weights is None:
            if kind == "torchvision":
                weights = wmeta["id"]
            elif kind == "none":
                weights = "none"
            else:
                weights = wmeta.get("path")
                if not weights or not Path(weights).is_file():
                    raise UserError(f"the features were made with the local weights file {wmeta.get('path')}, "
                                    "which is no longer there; pass its new location (weights=...)")
        dev = resolve_device(device)
        recorded_prec = meta.get("precision", "fp32")
        prec = recorded_prec if (dev == "cuda" or recorded_prec in ("fp32", "bf16")) else "fp32"
        if prec != recorded_prec:
            log.warning("features were computed with %s on %s; embedding with %s on %s (tiny differences)",
                        recorded_prec, meta.get("device"), prec, dev)
        spec = get_spec(backbone)
        model, resolved, _ = build_backbone(spec.name, weights, progress=True, seed=seed)
        if kind == "file" and wmeta.get("sha256") and resolved.sha256 != wmeta["sha256"]:
            raise UserError(f"weights file {resolved.path} differs from the one the features were made "
                            f"with (sha256 {str(resolved.sha256)[:12]}... vs {wmeta['sha256'][:12]}...)")
        pre = Preprocessing.from_meta(meta["preprocessing"])
        channels_last = meta.get("channels_last") if dev == meta.get("device") else None
        emb = cls(model, spec, resolved, pre, dev, prec, channels_last, int(meta.get("batch_size", 32)))
        if emb.dim != int(meta.get("dimension", emb.dim)):
            raise UserError(f"features_meta.json says dimension {meta.get('dimension')} but {backbone} "
                            f"gives {emb.dim}")
        return emb

    # properties ------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def meta(self) -> dict[str, Any]:
        """What features_meta.json records about this embedder (without counts)."""
        return {"backbone": self.spec.name, "weights": self.weights.to_meta(),
                "random_weights": self.weights.kind == "none",
                "preprocessing": self.preprocessing.to_meta(), "dimension": self.dim,
                "precision": self.precision, "device": self.device.type,
                "channels_last": self.channels_last, "batch_size": self.batch_size,
                "versions": library_versions()}

    def fingerprint(self) -> str:
        """Identity of everything that changes an embedding; progress of another config is discarded."""
        key = {"backbone": self.spec.name, "weights": self.weights.id, "sha256": self.weights.sha256,
               "seed": self.weights.seed if self.weights.kind == "none" else None,
               "preprocessing": self.preprocessing.to_meta(), "precision": self.precision,
               "meta_version": META_VERSION}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    # inference -------------------------------------------------------------------------------
    def preprocess(self, img) -> "torch.Tensor":  # noqa: F821
        return self.preprocessing(img)

    def _autocast(self):
        import contextlib

        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def embed_uint8(self, batch: "torch.Tensor") -> np.ndarray:  # noqa: F821
        """Embed a ``uint8 [B, 3, S, S]`` batch; rows L2-normalised float32 (NaN row if degenerate)."""
        import torch

        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x = (x.float() - self._mean) * self._inv_std
            with self._autocast():
                out = self.model(x)
            out = out.float().flatten(1)
            norms = torch.linalg.vector_norm(out, dim=1, keepdim=True)
            out = out / norms
            return out.cpu().numpy().astype(np.float32, copy=False)

    def embed(self, images: Sequence) -> np.ndarray:
        """Embed PIL images exactly as extraction does: float32 ``[n, D]``, rows L2-normalised."""
        import torch

        rows = [self.embed_uint8(torch.stack([self.preprocess(im) for im in images[i:i + self.batch_size]]))
                for i in range(0, len(images), self.batch_size)]
        return np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32)


# --------------------------------------------------------------------------------------------
# what to extract


@dataclass(frozen=True)
class Item:
    name: str        # the file name, unique in one run; goes into image_names.npy
    file: str        # as reported in features_errors.csv (manifest's relative path, or the file name)
    path: Path
    size: int        # -1 when the file is missing
    mtime_ns: int


def _stat_item(name: str, file: str, path: Path) -> Item:
    try:
        st = path.stat()
        return Item(name, file, path, int(st.st_size), int(st.st_mtime_ns))
    except OSError:
        return Item(name, file, path, -1, 0)


def items_from_manifest(paths: DataPaths) -> list[Item]:
    """The manifest's rows with status ok, in manifest order; paths confined to the data dir."""
    try:
        df = artifacts.read_manifest(paths.manifest)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    root = paths.root.resolve()
    items: list[Item] = []
    seen: set[str] = set()
    for row_no, (file, status) in enumerate(zip(df["file"], df["status"]), start=2):
        if status != "ok":
            continue
        rel = Path(file)
        full = (paths.root / rel).resolve()
        if not file or rel.is_absolute() or ".." in rel.parts or root not in full.parents:
            raise UserError(f"{paths.manifest} line {row_no}: file {file!r} is not a path inside {paths.root}")
        name = rel.name
        if name in seen:
            log.warning("%s line %d: %s listed twice; using the first row", paths.manifest, row_no, name)
            continue
        seen.add(name)
        items.append(_stat_item(name, file, paths.root / rel))
    return items


def items_from_dir(images_dir: str | os.PathLike[str]) -> list[Item]:
    """Every regular, non-hidden file of ``images_dir`` (not recursive), sorted by name."""
    d = Path(images_dir)
    if not d.is_dir():
        raise UserError(f"--images-dir {d}: not a directory")
    return [_stat_item(p.name, p.name, p) for p in sorted(d.iterdir(), key=lambda p: p.name)
            if not p.name.startswith(".") and p.is_file()]


class ImageDataset:
    """Decode (bounded) and preprocess one item; failures come back as a reason, not an exception."""

    def __init__(self, items: Sequence[Item], preprocessing: Preprocessing):
        self.items = list(items)
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            if item.size < 0:
                raise ImageDecodeError(f"{item.file}: file not found")
            if not is_image_file(item.path):
                raise ImageDecodeError(f"{item.file}: not an image file name (suffix {item.path.suffix!r})")
            if item.size == 0:
                raise ImageDecodeError(f"{item.file}: empty file")
            with item.path.open("rb") as fh:
                head = fh.read(64).lstrip().lower()
            if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"{")):
                raise ImageDecodeError(f"{item.file}: HTML/XML/JSON, not an image")
            return i, self.preprocessing(load_rgb(item.path)), ""
        except ImageDecodeError as exc:
            return i, None, str(exc).replace(str(item.path), item.file)
        except Exception as exc:  # noqa: BLE001 - one bad image never stops a run
            return i, None, f"{item.file}: {type(exc).__name__}: {exc}"


def collate(samples):
    import torch

    ok = [(i, x) for i, x, _ in samples if x is not None]
    errors = [(i, e) for i, x, e in samples if x is None]
    idx = [i for i, _ in ok]
    batch = torch.stack([x for _, x in ok]) if ok else None
    return idx, batch, errors


# --------------------------------------------------------------------------------------------
# progress store


class ProgressStore:
    """Finished embeddings and errors, in atomically written chunk files of one configuration."""

    def __init__(self, directory: Path, fingerprint: str, dim: int):
        self.dir = directory
        self.fingerprint = fingerprint
        self.dim = dim
        self.features: dict[tuple[str, int, int], np.ndarray] = {}
        self.errors: dict[tuple[str, int, int], str] = {}
        self._next = 0

    def load(self) -> None:
        cfg_path = self.dir / "config.json"
        if self.dir.exists():
            cfg = None
            try:
                cfg = artifacts.read_json(cfg_path)
            except (OSError, ValueError):
                pass
            if not cfg or cfg.get("fingerprint") != self.fingerprint:
                stale = sorted(self.dir.glob("chunk-*.npz"))
                if stale:
                    log.info("discarding %d progress chunk(s) of another configuration in %s", len(stale), self.dir)
                for p in stale:
                    p.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cfg_path, {"fingerprint": self.fingerprint, "dimension": self.dim})
        for path in sorted(self.dir.glob("chunk-*.npz")):
            try:
                self._next = max(self._next, int(path.stem.split("-")[1]) + 1)
                with np.load(path, allow_pickle=False) as z:
                    feats = z["features"]
                    if feats.ndim != 2 or feats.shape[1] != self.dim:
                        raise ValueError(f"features of shape {feats.shape}")
                    for key, row in zip(zip(z["names"].tolist(), z["sizes"].tolist(), z["mtimes"].tolist()), feats):
                        self.features[key] = row
                        self.errors.pop(key, None)
                    for key, msg in zip(zip(z["err_names"].tolist(), z["err_sizes"].tolist(),
                                            z["err_mtimes"].tolist()), z["err_msgs"].tolist()):
                        self.errors[key] = msg
                        self.features.pop(key, None)
            except (OSError, ValueError, KeyError, IndexError) as exc:
                log.warning("ignoring unreadable progress chunk %s (%s)", path, exc)

    def done(self, item: Item) -> bool:
        key = (item.name, item.size, item.mtime_ns)
        return key in self.features or key in self.errors

    def write_chunk(self, feats: list[tuple[Item, np.ndarray]], errors: list[tuple[Item, str]]) -> None:
        if not feats and not errors:
            return
        path = self.dir / f"chunk-{self._next:06d}.npz"
        self._next += 1
        self._save(path, feats, errors)
        for item, row in feats:
            self.features[(item.name, item.size, item.mtime_ns)] = row
        for item, msg in errors:
            self.errors[(item.name, item.size, item.mtime_ns)] = msg

    def _save(self, path: Path, feats, errors) -> None:
        def key_arrays(pairs):
            return (np.array([it.name for it, _ in pairs], dtype=str).reshape(-1),
                    np.array([it.size for it, _ in pairs], dtype=np.int64),
                    np.array([it.mtime_ns for it, _ in pairs], dtype=np.int64))

        names, sizes, mtimes = key_arrays(feats)
        enames, esizes, emtimes = key_arrays(errors)
        features = (np.stack([r for _, r in feats]).astype(np.float32) if feats
                    else np.zeros((0, self.dim), np.float32))
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, names=names, sizes=sizes, mtimes=mtimes, features=features,
                         err_names=enames, err_sizes=esizes, err_mtimes=emtimes,
                         err_msgs=np.array([m for _, m in errors], dtype=str).reshape(-1))
                fh.flush()
                os.fsync(fh.fileno())

    def compact(self, items: Sequence[Item]) -> None:
        """Rewrite the store as one chunk holding exactly the current items (drops stale entries)."""
        feats = [(it, self.features[(it.name, it.size, it.mtime_ns)]) for it in items
                 if (it.name, it.size, it.mtime_ns) in self.features]
        errors = [(it, self.errors[(it.name, it.size, it.mtime_ns)]) for it in items
                  if (it.name, it.size, it.mtime_ns) in self.errors]
        old = sorted(self.dir.glob("chunk-*.npz"))
        if len(old) <= 1 and len(feats) + len(errors) == len(self.features) + len(self.errors):
            return
        path = self.dir / f"chunk-{self._next:06d}.npz"
        self._next += 1
        self._save(path, feats, errors)
        for p in old:
            p.unlink()


# --------------------------------------------------------------------------------------------
# the stage


@dataclass
class ExtractConfig:
    data_dir: str = "data"
    images_dir: str | None = None
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = "default"
    no_crop: bool = False
    batch_size: int = 0             # 0: auto (CPU_BATCH_SIZE / CUDA_BATCH_SIZE)
    workers: int = -1               # -1: auto (1 on the CPU, min(8, cores) on CUDA)
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None
    threads: int = 0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    seed: int = 0
    progress: bool = True
    extra_meta: dict[str, Any] = field(default_factory=dict)


def configure_threads(threads: int, device: str) -> int:
    """Set torch's intra-op threads (0 = all cores on the CPU); return the number used."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    elif device == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    return torch.get_num_threads()


def _write_errors_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["file", "error"])
    writer.writerows(rows)
    artifacts.write_text_atomic(path, buf.getvalue())


def _outputs_current(paths: DataPaths, fingerprint: str, names: list[str]) -> bool:
    try:
        meta = artifacts.read_json(paths.features_meta)
        if meta.get("fingerprint") != fingerprint or meta.get("count") != len(names):
            return False
        stored = artifacts.load_npy(paths.image_names)
        feats = artifacts.load_npy(paths.features, mmap=True)
        return stored.tolist() == names and feats.shape[0] == len(names)
    except (OSError, ValueError):
        return False


def extract_features(cfg: ExtractConfig) -> dict[str, Any]:
    """Run the stage; return the summary (also logged)."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    if cfg.batch_size < 0:
        raise UserError(f"--batch-size must be at least 1, or 0 for auto (got {cfg.batch_size})")
    if cfg.workers < -1:
        raise UserError(f"--workers must be 0 or more, or -1 for auto (got {cfg.workers})")
    if cfg.chunk_size < 1:
        raise UserError(f"--chunk-size must be at least 1 (got {cfg.chunk_size})")
    paths = DataPaths.of(cfg.data_dir)
    items = items_from_dir(cfg.images_dir) if cfg.images_dir else items_from_manifest(paths)
    source = f"images-dir:{Path(cfg.images_dir).resolve()}" if cfg.images_dir else "manifest"
    if not items:
        raise UserError(f"nothing to extract: {'--images-dir ' + str(cfg.images_dir) if cfg.images_dir else str(paths.manifest)} "
                        "lists no images")

    device = resolve_device(cfg.device)
    threads = configure_threads(cfg.threads, device)
    batch_size = cfg.batch_size or (CUDA_BATCH_SIZE if device == "cuda" else CPU_BATCH_SIZE)
    workers = cfg.workers if cfg.workers >= 0 else (min(8, os.cpu_count() or 1) if device == "cuda" else 1)
    emb = Embedder.create(cfg.backbone, cfg.weights, cfg.no_crop, device, cfg.precision, cfg.channels_last,
                          cfg.seed, batch_size, progress=cfg.progress)
    fingerprint = emb.fingerprint()
    store = ProgressStore(paths.features_progress_dir, fingerprint, emb.dim)
    store.load()
    todo = [it for it in items if not store.done(it)]
    reused = len(items) - len(todo)
    log.info("%s: %d image(s), %d already done, %d to embed with %s (%s, %s, %s, %d-dim) on %s "
             "[batch %d, workers %d, threads %d, channels_last %s]", source, len(items), reused, len(todo),
             emb.spec.name, emb.weights.id, emb.preprocessing.mode, emb.precision, emb.dim, device,
             batch_size, workers, threads, emb.channels_last)

    t0 = time.perf_counter()
    embedded = 0
    if todo:
        loader = DataLoader(ImageDataset(todo, emb.preprocessing), batch_size=batch_size, shuffle=False,
                            num_workers=workers, collate_fn=collate, pin_memory=(device == "cuda"),
                            prefetch_factor=4 if workers > 0 else None, persistent_workers=False)
        pend_f: list[tuple[Item, np.ndarray]] = []
        pend_e: list[tuple[Item, str]] = []
        bar = tqdm(total=len(todo), unit="img", disable=not cfg.progress, desc="embedding", dynamic_ncols=True)
        try:
            for idx, batch, errors in loader:
                for i, msg in errors:
                    log.warning("skipped %s", msg)
                    pend_e.append((todo[i], msg))
                if batch is not None:
                    out = emb.embed_uint8(batch)
                    for i, row in zip(idx, out):
                        if not np.all(np.isfinite(row)):
                            msg = f"{todo[i].file}: the model produced a degenerate (zero or non-finite) embedding"
                            log.warning("skipped %s", msg)
                            pend_e.append((todo[i], msg))
                        else:
                            pend_f.append((todo[i], row))
                            embedded += 1
                bar.update(len(idx) + len(errors))
                if len(pend_f) + len(pend_e) >= cfg.chunk_size:
                    store.write_chunk(pend_f, pend_e)
                    pend_f, pend_e = [], []
        except KeyboardInterrupt:
            store.write_chunk(pend_f, pend_e)  # whole batches only, so a resume stays batch-aligned
            raise
        else:
            store.write_chunk(pend_f, pend_e)
        finally:
            bar.close()
    elapsed = time.perf_counter() - t0

    names: list[str] = []
    rows: list[np.ndarray] = []
    error_rows: list[tuple[str, str]] = []
    for it in items:
        key = (it.name, it.size, it.mtime_ns)
        if key in store.features:
            names.append(it.name)
            rows.append(store.features[key])
        else:
            error_rows.append((it.file, store.errors.get(key, "not processed")))
    if not rows:
        _write_errors_csv(paths.features_errors, error_rows)
        raise UserError(f"none of the {len(items)} image(s) could be read; see {paths.features_errors}")

    if todo or not _outputs_current(paths, fingerprint, names):
        # the meta is the "done" marker: remove it first, so arrays and meta never disagree
        paths.features_meta.unlink(missing_ok=True)
        features = np.ascontiguousarray(np.stack(rows).astype(np.float32, copy=False))
        save_npy_atomic(paths.features, features)
        save_npy_atomic(paths.image_names, np.array(names, dtype=str))
        _write_errors_csv(paths.features_errors, error_rows)
        meta = emb.meta
        meta.update({"count": len(names), "errors": len(error_rows), "source": source,
                     "fingerprint": fingerprint, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "meta_version": META_VERSION, "threads": threads, "workers": workers, **cfg.extra_meta})
        write_json_atomic(paths.features_meta, meta)  # written last: the "done" marker
        store.compact(items)
        up_to_date = False
    else:
        log.info("outputs are up to date: nothing to write")
        up_to_date = True

    summary = {"images": len(items), "embedded": embedded, "reused": reused, "errors": len(error_rows),
               "rows": len(names), "dimension": emb.dim, "backbone": emb.spec.name, "weights": emb.weights.id,
               "preprocessing": emb.preprocessing.mode, "device": device, "seconds": round(elapsed, 2),
               "images_per_s": round(len(todo) / elapsed, 1) if todo and elapsed > 0 else None,
               "up_to_date": up_to_date, "features": str(paths.features)}
    return summary
