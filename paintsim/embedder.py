"""Turn any painting image into one row exactly as the collection's extraction stage did.

* :class:`Preprocessing` - the weights' own transform (resize, centre crop) or a letterbox of the
  whole painting, producing a ``uint8 [3, S, S]`` tensor. It runs in DataLoader workers; the cheap
  float conversion and normalisation run on the compute device (``uint8`` crosses process and
  PCIe boundaries at a quarter of the float size).
* :class:`Embedder` - model + preprocessing + device/precision. The extraction stage creates one
  (:meth:`Embedder.create`); queries, perturbed copies and face crops rebuild the same one from
  ``features_meta.json`` (:meth:`Embedder.for_collection`), so an outside image lands in the same
  space as the collection's rows.
"""
from __future__ import annotations

import hashlib
import json
import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .backbones import DEFAULT_BACKBONE, BackboneSpec, ResolvedWeights, build_backbone, get_spec
from .devices import resolve_device
from .errors import BadValue, UserError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PREPROCESS_MODES = ("center-crop", "letterbox")
META_VERSION = 1


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

        from .images import check_aspect, to_rgb

        interp = InterpolationMode(self.interpolation)
        check_aspect(*img.size, source="image")
        img = to_rgb(img)
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
        raise BadValue("precision", precision, f"choose from {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device == "cpu":
        raise BadValue("precision", precision, "fp16 is for GPUs; on the CPU use fp32 (fastest measured) or bf16")
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
        # up to 1.8x over contiguous NCHW on the benchmark CPU, see docs/performance.md)
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
    def from_meta(cls, meta: dict, device: str = "auto", weights: str | None = None,
                  data_dir: str | Path | None = None) -> "Embedder":
        """Rebuild the model and preprocessing recorded in ``features_meta.json``.

        ``weights`` overrides where the weights are read from (needed when the features were made
        from a local file that has since moved); by default the recorded source is used with the
        same resolution rules as extraction (torchvision cache + download, the recorded file, or
        seeded random weights).

        A meta with ``fusion`` (several backbones, ``extract_features.py --backbone a,b``) gives a
        :class:`paintsim.fusion.FusedEmbedder` with the same interface (``weights`` then one value
        per model, comma-separated); its PCA, if any, is read from ``data_dir/features_pca.npz``.
        """
        if isinstance(meta, dict) and "fusion" in meta:
            from .fusion import FusedEmbedder

            return FusedEmbedder.from_meta(meta, device=device, weights=weights, data_dir=data_dir)  # type: ignore[return-value]
        try:
            backbone = meta["backbone"]
            wmeta = meta["weights"]
            kind = wmeta["kind"]
            seed = int(wmeta.get("seed", meta.get("seed", 0)) or 0)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise UserError("features_meta.json lacks 'backbone'/'weights': rerun extract_features.py") from None
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
        if not isinstance(meta.get("preprocessing"), dict):
            raise UserError("features_meta.json lacks 'preprocessing': rerun extract_features.py")
        pre = Preprocessing.from_meta(meta["preprocessing"])
        channels_last = meta.get("channels_last") if dev == meta.get("device") else None
        emb = cls(model, spec, resolved, pre, dev, prec, channels_last, int(meta.get("batch_size", 32)))
        if emb.dim != int(meta.get("dimension", emb.dim)):
            raise UserError(f"features_meta.json says dimension {meta.get('dimension')} but {backbone} "
                            f"gives {emb.dim}")
        return emb

    @classmethod
    def for_collection(cls, emb, device: str = "auto", weights: str | None = None) -> "Embedder":
        """The embedder that made ``emb`` (an ``Embeddings``), checked to give rows of its dimension
        (a :class:`paintsim.fusion.FusedEmbedder` for fused features, with the PCA beside them)."""
        if not emb.meta:
            raise UserError(f"{emb.paths.features_meta} is missing: it records the backbone, weights and "
                            "preprocessing needed to embed an image like the collection; rerun "
                            "extract_features.py")
        embedder = cls.from_meta(emb.meta, device=device, weights=weights, data_dir=emb.paths.root)
        if embedder.dim != emb.dim:
            raise UserError(f"the embedder gives {embedder.dim} features but {emb.paths.features} has "
                            f"{emb.dim}: features_meta.json does not describe features.npy")
        return embedder

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
