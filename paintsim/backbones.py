"""The registry of torchvision backbones and how their weights are found.

Each backbone is a torchvision classification model whose classification layer is replaced by
``nn.Identity``, so its output is the pooled penultimate feature (2048 numbers for resnet50).

Weights are resolved in one place, with three sources:

* a torchvision weights enum (the default, e.g. ``ResNet50_Weights.IMAGENET1K_V2``): the file is
  downloaded once into torchvision's cache (``torch.hub.get_dir()/checkpoints``, i.e.
  ``$TORCH_HOME/hub/checkpoints``) with torchvision's hash check, then loaded by torchvision's own
  model builder. The cached file's hash prefix is checked again on every load. Offline with nothing
  cached, a :class:`~paintsim.errors.UserError` names the file, its URL and the directory to put it in.
* a local state-dict file (``--weights PATH``): ``torch.load(weights_only=True)``, keys matched
  strictly against the headless model (head entries, of any class count, are dropped first).
* ``none``: random initialisation (seeded), for tests only; a loud warning, and it is recorded.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import UserError

log = logging.getLogger("paintsim.backbones")

#: Seconds a stalled socket may wait while downloading weights (per read, not for the whole file).
DOWNLOAD_TIMEOUT_S = 30.0

#: torch.hub's convention: the file name carries the first hex digits of its sha256.
_HASH_RE = re.compile(r"-([a-f0-9]*)\.")


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry: how to build the model and where its classification head is."""

    name: str
    builder: str            # function in torchvision.models
    weights_enum: str       # weights enum class in torchvision.models
    default_weights: str    # member of that enum used by default
    head: str               # dotted attribute path of the classification layer replaced by Identity
    dim: int                # embedding dimension (pooled penultimate feature)
    note: str = ""

    @property
    def default_weights_id(self) -> str:
        return f"{self.weights_enum}.{self.default_weights}"


BACKBONES: dict[str, BackboneSpec] = {s.name: s for s in [
    BackboneSpec("resnet50", "resnet50", "ResNet50_Weights", "IMAGENET1K_V2", "fc", 2048),
    BackboneSpec("resnet101", "resnet101", "ResNet101_Weights", "IMAGENET1K_V2", "fc", 2048),
    BackboneSpec("resnet152", "resnet152", "ResNet152_Weights", "IMAGENET1K_V2", "fc", 2048),
    BackboneSpec("vgg16", "vgg16", "VGG16_Weights", "IMAGENET1K_V1", "classifier.6", 4096,
                 "fc7 activations (after ReLU)"),
    BackboneSpec("densenet121", "densenet121", "DenseNet121_Weights", "IMAGENET1K_V1", "classifier", 1024),
    BackboneSpec("efficientnet_b3", "efficientnet_b3", "EfficientNet_B3_Weights", "IMAGENET1K_V1",
                 "classifier", 1536, "input 300 px"),
    BackboneSpec("convnext_base", "convnext_base", "ConvNeXt_Base_Weights", "IMAGENET1K_V1",
                 "classifier.2", 1024, "pooled and layer-normalised"),
    BackboneSpec("vit_b_16", "vit_b_16", "ViT_B_16_Weights", "IMAGENET1K_V1", "heads", 768,
                 "class token"),
    BackboneSpec("mobilenet_v2", "mobilenet_v2", "MobileNet_V2_Weights", "IMAGENET1K_V1", "classifier", 1280,
                 "the offline demo's backbone"),
]}

DEFAULT_BACKBONE = "resnet50"


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UserError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}") from None


@dataclass
class ResolvedWeights:
    """Where a model's weights came from, in a form that goes into features_meta.json."""

    kind: str                       # "torchvision" | "file" | "none"
    id: str                         # e.g. "ResNet50_Weights.IMAGENET1K_V2", "file:my.pth", "none"
    transforms_from: str            # the torchvision weights whose preprocessing is used
    url: str | None = None
    path: str | None = None
    sha256: str | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_meta(self) -> dict[str, Any]:
        meta = {"kind": self.kind, "id": self.id, "transforms_from": self.transforms_from}
        for key in ("url", "path", "sha256", "seed"):
            value = getattr(self, key)
            if value is not None:
                meta[key] = value
        if self.kind == "none":
            meta["warning"] = "RANDOM WEIGHTS: embeddings are meaningless (tests only)"
        return meta


def torchvision_weights(spec: BackboneSpec, member: str | None = None):
    """The torchvision weights enum member for ``spec`` (its default when ``member`` is None)."""
    import torchvision.models as tvm

    enum = getattr(tvm, spec.weights_enum)
    name = member or spec.default_weights
    if "." in name:
        cls_name, name = name.split(".", 1)
        if cls_name != spec.weights_enum:
            raise UserError(f"weights {cls_name}.{name} do not belong to backbone {spec.name} "
                            f"(expected {spec.weights_enum}.*)")
    try:
        return enum[name]
    except KeyError:
        raise UserError(f"unknown weights {name!r} for {spec.name}; choose from "
                        f"{', '.join(m.name for m in enum)}, a state-dict path, or 'none'") from None


def checkpoints_dir() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_weights_path(url: str) -> Path:
    return checkpoints_dir() / os.path.basename(urlparse(url).path)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def ensure_cached(url: str, weights_id: str, progress: bool = True) -> Path:
    """Make sure torchvision's cache holds the file at ``url`` with the right hash; return its path.

    Downloads it (torch.hub's downloader with the hash-prefix check) when absent. Any failure is
    a :class:`UserError` that says what to fetch and where to put it.
    """
    import torch.hub

    dst = cached_weights_path(url)
    match = _HASH_RE.search(dst.name)
    hash_prefix = match.group(1) if match else None
    how_to = (f"Download {url} on a machine with internet access and put the file {dst.name} in "
              f"{dst.parent}/ (torch.hub.get_dir()/checkpoints; set TORCH_HOME to move it), "
              "or pass --weights PATH to a local state dict")
    if not dst.exists():
        log.info("downloading %s weights from %s to %s", weights_id, url, dst.parent)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                torch.hub.download_url_to_file(url, str(dst), hash_prefix, progress=progress)
        except RuntimeError as exc:  # torch.hub's hash mismatch
            raise UserError(f"the {weights_id} weights downloaded from {url} failed the hash check "
                            f"({exc}); nothing was cached. {how_to}.") from None
        except (OSError, ValueError) as exc:  # URLError, timeouts, DNS, HTTP errors, disk errors
            raise UserError(f"the {weights_id} weights file {dst.name} is not cached and could not be "
                            f"downloaded ({exc}). {how_to}.") from None
    elif hash_prefix:
        digest = sha256_file(dst)
        if not digest.startswith(hash_prefix):
            raise UserError(f"the cached weights file {dst} is damaged (sha256 {digest[:12]}... does not "
                            f"start with {hash_prefix}); delete it so it is downloaded again. {how_to}.")
    return dst


def _set_attr_path(module, path: str, value) -> None:
    parts = path.split(".")
    parent = module
    for part in parts[:-1]:
        parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
    last = parts[-1]
    if last.isdigit():
        parent[int(last)] = value
    else:
        setattr(parent, last, value)


def remove_head(model, spec: BackboneSpec):
    """Replace the classification layer by ``nn.Identity`` (in place) and return the model."""
    import torch.nn as nn

    _set_attr_path(model, spec.head, nn.Identity())
    return model


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Any]:
    import torch

    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if obj and all(isinstance(k, str) for k in obj) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise UserError(f"{path} is not a state dict (a mapping of parameter names to tensors)")


def load_local_state_dict(model, spec: BackboneSpec, path: Path) -> None:
    """Load ``path`` into the headless ``model``: strict keys, head entries dropped, clear errors."""
    import torch

    if not path.is_file():
        raise UserError(f"--weights {path}: no such file (give a state-dict file, a torchvision weights "
                        f"name such as {spec.default_weights}, 'default', or 'none')")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any file at all may be named here; every failure is the user's
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--weights {path}: cannot be loaded as a plain state dict with "
                        f"weights_only=True ({first})") from None
    state = _unwrap_state_dict(obj, path)
    head_prefix = spec.head + "."
    state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {show(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {show(unexpected)}")
        raise UserError(f"--weights {path} does not match backbone {spec.name}: " + "; ".join(parts)
                        + " (is it a checkpoint of another architecture?)")
    bad_shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if tuple(state[k].shape) != tuple(v.shape)]
    if bad_shapes:
        raise UserError(f"--weights {path} does not match backbone {spec.name}: shape mismatch in "
                        f"{len(bad_shapes)} tensor(s), e.g. {bad_shapes[0]}")
    model.load_state_dict(state, strict=True)


def build_backbone(name: str, weights: str | None = "default", progress: bool = True,
                   seed: int = 0):
    """Build ``name`` headless, in eval mode, with resolved weights.

    ``weights``: ``"default"``/``None`` (the registry's torchvision weights), a member name of the
    backbone's weights enum (``IMAGENET1K_V1`` or ``ResNet50_Weights.IMAGENET1K_V1``), a path to a
    local state dict, or ``"none"`` for seeded random weights.
    Returns ``(model, ResolvedWeights, torchvision_weights_for_transforms)``.
    """
    import torch
    import torchvision.models as tvm

    spec = get_spec(name)
    builder = getattr(tvm, spec.builder)
    choice = "default" if weights in (None, "", "default") else str(weights)

    if choice.lower() == "none":
        tv_weights = torchvision_weights(spec)
        log.warning("!!! --weights none: %s has RANDOM weights (seed %d); the embeddings are "
                    "meaningless and only fit for tests !!!", spec.name, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = builder(weights=None)
        resolved = ResolvedWeights("none", "none", str(tv_weights), seed=seed)
    elif _looks_like_path(choice):
        tv_weights = torchvision_weights(spec)
        path = Path(choice).expanduser()
        model = remove_head(builder(weights=None), spec)
        load_local_state_dict(model, spec, path)
        resolved = ResolvedWeights("file", f"file:{path.name}", str(tv_weights), path=str(path.resolve()),
                                   sha256=sha256_file(path))
        return model.eval(), resolved, tv_weights
    else:
        tv_weights = torchvision_weights(spec, None if choice == "default" else choice)
        weights_id = f"{spec.weights_enum}.{tv_weights.name}"
        cached = ensure_cached(tv_weights.url, weights_id, progress=progress)
        try:
            model = builder(weights=tv_weights, progress=progress)
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"the cached weights file {cached} could not be loaded ({first}); delete it "
                            "so it is downloaded again") from None
        resolved = ResolvedWeights("torchvision", weights_id, weights_id, url=tv_weights.url,
                                   path=str(cached), sha256=None)
    return remove_head(model, spec).eval(), resolved, tv_weights


def _looks_like_path(choice: str) -> bool:
    return (os.sep in choice or choice.startswith(".") or choice.startswith("~")
            or choice.endswith((".pth", ".pt", ".bin", ".ckpt")) or Path(choice).exists())
