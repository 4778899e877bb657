"""The backbone registry and weights resolution (torchvision cache, local files, random, offline)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from helpers import run_script
from paintsim.backbones import BACKBONES, build_backbone, get_spec, remove_head, torchvision_weights
from paintsim.errors import UserError


@pytest.mark.parametrize("name", list(BACKBONES))
def test_registry_head_removal_gives_the_documented_dimension(name):
    """Built on the meta device (shapes only, no memory, no weights), each headless model maps its
    weights' input size to a [1, dim] pooled feature, and the removed head is a real module."""
    import torchvision.models as tvm

    spec = get_spec(name)
    crop = torchvision_weights(spec).transforms().crop_size[0]
    with torch.device("meta"):
        model = getattr(tvm, spec.builder)()
        head_keys = [k for k in model.state_dict() if k.startswith(spec.head + ".")]
        assert head_keys, f"{name}: nothing to remove at {spec.head}"
        remove_head(model, spec).eval()
        out = model(torch.empty(1, 3, crop, crop))
    assert tuple(out.shape) == (1, spec.dim)


def test_default_weights_load_through_torchvision_cache(mobilenet_weights):
    model, resolved, tv = build_backbone("mobilenet_v2", "default", progress=False)
    assert resolved.kind == "torchvision" and resolved.id == "MobileNet_V2_Weights.IMAGENET1K_V1"
    assert Path(resolved.path) == mobilenet_weights
    ref = torch.load(mobilenet_weights, map_location="cpu", weights_only=True)
    got = model.state_dict()
    assert torch.equal(got["features.0.0.weight"], ref["features.0.0.weight"])
    assert not any(k.startswith("classifier.") for k in got)


def test_damaged_cached_weights_are_refused(mobilenet_weights, tmp_path, monkeypatch):
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    data = bytearray(mobilenet_weights.read_bytes())
    data[-100] ^= 0xFF
    (ckpt / mobilenet_weights.name).write_bytes(bytes(data))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match="damaged"):
        build_backbone("mobilenet_v2", "default", progress=False)


def test_local_state_dict_round_trips_with_or_without_head(tmp_path):
    model, _, _ = build_backbone("mobilenet_v2", "none", seed=3)
    import torchvision.models as tvm

    full = tvm.mobilenet_v2()
    full.load_state_dict({**full.state_dict(), **model.state_dict()})
    for name, state in [("full.pth", full.state_dict()), ("headless.pth", model.state_dict()),
                        ("wrapped.pth", {"state_dict": model.state_dict(), "epoch": 3})]:
        torch.save(state, tmp_path / name)
        loaded, resolved, _ = build_backbone("mobilenet_v2", str(tmp_path / name))
        assert resolved.kind == "file" and resolved.sha256
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k


def test_local_state_dict_mismatch_names_the_keys(tmp_path):
    model, _, _ = build_backbone("mobilenet_v2", "none")
    state = model.state_dict()
    state.pop("features.0.0.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(UserError, match=r"1 missing key\(s\): features.0.0.weight; 1 unexpected key\(s\): extra"):
        build_backbone("mobilenet_v2", str(tmp_path / "bad.pth"))
    torch.save(state | {"features.0.0.weight": torch.zeros(2, 2)}, tmp_path / "shape.pth")
    with pytest.raises(UserError, match="does not match backbone mobilenet_v2"):
        build_backbone("mobilenet_v2", str(tmp_path / "shape.pth"))


def test_local_file_that_needs_pickle_is_refused(tmp_path):
    torch.save({"weights": Path("x")}, tmp_path / "pickled.pth")
    with pytest.raises(UserError, match="weights_only=True"):
        build_backbone("mobilenet_v2", str(tmp_path / "pickled.pth"))
    with pytest.raises(UserError, match="no such file"):
        build_backbone("mobilenet_v2", str(tmp_path / "missing.pth"))


def test_random_weights_are_seeded_and_say_so(caplog):
    a, ra, _ = build_backbone("mobilenet_v2", "none", seed=1)
    b, _, _ = build_backbone("mobilenet_v2", "none", seed=1)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert ra.kind == "none" and "RANDOM" in ra.to_meta()["warning"]
    assert any("RANDOM weights" in r.getMessage() for r in caplog.records)


def test_unknown_weights_name_lists_the_choices():
    with pytest.raises(UserError, match="IMAGENET1K_V1"):
        build_backbone("mobilenet_v2", "IMAGENET9K")


def test_offline_without_cached_weights_is_one_clear_line(tmp_path):
    """Empty torch cache, no internet: the download fails and the user is told what to fetch and where."""
    torch_home = tmp_path / "torch_home"
    data = tmp_path / "data"
    img = tmp_path / "imgs"
    img.mkdir()
    shutil.copy(next((Path(__file__).parents[1] / "data/sample/images").glob("*.jpg")), img)
    proc = run_script("extract_features.py", "--data-dir", data, "--images-dir", img, "--backbone", "resnet50",
                      "--no-progress", check=False, timeout=120, env={"TORCH_HOME": str(torch_home)})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    url = torchvision_weights(get_spec("resnet50")).url
    fname = url.rsplit("/", 1)[1]
    assert fname in proc.stderr and url in proc.stderr
    assert str(torch_home / "hub" / "checkpoints") in proc.stderr
    assert not (data / "features.npy").exists()
