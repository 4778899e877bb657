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


#: ``--precision auto`` on the CPU takes bf16 autocast only where the probe times this model's own
#: forward at least this much faster than float32 (and the backbone passed the quality gate,
#: :mod:`paintsim.bf16_gate`). Why 1.2 and not the similarity kernel's 1.5: the kernel's bf16
#: path adds a candidate pass and exact rescoring that must be paid for, while here the bf16 forward
#: simply replaces the float32 one, so the whole measured gain passes through (less the decoding,
#: which both share). The margin above 1.0 covers the probe's noise on a shared machine (the same
#: measurement varies 10-15 % between minutes; the probe interleaves the two and keeps the best of
#: two) and pays for what bf16 costs: rows no longer bit-identical to a float32 run's. Below ~1.2
#: the end-to-end gain after decoding would be under ~1.1x, not worth it. Measured on the 2-vCPU
#: Sapphire Rapids (AMX) development machine: ResNet50 ~2.4x, MobileNetV2 ~1.8x; on an AVX2-only
#: CPU bf16 is several times slower, far below the line.
CPU_BF16_MIN_SPEEDUP = 1.2
#: images per forward of the speed probe (the CPU's default extraction batch)
PROBE_BATCH = 8
#: How ``bf16`` runs the model (recorded as ``bf16_recipe`` and part of the fingerprint): batch norm
#: folded into the preceding convolutions (``torch.fx`` conv-bn fusion, exact in float32) and the
#: first convolution kept in float32, the rest under bf16 autocast. Plain autocast rounds every
#: convolution's output to bf16 and then batch norm's output again, and feeds the raw image to the
#: first convolution in bf16: on the sample with the real MobileNetV2 weights its top-10 tables
#: overlapped float32's by only 0.935 (rows' cosine to float32 0.9971), under the quality gate's
#: 0.95; folded, with the first convolution in float32, 0.967 (cosine 0.9990). Features recorded
#: with plain autocast (no ``bf16_recipe`` in their meta) are embedded with plain autocast.
BF16_RECIPE = "bn-folded,first-conv-fp32"
PLAIN_AUTOCAST = "autocast"


def bf16_model(model):
    """:data:`BF16_RECIPE` applied to a copy of ``model`` (eval mode): conv + batch norm folded,
    the first convolution wrapped to run in float32 under autocast."""
    import torch
    from torch.fx.experimental.optimization import fuse

    class _Float32(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self.inner(x.float())

    folded = fuse(model.eval(), inplace=False)
    for node in folded.graph.nodes:
        if node.op == "call_module" and isinstance(folded.get_submodule(node.target), torch.nn.Conv2d):
            parent, _, name = node.target.rpartition(".")
            owner = folded.get_submodule(parent) if parent else folded
            setattr(owner, name, _Float32(folded.get_submodule(node.target)))
            break
    return folded


def resolve_precision(precision: str, device: str) -> str:
    """The precision to run for a requested one, without measuring: ``auto`` is bf16 (fp16 where
    bf16 is unsupported) on CUDA and fp32 on the CPU (:meth:`Embedder.create` refines the CPU's
    auto by the probe and the gate, :func:`choose_cpu_auto`)."""
    import torch

    if precision not in PRECISIONS:
        raise BadValue("precision", precision, f"choose from {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device == "cpu":
        raise BadValue("precision", precision, "fp16 is for GPUs; on the CPU use fp32 or bf16")
    return precision


def explain_fixed(requested: str, resolved: str, device: str) -> dict[str, Any]:
    """features_meta.json's ``precision_choice`` for every case but the CPU's auto."""
    if requested == "auto":
        why = ("auto on CUDA: bf16 autocast" if resolved == "bf16"
               else "auto on CUDA: fp16 autocast (this GPU does not support bf16)")
    else:
        why = f"forced: --precision {requested}"
    return {"requested": requested, "resolved": resolved, "reason": why}


def choose_cpu_auto(backbone: str, speed_probe) -> tuple[str, dict[str, Any]]:
    """``--precision auto`` on the CPU: bf16 when ``backbone`` passed the bf16 quality gate and
    ``speed_probe()`` (a :func:`paintsim.precision.probe_model` record, run only then) shows bf16
    at least :data:`CPU_BF16_MIN_SPEEDUP` x faster; else fp32. Returns (precision, the choice as
    features_meta.json records it)."""
    from . import bf16_gate

    gate = bf16_gate.verdict(backbone)
    choice: dict[str, Any] = {"requested": "auto", "gate": gate, "threshold": CPU_BF16_MIN_SPEEDUP}
    if not gate["passed"]:
        choice.update(resolved="fp32", reason=f"auto on the CPU: fp32, {backbone} has not passed the bf16 "
                                              f"quality gate ({gate['status']}); the speed probe was not run")
        return "fp32", choice
    rec = speed_probe()
    choice["probe"] = rec
    speedup = float(rec["speedup"])
    fast = speedup >= CPU_BF16_MIN_SPEEDUP
    resolved = "bf16" if fast else "fp32"
    via = f" of {gate['measured_on']}" if gate.get("measured_on") != backbone else ""
    choice.update(resolved=resolved, reason=(
        f"auto on the CPU: {resolved}, bf16 autocast {'is' if fast else 'is not'} at least "
        f"{CPU_BF16_MIN_SPEEDUP}x faster for this model (speedup {speedup:g}, {rec.get('source', '')}); "
        f"the bf16 quality gate{via} passed"))
    return resolved, choice


class Embedder:
    """A headless backbone plus its exact preprocessing: PIL images in, unit vectors out."""

    def __init__(self, model, spec: BackboneSpec, weights: ResolvedWeights, preprocessing: Preprocessing,
                 device: str = "cpu", precision: str = "fp32", channels_last: bool | None = None,
                 batch_size: int = 32, bf16_recipe: str = BF16_RECIPE):
        import torch

        self.precision_choice: dict[str, Any] | None = None   # how create() chose it (the meta records it)
        if bf16_recipe not in (BF16_RECIPE, PLAIN_AUTOCAST):
            raise UserError(f"unknown bf16 recipe {bf16_recipe!r} (this version knows {BF16_RECIPE!r} and "
                            f"{PLAIN_AUTOCAST!r}); rerun extract_features.py")
        self.bf16_recipe = bf16_recipe
        self._bf16_model = None        # built on first use in bf16 (bf16_model)
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
        emb = cls(model, spec, resolved, pre, dev, prec, channels_last, batch_size)
        if precision == "auto" and dev == "cpu":
            emb.precision, emb.precision_choice = choose_cpu_auto(spec.name, emb.probe_speed)
            if emb.precision != "bf16":
                emb._bf16_model = None     # the probe's copy
        else:
            emb.precision_choice = explain_fixed(precision, prec, dev)
        return emb

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
        recipe = str(meta.get("bf16_recipe", PLAIN_AUTOCAST)) if prec == "bf16" else BF16_RECIPE
        emb = cls(model, spec, resolved, pre, dev, prec, channels_last, int(meta.get("batch_size", 32)),
                  bf16_recipe=recipe)
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
        meta = {"backbone": self.spec.name, "weights": self.weights.to_meta(),
                "random_weights": self.weights.kind == "none",
                "preprocessing": self.preprocessing.to_meta(), "dimension": self.dim,
                "precision": self.precision}
        if self.precision == "bf16":
            meta["bf16_recipe"] = self.bf16_recipe
        if self.precision_choice is not None:
            meta["precision_choice"] = self.precision_choice
        meta.update({"device": self.device.type, "channels_last": self.channels_last,
                     "batch_size": self.batch_size, "versions": library_versions()})
        return meta

    def fingerprint(self, precision: str | None = None) -> str:
        """Identity of everything that changes an embedding; progress of another config is discarded.
        ``precision``: the fingerprint this embedder would have in that precision."""
        key = {"backbone": self.spec.name, "weights": self.weights.id, "sha256": self.weights.sha256,
               "seed": self.weights.seed if self.weights.kind == "none" else None,
               "preprocessing": self.preprocessing.to_meta(), "precision": precision or self.precision,
               "meta_version": META_VERSION}
        if key["precision"] == "bf16" and self.bf16_recipe != PLAIN_AUTOCAST:
            key["bf16_recipe"] = self.bf16_recipe   # rows of plain autocast are not these rows
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def probe_speed(self, refresh: bool = False) -> dict[str, Any]:
        """bf16 autocast over float32 speed of this embedder's own forward (normalise + model + L2, a
        batch of :data:`PROBE_BATCH` at its input size, in its memory layout), measured once per
        machine and cached (:func:`paintsim.precision.probe_model`)."""
        import torch

        from . import precision as probes

        s = self.preprocessing.crop_size
        name = (f"{self.spec.name}@{s}px,batch{PROBE_BATCH},"
                f"{'channels_last' if self.channels_last else 'nchw'}")
        x = torch.randint(0, 256, (PROBE_BATCH, 3, s, s), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))

        def run(prec: str) -> None:
            old = self.precision
            self.precision = prec
            try:
                self.embed_uint8(x)
            finally:
                self.precision = old

        return probes.probe_model(name, run, self.device.type, images=PROBE_BATCH, refresh=refresh)

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

    def _forward_model(self):
        """The module that runs in the current precision: :data:`BF16_RECIPE`'s copy for bf16."""
        import torch

        if self.precision != "bf16" or self.bf16_recipe == PLAIN_AUTOCAST:
            return self.model
        if self._bf16_model is None:
            m = bf16_model(self.model).to(self.device)
            if self.channels_last:
                m = m.to(memory_format=torch.channels_last)
            self._bf16_model = m
        return self._bf16_model

    def embed_uint8(self, batch: "torch.Tensor") -> np.ndarray:  # noqa: F821
        """Embed a ``uint8 [B, 3, S, S]`` batch; rows L2-normalised float32 (NaN row if degenerate)."""
        import torch

        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x = (x.float() - self._mean) * self._inv_std
            model = self._forward_model()
            with self._autocast():
                out = model(x)
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
