"""A collection embedded from a user's own folder (--images-dir) is shown and judged from that folder."""
from __future__ import annotations

import shutil

from paintsim.artifacts import read_json
from paintsim.query import Collection
from helpers import SAMPLE_DIR, run_script


def test_later_stages_read_images_from_the_folder_the_features_came_from(tmp_path, mobilenet_weights):
    scans = tmp_path / "my scans"
    scans.mkdir()
    for p in sorted((SAMPLE_DIR / "images").glob("*.jpg"))[:8]:
        shutil.copyfile(p, scans / p.name)
    data = tmp_path / "data"
    run_script("extract_features.py", "--data-dir", data, "--images-dir", scans,
               "--backbone", "mobilenet_v2", "--no-progress")
    run_script("optimized_similarity.py", "--data-dir", data, "--k", "3", "--no-progress")

    inspected = run_script("inspect_images.py", "--data-dir", data, "--no-progress")  # no manifest: the folder
    assert "readable images: 8; unreadable: 0" in inspected.stdout
    assert read_json(data / "inspection.json")["images_dir"] == str(scans.resolve())

    coll = Collection.open(data)
    assert coll.image_path(0).parent == scans.resolve()
    assert coll.image_path(0).is_file()

    shown = run_script("display_similar.py", "--data-dir", data, "--query", "0", "--k", "3", "--no-progress")
    assert "figure:" in shown.stdout

    run_script("evaluate_unsupervised.py", "--data-dir", data, "--k", "3", "--copy-sample", "2",
               "--pixel-sample", "4", "--no-progress")
    report = read_json(data / "evaluation.json")
    assert report["pixels"]["unreadable_pairs"] == 0
    assert report["pixels"]["ssim_neighbours"] is not None
    assert report["copies"]["n_originals"] == 2
    assert report["copies"]["unreadable"] == 0
