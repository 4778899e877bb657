#!/usr/bin/env python3
"""Benchmark stage 1 (download_images) against the local IIIF server on loopback.

1,000 images of ~512 px (the embedded sample's real paintings, upscaled to 512 px and JPEG-encoded
at quality 90, like NGA's ``!512,512`` answers), served by tests/iiif_server.py in its own process.
For 1 and 16 workers it runs the real stage (fetch + bounded whole-file check + atomic write + manifest)
and, side by side, a peer: a bare ``requests`` loop that only GETs the bytes (no decode, no write),
i.e. the ceiling any Python client on this server could reach. Reports images/s, client
CPU-seconds per image, and the ratio to the peer.

    flock /tmp/paintsim-cpu.lock env -u OPENBLAS_CORETYPE .venv/bin/python benchmarks/bench_download.py
"""
from __future__ import annotations

import argparse
import csv
import io
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
import uuid as uuidlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def make_images(n: int, size: int = 512) -> dict[str, bytes]:
    from PIL import Image

    from iiif_server import SAMPLE, sample_rows

    bases = []
    for r in sample_rows():
        img = Image.open(SAMPLE / "images" / f"{r['objectid']}.jpg").convert("RGB")
        scale = size / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        bases.append(buf.getvalue())
    return {str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"bench-{i}")): bases[i % len(bases)] for i in range(n)}


def write_tables(csv_dir: Path, base_url: str, images: dict[str, bytes]) -> None:
    csv_dir.mkdir(parents=True, exist_ok=True)
    with open(csv_dir / "published_images.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["uuid", "iiifurl", "iiifthumburl", "viewtype", "sequence", "width", "height", "maxpixels",
                    "created", "modified", "depictstmsobjectid", "assistivetext"])
        for i, u in enumerate(images):
            w.writerow([u, f"{base_url}/iiif/{u}", "", "primary", 0, 4000, 5000, "", "", "", i + 1, ""])
    with open(csv_dir / "objects.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["objectid", "title", "attribution", "classification", "displaydate", "medium"])
        for i in range(len(images)):
            w.writerow([i + 1, f"Painting {i + 1}", "Bench Artist", "Painting", "1900", "oil on canvas"])


def serve(images: dict[str, bytes], port_q: mp.Queue, stop: mp.Event) -> None:
    from iiif_server import IIIFServer

    with IIIFServer(images) as srv:
        port_q.put(srv.server_address[1])
        stop.wait()


def peer(urls: list[str], workers: int) -> tuple[float, float]:
    """A bare requests loop: GET every URL, read the body, nothing else. Returns (wall, CPU) seconds."""
    import requests
    from requests.adapters import HTTPAdapter

    s = requests.Session()
    s.mount("http://", HTTPAdapter(pool_maxsize=workers))
    t, c = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(workers) as ex:
        sizes = list(ex.map(lambda u: len(s.get(u, timeout=30).content), urls))
    assert all(sizes)
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="images to download")
    ap.add_argument("--size", type=int, default=512, help="--size of the download")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 16], help="worker counts to measure")
    args = ap.parse_args()

    from paintsim.download import DownloadOptions, run_download
    from paintsim.fetch import FetchConfig
    from paintsim.iiif import image_url

    images = make_images(args.n, args.size)
    avg_kb = sum(map(len, images.values())) / len(images) / 1024
    ctx = mp.get_context("fork")
    port_q, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=serve, args=(images, port_q, stop), daemon=True)
    server.start()
    base = f"http://127.0.0.1:{port_q.get(timeout=30)}"
    tmp = Path(tempfile.mkdtemp(prefix="bench_download_"))
    try:
        write_tables(tmp / "csv", base, images)
        urls = [image_url(f"{base}/iiif/{u}", args.size, None, 4000, 5000) for u in images]
        peer(urls[:50], 4)  # warm-up (imports, connections)
        print(f"{args.n} images, ~{avg_kb:.0f} KiB JPEG at --size {args.size}, server {base} (own process)")
        print(f"{'workers':>7} | {'paintsim img/s':>14} | {'CPU/img':>9} | {'peer img/s':>10} | "
              f"{'peer CPU/img':>12} | img/s ratio")
        for workers in args.workers:
            data = tmp / f"data_w{workers}"
            c0, t0 = time.process_time(), time.perf_counter()
            summary = run_download(DownloadOptions(
                data_dir=data, csv_dir=tmp / "csv", size=args.size, workers=workers, progress=False,
                checkpoint_every=30.0, fetch=FetchConfig(max_retries=0)))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            assert summary.counts["ok"] == args.n, summary.text()
            peer_wall, peer_cpu = peer(urls, workers)
            ips, peer_ips = args.n / wall, args.n / peer_wall
            print(f"{workers:>7} | {ips:>14.0f} | {cpu / args.n * 1000:>7.2f}ms | {peer_ips:>10.0f} | "
                  f"{peer_cpu / args.n * 1000:>10.2f}ms | {ips / peer_ips:.2f}", flush=True)
            shutil.rmtree(data)
    finally:
        stop.set()
        server.join(5)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
