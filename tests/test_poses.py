"""Poses: the descriptor on hand-built skeletons, and extract_poses.py for real with random weights."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, SAMPLE_IMAGES, copy_sample_images, kill_when_chunks, run_script
from paintsim import artifacts
from paintsim.embeddings import Embeddings
from paintsim.errors import UserError
from paintsim.knn import search
from paintsim.pose_descriptor import FLIP, KEYPOINT_NAMES, asymmetry, descriptors, mirror_keypoints, pose_descriptor
from paintsim.pose_model import build_pose_model
from paintsim.poses import CSV_HEADER, PosesConfig, extract_poses, poses_csv

#: Small and few: Keypoint R-CNN costs about half a second per 128-px image on 2 CPU cores.
FAST = ["--random-weights", "--min-score", "0", "--max-size", "128", "--max-persons", "3", "--no-progress"]

# ------------------------------------------------------------------------------ hand-built skeletons
# A person facing the viewer, y downward, in made-up pixel units; the person's left is the image's right.
BASE = {"nose": (0, -60), "left_eye": (4, -64), "right_eye": (-4, -64), "left_ear": (8, -61),
        "right_ear": (-8, -61), "left_shoulder": (20, -40), "right_shoulder": (-20, -40),
        "left_elbow": (24, -15), "right_elbow": (-24, -15), "left_wrist": (26, 10), "right_wrist": (-26, 10),
        "left_hip": (12, 10), "right_hip": (-12, 10), "left_knee": (13, 45), "right_knee": (-13, 45),
        "left_ankle": (14, 80), "right_ankle": (-14, 80)}


def skeleton(conf: float = 1.0, **moved) -> np.ndarray:
    pts = {**BASE, **moved}
    return np.array([[*pts[name], conf] for name in KEYPOINT_NAMES], dtype=np.float64)


def rotated(kp: np.ndarray, degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    out = kp.copy()
    out[:, :2] = kp[:, :2] @ np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]).T
    return out


SKELETONS = {
    "standing": skeleton(),
    "arms_up": skeleton(left_elbow=(28, -65), right_elbow=(-28, -65), left_wrist=(30, -92), right_wrist=(-30, -92)),
    "t_pose": skeleton(left_elbow=(45, -40), right_elbow=(-45, -40), left_wrist=(70, -40), right_wrist=(-70, -40)),
    "right_arm_raised": skeleton(right_elbow=(-26, -65), right_wrist=(-28, -92)),
    "pointing": skeleton(right_elbow=(-45, -42), right_wrist=(-70, -44)),
    "praying": skeleton(left_elbow=(18, -18), right_elbow=(-18, -18), left_wrist=(2, -30), right_wrist=(-2, -30)),
    "seated": skeleton(left_knee=(16, 12), right_knee=(-16, 12), left_ankle=(16, 48), right_ankle=(-16, 48),
                       left_wrist=(14, 8), right_wrist=(-14, 8)),
    "kneeling": skeleton(left_knee=(14, 40), right_knee=(-14, 40), left_ankle=(16, 42), right_ankle=(-16, 42),
                         left_hip=(12, 8), right_hip=(-12, 8)),
    "striding_in_profile": skeleton(nose=(8, -60), left_eye=(6, -64), right_eye=(6, -64), left_ear=(-4, -61),
                                    right_ear=(-4, -61), left_shoulder=(2, -40), right_shoulder=(-2, -40),
                                    left_elbow=(10, -15), right_elbow=(-8, -15), left_wrist=(14, 8),
                                    right_wrist=(-12, 8), left_hip=(1, 10), right_hip=(-1, 10),
                                    left_knee=(16, 44), right_knee=(-10, 44), left_ankle=(26, 78),
                                    right_ankle=(-22, 76)),
    "bowing": skeleton(nose=(0, -20), left_eye=(4, -23), right_eye=(-4, -23), left_ear=(8, -24),
                       right_ear=(-8, -24), left_shoulder=(20, -20), right_shoulder=(-20, -20),
                       left_elbow=(22, 0), right_elbow=(-22, 0), left_wrist=(20, 20), right_wrist=(-20, 20)),
    "reclining": rotated(skeleton(), 90),
}


def documented_vector(kp: np.ndarray) -> np.ndarray:
    """docs/poses.md's formula, written out again: v_i = w_i (p_i - m) / s, L2-normalised."""
    w = np.clip(kp[:, 2], 0, 1)
    m = (w[:, None] * kp[:, :2]).sum(0) / w.sum()
    s = np.sqrt((w * ((kp[:, :2] - m) ** 2).sum(1)).sum() / w.sum())
    v = (w[:, None] * (kp[:, :2] - m) / s).reshape(-1)
    return v / np.linalg.norm(v)


def test_a_shifted_scaled_rotated_skeleton_finds_its_original_first():
    names = list(SKELETONS)
    bank, kept = descriptors(np.stack([SKELETONS[n] for n in names]))
    assert kept.tolist() == list(range(len(names))) and bank.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(bank, axis=1), 1.0, atol=1e-6)
    for i, name in enumerate(names):
        moved = SKELETONS[name].copy()
        moved[:, :2] = moved[:, :2] * 3.7 + [512.0, -40.0]
        np.testing.assert_allclose(pose_descriptor(moved), bank[i], atol=1e-6)  # exactly invariant
        for degrees in (-10, 5, 8):
            query = rotated(moved, degrees)
            index, score = search(pose_descriptor(query)[None], bank, k=2)
            assert index[0, 0] == i, (name, degrees, names[index[0, 0]], score)
            assert score[0, 0] > 0.98 and score[0, 0] > score[0, 1]


def test_low_confidence_keypoints_weigh_less():
    pose = SKELETONS["standing"]
    d = pose_descriptor(pose)
    sims = {}
    for conf in (1.0, 0.3, 0.05):
        odd = pose.copy()
        odd[9] = [140.0, -150.0, conf]   # the left wrist flung far up and out
        sims[conf] = float(pose_descriptor(odd) @ d)
    assert sims[1.0] < sims[0.3] < sims[0.05]
    assert sims[1.0] < 0.8 and sims[0.05] > 0.97
    # a wild keypoint of low confidence does not stop a pose finding its own kind
    bank, _ = descriptors(np.stack(list(SKELETONS.values())))
    odd = SKELETONS["t_pose"].copy()
    odd[16] = [-300.0, 250.0, 0.05]
    assert search(pose_descriptor(odd)[None], bank, k=1)[0][0, 0] == list(SKELETONS).index("t_pose")
    # confidence is a weight, not a gate: scaling every confidence alike changes nothing
    np.testing.assert_allclose(pose_descriptor(np.c_[pose[:, :2], np.full(17, 0.4)]), d, atol=1e-6)


def test_a_pose_and_its_mirror_share_one_descriptor_stored_by_the_documented_rule():
    assert sorted(FLIP) == list(range(17)) and all(FLIP[FLIP[i]] == i for i in range(17))
    for name, pose in SKELETONS.items():
        flipped = mirror_keypoints(pose)
        flipped[:, 0] += 900.0          # the same figure in a left-right flipped picture 900 px wide
        np.testing.assert_allclose(pose_descriptor(flipped), pose_descriptor(pose), atol=1e-6, err_msg=name)
        assert asymmetry(flipped) == pytest.approx(-asymmetry(pose), abs=1e-9)
    # the rule: of a pose and its mirror, the one stored is the one with positive asymmetry (here
    # the raised right arm: its left keypoints lie lower than their right partners, y downward)
    right = SKELETONS["right_arm_raised"]
    left = mirror_keypoints(right)
    assert asymmetry(left) < -1e-3 < 1e-3 < asymmetry(right)
    assert float(documented_vector(right) @ documented_vector(left)) < 0.9   # they do differ unmirrored
    np.testing.assert_allclose(pose_descriptor(right), documented_vector(right), atol=1e-6)
    np.testing.assert_allclose(pose_descriptor(left), documented_vector(right), atol=1e-6)
    # mirroring is not relabelling: swapping left and right without flipping x is another pose
    swapped = right[list(FLIP)]
    assert float(pose_descriptor(swapped) @ pose_descriptor(right)) < 0.9


def test_degenerate_and_malformed_poses():
    one_point = np.zeros((17, 3))
    one_point[:, :2] = [50, 60]
    one_point[:, 2] = 1
    assert pose_descriptor(one_point) is None
    assert pose_descriptor(skeleton(conf=0.0)) is None
    feats, kept = descriptors(np.stack([one_point, SKELETONS["arms_up"]]))
    assert feats.shape == (1, 34) and kept.tolist() == [1]
    with pytest.raises(ValueError, match="shape"):
        pose_descriptor(np.zeros((18, 3)))
    bad = skeleton()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pose_descriptor(bad)


# ------------------------------------------------------------------------------------- the stage
def test_detections_come_back_in_each_images_own_pixels():
    """A flat colour looks the same at any size once resized to --max-size, so the persons the
    (random) model finds in it at 200 x 150 and at 400 x 300 px must be the same, at twice the
    coordinates: boxes and keypoints are mapped back, not left at the detector's 128 px."""
    from paintsim.pose_model import PoseDetector

    det = PoseDetector.create(random_weights=True, device="cpu", min_score=0.0, max_size=128, max_persons=3)
    small, large = det.detect([Image.new("RGB", size, (120, 90, 60)) for size in [(200, 150), (400, 300)]])
    assert len(small) == len(large) > 0 and (small.width, small.height, large.width) == (200, 150, 400)
    np.testing.assert_allclose(large.scores, small.scores, atol=1e-6)
    np.testing.assert_allclose(large.boxes, 2 * small.boxes, atol=1e-3)
    np.testing.assert_allclose(large.keypoints, 2 * small.keypoints, atol=1e-3)
    assert small.boxes.max() > 128 and np.all(small.boxes <= [200, 150, 200, 150])
    kp = small.keypoints_with_confidence()
    assert kp.shape == (len(small), 17, 3) and np.all((kp[..., 2] > 0) & (kp[..., 2] < 1))


def read_poses(data: Path) -> list[dict[str, str]]:
    with open(poses_csv(data), newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == CSV_HEADER
        return list(reader)


def test_stage_writes_poses_in_original_pixels_and_a_rerun_does_nothing_new(tmp_path):
    imgs, data = tmp_path / "imgs", tmp_path / "data"
    names = copy_sample_images(imgs, [0, 20, 40])
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    proc = run_script("extract_poses.py", "--data-dir", data, "--images-dir", imgs, *FAST, timeout=300)
    assert "mean nothing" in proc.stderr and "skipped 1 unreadable" in proc.stdout

    rows = read_poses(data)
    assert rows, "random Keypoint R-CNN at --min-score 0 found nobody"
    assert {r["image"] for r in rows} <= set(names)
    for r in rows:
        w, h = Image.open(imgs / r["image"]).size
        assert (int(r["image_width"]), int(r["image_height"])) == (w, h)
        x0, y0, x1, y1 = (float(r[k]) for k in ("box_x0", "box_y0", "box_x1", "box_y1"))
        assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h, r
        kp = np.array([[float(r[f"{n}_{p}"]) for p in ("x", "y", "conf")] for n in KEYPOINT_NAMES])
        assert np.all((kp[:, 0] >= 0) & (kp[:, 0] <= w) & (kp[:, 1] >= 0) & (kp[:, 1] <= h))
        assert np.all((kp[:, 2] >= 0) & (kp[:, 2] <= 1)) and float(r["score"]) > 0
        assert r["name"] == f"{r['image']}#{r['person']}"
    for image in {r["image"] for r in rows}:     # persons numbered from 0, most confident first
        mine = [r for r in rows if r["image"] == image]
        assert [int(r["person"]) for r in mine] == list(range(len(mine))) and len(mine) <= 3
        assert [float(r["score"]) for r in mine] == sorted((float(r["score"]) for r in mine), reverse=True)

    # the arrays are the CSV's keypoints through pose_descriptor, row by row
    emb = Embeddings.load(data, kind="poses", require_meta=True)
    with_rows = [r for r in rows if int(r["feature_row"]) >= 0]
    assert [int(r["feature_row"]) for r in with_rows] == list(range(len(emb)))
    assert emb.names.tolist() == [r["name"] for r in with_rows] and emb.dim == 34
    for r in with_rows:
        kp = np.array([[float(r[f"{n}_{p}"]) for p in ("x", "y", "conf")] for n in KEYPOINT_NAMES])
        np.testing.assert_allclose(emb.features[int(r["feature_row"])], pose_descriptor(kp), atol=2e-3)
        assert emb.image_path(int(r["feature_row"])) == imgs.resolve() / r["image"]
    meta = emb.meta
    assert meta["random_weights"] is True and meta["weights"]["kind"] == "none" and meta["min_score"] == 0
    assert meta["model"] == "keypointrcnn_resnet50_fpn" and meta["descriptor"]["version"] == 1
    assert meta["source"] == f"images-dir:{imgs.resolve()}" and meta["errors"] == 1
    with open(data / "poses_errors.csv", newline="") as fh:
        errors = list(csv.DictReader(fh))
    assert [e["file"] for e in errors] == ["broken.jpg"] and "not a recognised image" in errors[0]["error"]

    before = {n: (data / n).read_bytes() for n in ("pose_features.npy", "pose_names.npy", "poses.csv")}
    again = run_script("extract_poses.py", "--data-dir", data, "--images-dir", imgs, *FAST, timeout=300)
    assert "detected in 0 new, reused 4" in again.stdout and "[already up to date]" in again.stdout
    assert all((data / n).read_bytes() == b for n, b in before.items())

    copy_sample_images(imgs, [60])                      # one new image: only it is detected in
    more = run_script("extract_poses.py", "--data-dir", data, "--images-dir", imgs, *FAST, timeout=300)
    assert "detected in 1 new, reused 4" in more.stdout
    new_rows = read_poses(data)
    assert [r for r in new_rows if r["image"] != SAMPLE_IMAGES[60].name] == rows
    assert len(list((data / "poses_progress").glob("chunk-*.npz"))) == 1     # compacted


def test_pose_neighbours_are_poses_of_other_paintings(tmp_path):
    imgs, data = tmp_path / "imgs", tmp_path / "data"
    copy_sample_images(imgs, [0, 20, 40, 60])
    run_script("extract_poses.py", "--data-dir", data, "--images-dir", imgs, *FAST, timeout=300)
    emb = Embeddings.load(data, kind="poses")
    groups = [emb.image_name(i) for i in range(len(emb))]
    k = len(emb) - max(groups.count(g) for g in set(groups))
    assert k >= 1
    run_script("optimized_similarity.py", "--data-dir", data, "--poses", "--k", str(k), "--no-progress")
    table = np.load(data / f"top_{k}_poses.npy")
    feats = emb.features.astype(np.float64)
    for r, row in enumerate(table):
        others = [j for j in range(len(emb)) if groups[j] != groups[r]]
        best = sorted(others, key=lambda j: (-float(feats[j] @ feats[r]), j))[:k]   # brute force
        assert [int(j) for j in row["index"]] == best
        assert all(groups[int(j)] != groups[r] for j in row["index"])
        np.testing.assert_allclose(row["score"], feats[row["index"]] @ feats[r], atol=1e-5)
    too_many = run_script("optimized_similarity.py", "--data-dir", data, "--poses", "--k", str(k + 1),
                          "--no-progress", check=False)
    assert too_many.returncode == 2 and f"--k {k + 1}" in too_many.stderr


def test_nobody_found_is_written_and_said_not_fatal(tmp_path, caplog):
    imgs, data = tmp_path / "imgs", tmp_path / "data"
    copy_sample_images(imgs, [5])
    s = extract_poses(PosesConfig(data_dir=str(data), images_dir=str(imgs), random_weights=True,
                                  min_score=0.999, max_size=96, device="cpu", progress=False))
    assert s["persons"] == 0 and s["poses"] == 0 and s["errors"] == 0
    assert read_poses(data) == []
    assert artifacts.load_npy(data / "pose_features.npy").shape == (0, 34)
    assert "neighbours need at least 2" in caplog.text
    assert json.loads((data / "pose_meta.json").read_text())["count"] == 0


def test_offline_without_weights_is_one_line_naming_file_url_and_folder(tmp_path):
    torch_home = tmp_path / "empty_torch_home"
    imgs, data = tmp_path / "imgs", tmp_path / "data"
    copy_sample_images(imgs, [0])
    proc = run_script("extract_poses.py", "--data-dir", data, "--images-dir", imgs, "--no-progress",
                      check=False, timeout=120, env={"TORCH_HOME": str(torch_home)})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    url = "https://download.pytorch.org/models/keypointrcnn_resnet50_fpn_coco-fc266e95.pth"
    lines = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(lines) == 1 and url in lines[0], proc.stderr
    assert "keypointrcnn_resnet50_fpn_coco-fc266e95.pth" in lines[0].replace(url, "")
    assert str(torch_home / "hub" / "checkpoints") in lines[0]
    assert not (data / "pose_features.npy").exists() and not poses_csv(data).exists()


def test_local_state_dict_loads_strictly_and_other_files_are_refused(tmp_path):
    import torch

    model, resolved = build_pose_model(random_weights=True, seed=3)
    assert resolved.kind == "none" and resolved.seed == 3
    state = {k: v for k, v in model.state_dict().items() if k.startswith(("roi_heads", "rpn"))}
    full = tmp_path / "kprcnn.pth"
    torch.save(model.state_dict(), full)
    loaded, res = build_pose_model(weights=str(full))
    assert res.kind == "file" and res.id == "file:kprcnn.pth" and len(res.sha256) == 64
    got = loaded.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())
    part = tmp_path / "part.pth"
    torch.save(state, part)
    with pytest.raises(UserError, match="missing key"):
        build_pose_model(weights=str(part))
    with pytest.raises(UserError, match="no such file"):
        build_pose_model(weights=str(tmp_path / "nothing.pth"))


def _cmd(data: Path, imgs: Path) -> list[str]:
    return [sys.executable, str(REPO / "extract_poses.py"), "--data-dir", str(data), "--images-dir", str(imgs),
            *FAST, "--chunk-size", "1", "--threads", "1"]


def test_killed_run_resumes_where_it_stopped(tmp_path):
    imgs, data = tmp_path / "imgs", tmp_path / "data"
    names = copy_sample_images(imgs, [1, 11, 21, 31, 41, 51])
    progress = data / "poses_progress"
    n_chunks = kill_when_chunks(_cmd(data, imgs), progress, 2)
    assert 2 <= n_chunks < 6, "the run was not killed midway"
    assert not (data / "pose_features.npy").exists() and not poses_csv(data).exists()

    resumed = run_script(*_cmd(data, imgs)[1:], timeout=300)
    reused = int(resumed.stdout.split("reused ")[1].split(",")[0])
    assert n_chunks <= reused < 6
    assert {r["image"] for r in read_poses(data)} == set(names)


def test_every_config_field_has_its_flag_with_the_same_default_and_bad_values_stop_early():
    import dataclasses
    import importlib

    from paintsim.cli import config_from_args

    parser = importlib.import_module("extract_poses").build_parser()
    args = parser.parse_args([])
    built = config_from_args(PosesConfig, args)
    for f in dataclasses.fields(PosesConfig):
        if f.name in ("extra_meta", "progress"):
            continue
        assert f.name in vars(args), f"PosesConfig.{f.name} has no flag in extract_poses.py"
        assert getattr(built, f.name) == f.default, f.name
    assert "(default: 0.8)" in parser.format_help() and "(default: 800)" in parser.format_help()
    for bad in (["--min-score", "1"], ["--max-size", "8"], ["--weights", "w.pth", "--random-weights"]):
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(bad)
        assert stop.value.code == 2


def test_painting_pages_show_each_persons_nearest_poses_in_other_paintings(tmp_path, mobilenet_weights):
    import re

    from paintsim.site import SiteConfig, build_site
    from paintsim.site.links import check_site

    imgs, data = tmp_path / "imgs", tmp_path / "data"
    copy_sample_images(imgs, [0, 20, 40, 60, 70])
    run_script("extract_features.py", "--data-dir", data, "--images-dir", imgs, "--backbone", "mobilenet_v2",
               "--no-progress", "--device", "cpu")
    run_script("extract_poses.py", "--data-dir", data, "--images-dir", imgs, *FAST, timeout=300)
    emb = Embeddings.load(data, kind="poses")
    summary = build_site(data, SiteConfig(k=3, progress=False, view_size=0, thumb_size=64, map_method="pca"))
    assert summary.poses == len(emb) >= 2
    site = data / "site"
    for i in range(len(emb)):
        image, person = str(emb.names[i]).rsplit("#", 1)
        stem = Path(image).stem
        page = (site / "paintings" / f"{stem}.html").read_text()
        heading = f"Poses like person {int(person) + 1} of this painting"
        assert heading in page
        section = page.split(heading, 1)[1].split("</section>", 1)[0]
        linked = re.findall(r'class="card" href="\.\./paintings/([^"]+)\.html"', section)
        others = {emb.image_name(j) for j in range(len(emb))} - {image}
        assert 1 <= len(linked) <= 3 and stem not in linked
        assert set(linked) <= {Path(o).stem for o in others}
    broken, _ = check_site(site)
    assert broken == []
