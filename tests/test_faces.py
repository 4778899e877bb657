"""extract_faces.py with the real MTCNN (weights from the facenet-pytorch wheel) on the sample."""
from __future__ import annotations

import csv
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, SAMPLE_DIR, run_script
from paintsim.embedder import Embedder
from paintsim.embeddings import Embeddings
from paintsim.faces import Detector, crop_face, faces_box, read_faces_csv
from paintsim.perturb import perturb

pytest.importorskip("facenet_pytorch")

#: Sample paintings that are portraits (one face each, MTCNN sure of it), and one with two faces.
PORTRAITS = ["312e50b3-c177-4469-801f-35a718c9d00d.jpg", "3a948539-d3c8-4be3-b055-c23f97ed018f.jpg",
             "e2a39f5b-1589-4205-b661-d28b65dd3184.jpg"]
TWO_FACES = "ce218ff9-837d-41f9-80dd-d9578995013c.jpg"


def _sample_image(name: str) -> Image.Image:
    uuid_to_file = {r["uuid"] + ".jpg": r["file"] for r in csv.DictReader(open(SAMPLE_DIR / "metadata.csv"))}
    return Image.open(SAMPLE_DIR / uuid_to_file[name]).convert("RGB")


@pytest.fixture(scope="module")
def detector():
    return Detector(min_face_size=20, min_prob=0.9, max_size=1024, device="cpu")


def test_mtcnn_finds_the_faces_of_portraits_and_none_in_a_blank_canvas(detector):
    imgs = [_sample_image(n) for n in PORTRAITS + [TWO_FACES]] + [Image.new("RGB", (180, 220), (205, 190, 160))]
    found = detector.detect(imgs)
    assert [len(f) for f in found[:3]] == [1, 1, 1]
    assert len(found[3]) == 2 and found[4] == []
    for faces, img in zip(found, imgs):
        for f in faces:
            assert f.prob >= 0.9 and f.landmarks.shape == (5, 2)
            x0, y0, x1, y1 = f.box
            assert 0 <= x0 < x1 <= img.size[0] and 0 <= y0 < y1 <= img.size[1]


def test_boxes_are_in_the_original_images_pixels(detector):
    small = _sample_image(PORTRAITS[0])
    big = small.resize((small.size[0] * 4, small.size[1] * 4), Image.BICUBIC)
    capped = Detector(min_face_size=20, min_prob=0.9, max_size=max(small.size), device="cpu")
    (f_small,), (f_big,) = detector.detect([small])[0], capped.detect([big])[0]
    # detected on a copy scaled back to the small size, reported in the big image's pixels
    assert np.allclose(np.array(f_big.box) / 4, f_small.box, atol=1.5)
    assert np.allclose(f_big.landmarks / 4, f_small.landmarks, atol=1.5)
    # a crop drawn from the box holds the face: MTCNN finds it again there
    crop = crop_face(big, f_big, margin=0.3)
    again = capped.detect([crop])[0]
    assert len(again) == 1 and again[0].prob > 0.9


def test_the_box_around_all_faces_holds_each_of_them(detector):
    img = _sample_image(TWO_FACES)
    faces = detector.detect([img])[0]
    x0, y0, x1, y1 = faces_box(faces, 0.3, img.size)
    for f in faces:
        assert x0 <= f.box[0] and y0 <= f.box[1] and f.box[2] <= x1 and f.box[3] <= y1
    assert faces_box([], 0.3, img.size) is None


@pytest.fixture(scope="module")
def sample_faces(tmp_path_factory, mobilenet_weights):
    """24 sample paintings (the portraits among them) embedded, then their faces."""
    root = tmp_path_factory.mktemp("faces") / "data"
    images = root.parent / "images"
    images.mkdir()
    rows = list(csv.DictReader(open(SAMPLE_DIR / "metadata.csv")))
    chosen = [r for r in rows if r["uuid"] + ".jpg" in PORTRAITS + [TWO_FACES]]
    chosen += [r for r in rows if r not in chosen][:24 - len(chosen)]
    for r in chosen:
        shutil.copyfile(SAMPLE_DIR / r["file"], images / f"{r['uuid']}.jpg")
    Image.new("RGB", (150, 200), (205, 190, 160)).save(images / "blank.jpg")
    run_script("extract_features.py", "--data-dir", root, "--images-dir", images, "--backbone", "mobilenet_v2",
               "--no-progress", "--device", "cpu")
    proc = run_script("extract_faces.py", "--data-dir", root, "--images-dir", images, "--no-progress",
                      "--device", "cpu")
    return root, images, proc


def test_the_stage_writes_faces_csv_and_one_embedding_per_face(sample_faces):
    root, images, proc = sample_faces
    boxes = read_faces_csv(root / "faces.csv")
    faces = Embeddings.load(root, kind="faces")
    assert len(faces) == sum(len(v) for v in boxes.values()) >= 5
    assert "blank.jpg" not in boxes and all(p in boxes for p in PORTRAITS) and len(boxes[TWO_FACES]) == 2
    assert list(faces.names[:1]) and all("#" in n for n in faces.names)
    assert np.allclose(np.linalg.norm(faces.features, axis=1), 1, atol=1e-5)
    assert f"in {len(boxes)} of 25 images" in proc.stdout
    rerun = run_script("extract_faces.py", "--data-dir", root, "--images-dir", images, "--no-progress")
    assert "(0 looked at now" in rerun.stdout


def test_a_perturbed_face_crop_finds_its_own_face_first(sample_faces):
    root, images, _ = sample_faces
    faces = Embeddings.load(root, kind="faces")
    boxes = read_faces_csv(root / "faces.csv")
    embedder = Embedder.for_collection(Embeddings.load(root), device="cpu")
    crops, rows = [], []
    for r, name in enumerate(faces.names):
        image, i = str(name).rsplit("#", 1)
        face = crop_face(Image.open(images / image).convert("RGB"), boxes[image][int(i)], 0.3)
        crops.append(perturb(face, "jitter+blur", np.random.default_rng(r)))
        rows.append(r)
    vecs = embedder.embed(crops)
    best = np.argmax(vecs @ faces.features.T, axis=1)
    assert (best == np.array(rows)).mean() >= 0.9, best


def test_face_neighbours_are_faces_of_other_paintings(sample_faces):
    root, _, _ = sample_faces
    run_script("optimized_similarity.py", "--data-dir", root, "--faces", "--k", "3", "--no-progress")
    faces = Embeddings.load(root, kind="faces")
    table = np.load(root / "top_3_faces.npy")
    for r, row in enumerate(table):
        own = faces.image_name(r)
        assert all(faces.image_name(int(j)) != own for j in row["index"])
    shown = run_script("display_similar.py", "--data-dir", root, "--faces", "--query", TWO_FACES, "--face", "1",
                       "--k", "3")
    assert "query: face 1 of" in shown.stdout and shown.stdout.count("jpg#") == 3


def test_crop_faces_embeds_the_faces_and_falls_back_to_the_whole_painting(sample_faces, tmp_path):
    root, images, _ = sample_faces
    other = tmp_path / "data"
    shutil.copytree(root, other)
    whole = np.load(root / "features.npy")
    run_script("extract_features.py", "--data-dir", other, "--images-dir", images, "--backbone", "mobilenet_v2",
               "--crop", "faces", "--no-progress", "--device", "cpu")
    cropped = Embeddings.load(other)
    names = list(cropped.names)
    meta = cropped.meta["crop"]
    assert meta["mode"] == "faces" and meta["whole_painting_fallbacks"] == len(names) - meta["images_with_faces"]
    blank = names.index("blank.jpg")
    portrait = names.index(PORTRAITS[0])
    assert np.allclose(cropped.features[blank], whole[blank], atol=1e-5)       # no face: the whole painting
    assert float(cropped.features[portrait] @ whole[portrait]) < 0.99          # a face: its crop


def test_a_killed_face_run_resumes_to_the_same_outputs(sample_faces, tmp_path):
    root, images, _ = sample_faces
    other = tmp_path / "data"
    other.mkdir()
    for f in ("features.npy", "image_names.npy", "features_meta.json"):
        shutil.copyfile(root / f, other / f)
    cmd = [sys.executable, str(REPO / "extract_faces.py"), "--data-dir", str(other), "--images-dir", str(images),
           "--no-progress", "--batch-size", "2", "--chunk-size", "2", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((other / "faces_progress").glob("chunk-*.npz"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (other / "faces.csv").exists()
    done = run_script("extract_faces.py", "--data-dir", other, "--images-dir", images, "--no-progress")
    assert "0 looked at now" not in done.stdout and "25 images" in done.stdout
    a, b = read_faces_csv(other / "faces.csv"), read_faces_csv(root / "faces.csv")
    assert a.keys() == b.keys() and all(len(a[k]) == len(b[k]) for k in a)
    assert all(np.allclose(fa.box, fb.box, atol=0.05) for k in a for fa, fb in zip(a[k], b[k]))
    assert np.allclose(np.load(other / "face_features.npy"), np.load(root / "face_features.npy"), atol=1e-5)


def test_painting_pages_show_each_face_and_its_neighbour_faces(sample_faces):
    from paintsim.site import SiteConfig, build_site
    from paintsim.site.links import check_site

    root, _, _ = sample_faces
    summary = build_site(root, SiteConfig(k=3, progress=False, view_size=0, thumb_size=64, map_method="pca"))
    assert summary.faces == len(Embeddings.load(root, kind="faces"))
    site = root / "site"
    page = (site / "paintings" / f"{TWO_FACES[:-4]}.html").read_text()
    assert "Faces like face 1 of this painting" in page and "Faces like face 2 of this painting" in page
    assert page.count('src="../faces/') >= 2 + 2 * 3  # each face, and its three neighbour faces
    broken, _ = check_site(site)
    assert broken == []


def test_the_evaluation_reports_faces_with_intervals_and_chance(sample_faces):
    from paintsim.evaluation.faces import faces_section
    from paintsim.evaluation.run import EvalConfig

    root, _, _ = sample_faces
    emb = Embeddings.load(root)
    codes = np.arange(len(emb)) % 3  # three planted labels
    rep = faces_section(emb, codes, "planted", EvalConfig(device="cpu", n_boot=200, progress=False))
    n_faces = len(Embeddings.load(root, kind="faces"))
    assert rep["n_faces"] == n_faces and 0 < rep["share_with_faces"] < 1
    lo, hi = rep["share_with_faces_ci95"]
    assert lo <= rep["share_with_faces"] <= hi
    same = rep["same_label"]
    assert set(same["ci95"]) == {f"precision@{k}" for k in (1, 5) if f"precision@{k}" in same} | \
        ({"precision@10"} if "precision@10" in same else set())
    assert 0 < same["chance"]["precision@1"] < 1
    rec = rep["crop_recovery"]
    assert rec["n"] == n_faces and rec["recall@1"] >= 0.9 and rec["chance"] == pytest.approx(1 / n_faces)


def test_the_face_model_offline_without_its_weights_is_one_line(sample_faces, tmp_path):
    root, images, _ = sample_faces
    proc = run_script("extract_faces.py", "--data-dir", root, "--images-dir", images, "--face-model", "vggface2",
                      "--no-progress", check=False, env={"TORCH_HOME": str(tmp_path / "empty")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "20180402-114759-vggface2.pt" in proc.stderr and str(tmp_path / "empty") in proc.stderr


def test_an_image_smaller_than_the_smallest_face_is_looked_at_and_has_none(detector):
    assert detector.detect([Image.new("RGB", (100, 19)), Image.new("RGB", (100, 200))]) == [[], []]


def test_a_run_that_finds_no_face_leaves_no_faces_of_an_earlier_run(sample_faces, tmp_path):
    root, _, _ = sample_faces
    other = tmp_path / "data"
    shutil.copytree(root, other)
    blanks = tmp_path / "blanks"
    blanks.mkdir()
    for i in range(3):
        Image.new("RGB", (120, 160), (200 - 20 * i, 190, 160)).save(blanks / f"blank{i}.jpg")
    run_script("extract_faces.py", "--data-dir", other, "--images-dir", blanks, "--no-progress")
    assert read_faces_csv(other / "faces.csv") == {}
    assert not (other / "face_features.npy").exists() and not (other / "face_meta.json").exists()


def test_damaged_faces_csv_values_are_one_line(tmp_path):
    from paintsim.errors import UserError

    from paintsim.faces import FACES_COLUMNS

    for bad in (["a.jpg", "0", "nan", "1", "5", "6", "0.9"], ["a.jpg", "0", "5", "1", "2", "6", "0.9"],
                ["a.jpg", "1", "1", "1", "5", "6", "0.9"], ["a.jpg", "0", "1", "1", "5", "6", "7"]):
        path = tmp_path / "faces.csv"
        path.write_text(",".join(FACES_COLUMNS) + "\n" + ",".join(bad + [""] * 10) + "\n")
        with pytest.raises(UserError, match="damaged.*line 2"):
            read_faces_csv(path)


def _eye_angle(face) -> float:
    (lx, ly), (rx, ry) = face.landmarks[0], face.landmarks[1]
    return float(np.degrees(np.arctan2(ry - ly, rx - lx)))


def test_a_tilted_face_is_cropped_with_its_eyes_level(detector):
    img = _sample_image(PORTRAITS[0])
    img = img.resize((img.size[0] * 2, img.size[1] * 2), Image.BICUBIC)
    (upright,) = detector.detect([img])[0]
    tilted = img.rotate(20, resample=Image.BICUBIC, expand=True, fillcolor=(128, 128, 128))
    (face,) = detector.detect([tilted])[0]
    assert abs(_eye_angle(face) - _eye_angle(upright) + 20) < 5  # the turn is seen in the landmarks
    plain = detector.detect([crop_face(tilted, face, 0.3, align=False)])[0]
    level = detector.detect([crop_face(tilted, face, 0.3, align=True)])[0]
    assert len(plain) == 1 and len(level) == 1
    assert abs(_eye_angle(plain[0])) > 12 and abs(_eye_angle(level[0])) < 4


def test_an_unreadable_image_is_listed_in_faces_errors_csv_and_the_others_go_on(tmp_path, mobilenet_weights):
    images = tmp_path / "images"
    images.mkdir()
    _sample_image(PORTRAITS[1]).save(images / "portrait.jpg")
    Image.new("RGB", (150, 200), (205, 190, 160)).save(images / "blank.jpg")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg" * 20)
    (images / "empty.png").write_bytes(b"")
    root = tmp_path / "data"
    run_script("extract_features.py", "--data-dir", root, "--images-dir", images, "--backbone", "mobilenet_v2",
               "--no-progress", "--device", "cpu")
    proc = run_script("extract_faces.py", "--data-dir", root, "--images-dir", images, "--no-progress",
                      "--device", "cpu")
    assert "faces: 1 in 1 of 4 images" in proc.stdout and "2 unreadable" in proc.stdout
    errors = list(csv.DictReader(open(root / "faces_errors.csv")))
    assert sorted(Path(r["file"]).name for r in errors) == ["broken.jpg", "empty.png"]
    assert all(r["error"] for r in errors)
    assert list(read_faces_csv(root / "faces.csv")) == ["portrait.jpg"]
    # fixed later, the image is looked at again on the next run
    _sample_image(PORTRAITS[2]).save(images / "broken.jpg")
    again = run_script("extract_faces.py", "--data-dir", root, "--images-dir", images, "--no-progress")
    assert "(1 looked at now, 1 unreadable)" in again.stdout
    assert sorted(read_faces_csv(root / "faces.csv")) == ["broken.jpg", "portrait.jpg"]
