from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

# Tests never touch the user's torch cache: a repository-local one holds the offline weights.
os.environ.setdefault("TORCH_HOME", str(REPO / ".cache" / "torch"))
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    """torchvision's real MobileNetV2 ImageNet checkpoint, placed in the torch cache."""
    import install_offline_weights

    return install_offline_weights.install()
