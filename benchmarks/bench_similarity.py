#!/usr/bin/env python3
"""All-pairs top-k on synthetic unit vectors: paintsim's exact kernel against its floors and FAISS.

For each distribution x N x D (k = 10), side by side in one run, each timed as a whole process
(start-up and loading included) with its peak resident memory (``wait4``):

* floors    N*N*D flops (the half of the products the symmetric kernel computes; 2*N*N*D for a
            full search) over the best float32 rate (numpy/OpenBLAS and torch sgemm) and over the
            bf16 rate (torch), both measured in this run at 2048 x 8192 x D;
* ours      ``paintsim.knn.top_k_neighbors`` in a process of its own (load the .npy, run, save),
            with ``precision="auto"`` (the default: bf16 where the cached probe says so) and forced
            ``"fp32"`` (and ``"bf16"`` with --all-precisions); ``--script`` adds
            ``optimized_similarity.py`` itself (its default precision);
* faiss     ``IndexFlatIP`` exact search of k+1 (self dropped), faiss-cpu installed for the
            benchmark only (``pip install faiss-cpu`` into the venv), under the OPENBLAS_CORETYPE
            that is fastest for it here (probed first at N = 8000).

Distributions: ``isotropic`` (i.i.d. Gaussian rows, cosines around 0) and ``realistic`` (a shared
mean direction plus 300 clusters, cosines 0.5-0.9, many scores close to each row's k-th, as CNN
features are). Every result of ours is checked bit for bit against ours in fp32 and for agreement
with FAISS (same neighbours except float32 near-ties, scores within 1e-5). Results: one JSON per
distribution, N and D, ``<output-dir>/similarity_<distribution>_n<N>_d<D>.json``.

    flock /tmp/paintsim-cpu.lock env -u OPENBLAS_CORETYPE .venv/bin/python benchmarks/bench_similarity.py \\
        --distribution both --sizes 20000 --dims 768 --output-dir benchmarks/results
    flock /tmp/paintsim-cpu.lock env -u OPENBLAS_CORETYPE .venv/bin/python benchmarks/bench_similarity.py \\
        --distribution both --sizes 50000 --dims 2048 --output-dir benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

FLOOR_CODE = r"""
import json, sys, time, numpy as np, torch
d = int(sys.argv[1]); m, n = 2048, 8192
rng = np.random.default_rng(0)
a = rng.standard_normal((m, d), dtype=np.float32); b = rng.standard_normal((n, d), dtype=np.float32)
def best(f):
    f(); t = 1e9
    for _ in range(3):
        t0 = time.perf_counter(); f(); t = min(t, time.perf_counter() - t0)
    return 2 * m * n * d / t
ta, tb = torch.from_numpy(a), torch.from_numpy(b)
ha, hb = ta.bfloat16(), tb.bfloat16()
with torch.inference_mode():
    print(json.dumps({"numpy_sgemm": best(lambda: a @ b.T), "torch_sgemm": best(lambda: ta @ tb.T),
                      "torch_bf16": best(lambda: ha @ hb.T)}))
"""

OURS_CODE = r"""
import sys, numpy as np
from paintsim.knn import top_k_neighbors
x = np.load(sys.argv[1]); k = int(sys.argv[2]); out = sys.argv[3]; precision = sys.argv[4]
i, s = top_k_neighbors(x, k, precision=precision)
np.save(out + "_i.npy", i); np.save(out + "_s.npy", s)
"""

PROBE_CODE = r"""
import json
from paintsim import precision
print(json.dumps(precision.probe("matmul")))
"""

FAISS_CODE = r"""
import sys, time, numpy as np, faiss
x = np.load(sys.argv[1]); k = int(sys.argv[2]); out = sys.argv[3]
index = faiss.IndexFlatIP(x.shape[1]); index.add(x)
s, i = index.search(x, k + 1)
# drop each row's own hit (its duplicates may come first)
self_hit = i == np.arange(len(x))[:, None]
has = self_hit.any(1)
keep = np.where(has[:, None], ~self_hit, np.arange(k + 1)[None, :] < k)
np.save(out + "_i.npy", i[keep].reshape(len(x), k).astype(np.int32))
np.save(out + "_s.npy", s[keep].reshape(len(x), k).astype(np.float32))
"""

NAIVE_CODE = r"""
import sys, numpy as np
x = np.load(sys.argv[1]); k = int(sys.argv[2]); out = sys.argv[3]
s = x @ x.T
np.fill_diagonal(s, -np.inf)
order = np.argsort(-s, axis=1)[:, :k]
np.save(out + "_i.npy", order.astype(np.int32))
np.save(out + "_s.npy", np.take_along_axis(s, order, 1).astype(np.float32))
"""


def run_timed(cmd: list[str], env: dict[str, str], timeout: float = 1800) -> dict:
    """Run a whole process; wall seconds, peak RSS (MiB) and exit status."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(seconds, 3), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "returncode": proc.returncode, "stdout": out[-2000:], "stderr": err[-2000:]}


def child_env(coretype: str | None, base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    env.pop("OPENBLAS_CORETYPE", None)
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    return env


def make_data(root: Path, n: int, d: int, seed: int, distribution: str = "isotropic") -> np.ndarray:
    """Unit rows: i.i.d. Gaussian (isotropic), or a shared mean direction plus 300 clusters
    (realistic: cosines 0.5-0.9, tightly packed near every row's k-th)."""
    rng = np.random.default_rng(seed)
    if distribution == "realistic":
        u = rng.standard_normal(d).astype(np.float32)
        u /= np.linalg.norm(u)
        cen = rng.standard_normal((300, d)).astype(np.float32) / np.sqrt(d)
        x = (u + 0.6 * cen[rng.integers(0, 300, n)]
             + 0.6 * rng.standard_normal((n, d), dtype=np.float32) / np.sqrt(d))
    else:
        x = rng.standard_normal((n, d), dtype=np.float32)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "features.npy", x)
    np.save(root / "image_names.npy", np.array([f"{i:06d}.jpg" for i in range(n)]))
    return x


def cpu_description() -> dict:
    """lscpu's model name and whether the flags that decide the fast path are present."""
    from machine_info import BF16_FLAGS, lscpu

    info = lscpu()
    flags = set(info.get("Flags", "").split())
    return {"model_name": info.get("Model name") or platform.processor() or platform.machine(),
            "cores": os.cpu_count(), **{f: f in flags for f in BF16_FLAGS}}


def check(x: np.ndarray, idx: np.ndarray, score: np.ndarray, ref_i: np.ndarray,
          ref_s: np.ndarray) -> dict:
    """Agreement with a reference: same neighbours except float32 near-ties, scores within 1e-5."""
    diff = np.argwhere(idx != ref_i)
    worst = 0.0
    for r, c in diff[:10000]:
        worst = max(worst, abs(float(x[r].astype(np.float64) @ x[idx[r, c]].astype(np.float64))
                               - float(ref_s[r, c])))
    return {"same_neighbours": float((idx == ref_i).mean()),
            "max_score_diff": float(np.abs(score - ref_s).max()),
            "differences_are_near_ties": bool(worst <= 1e-5)}


def probe_faiss_coretype(tmp: Path, base_env: dict[str, str], k: int, d: int) -> tuple[str | None, dict]:
    """FAISS at N = 8000 under each OPENBLAS_CORETYPE; the fastest that runs wins."""
    data = tmp / "probe"
    make_data(data, 8000, d, 1)
    times = {}
    for ct in (None, "SkylakeX", "Zen", "Haswell"):
        r = run_timed([sys.executable, "-c", FAISS_CODE, str(data / "features.npy"), str(k),
                       str(tmp / "probe_out")], child_env(ct, base_env))
        times[ct or "unset"] = r["seconds"] if r["returncode"] == 0 else f"failed ({r['returncode']})"
    ok = {c: t for c, t in times.items() if isinstance(t, float)}
    best = min(ok, key=ok.get)
    return (None if best == "unset" else best), times


def run_ours(tmp: Path, feats: Path, k: int, precision: str, env: dict) -> tuple[dict, tuple]:
    out = tmp / f"ours_{precision}"
    r = run_timed([sys.executable, "-c", OURS_CODE, str(feats), str(k), str(out), precision], env)
    assert r["returncode"] == 0, r["stderr"]
    return r, (np.load(str(out) + "_i.npy"), np.load(str(out) + "_s.npy"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[20000, 50000], help="collection sizes N")
    p.add_argument("--dims", type=int, nargs="+", default=[2048], help="embedding dimensions D")
    p.add_argument("--distribution", choices=["isotropic", "realistic", "both"], default="both")
    p.add_argument("--k", type=int, default=10, help="neighbours per row")
    p.add_argument("--all-precisions", action="store_true", help="also force precision='bf16'")
    p.add_argument("--script", action="store_true", help="also time optimized_similarity.py (its default)")
    p.add_argument("--naive-max", type=int, default=0, help="largest N for the naive matrix + argsort")
    p.add_argument("--no-faiss", action="store_true", help="skip FAISS")
    p.add_argument("--coretype", default=None,
                   help="OPENBLAS_CORETYPE for our runs and the floor ('unset' removes it; default: "
                        "as in the environment)")
    p.add_argument("--output-dir", default=None, help="write one JSON per distribution/N/D here")
    args = p.parse_args()

    base_env = dict(os.environ)
    base_env["PYTHONPATH"] = str(REPO) + os.pathsep + base_env.get("PYTHONPATH", "")
    if args.coretype == "unset":
        base_env.pop("OPENBLAS_CORETYPE", None)
    elif args.coretype:
        base_env["OPENBLAS_CORETYPE"] = args.coretype
    machine = {"cpu": cpu_description(), "python": platform.python_version(),
               "OPENBLAS_CORETYPE (ours, floor)": base_env.get("OPENBLAS_CORETYPE", "unset"),
               "date": time.strftime("%Y-%m-%d")}
    print(f"CPU: {machine['cpu']}", flush=True)
    probe = run_timed([sys.executable, "-c", PROBE_CODE], base_env)   # warms the cached probe
    machine["precision_probe"] = json.loads(probe["stdout"].strip().splitlines()[-1])
    print(f"precision probe (cached for the runs): {machine['precision_probe']}", flush=True)
    dists = ["isotropic", "realistic"] if args.distribution == "both" else [args.distribution]
    precisions = ["auto", "fp32"] + (["bf16"] if args.all_precisions else [])
    with tempfile.TemporaryDirectory(prefix="bench_sim_") as tmpd:
        tmp = Path(tmpd)
        for d in args.dims:
            floor = run_timed([sys.executable, "-c", FLOOR_CODE, str(d)], base_env)
            rates = json.loads(floor["stdout"].strip().splitlines()[-1])
            fp32_rate = max(rates["numpy_sgemm"], rates["torch_sgemm"])
            print(f"\nD={d}: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items()), flush=True)
            faiss_ct, ct_probe = (None, {}) if args.no_faiss else probe_faiss_coretype(tmp, base_env, args.k, d)
            for dist in dists:
                for n in args.sizes:
                    data = tmp / f"{dist}_n{n}_d{d}"
                    x = make_data(data, n, d, 0, dist)
                    feats = data / "features.npy"
                    half = n * n * d
                    row: dict = {"distribution": dist, "n": n, "d": d, "k": args.k, "machine": machine,
                                 "matmul_gflops": {k: round(v / 1e9, 1) for k, v in rates.items()},
                                 "floor_fp32_half_seconds": round(half / fp32_rate, 4),
                                 "floor_bf16_half_seconds": round(half / rates["torch_bf16"], 4),
                                 "floor_fp32_full_seconds": round(2 * half / fp32_rate, 4),
                                 "features_mib": round(x.nbytes / 2**20, 1)}
                    print(f"\n{dist} N={n} D={d}: floors (half of the products) fp32 "
                          f"{row['floor_fp32_half_seconds']} s, bf16 {row['floor_bf16_half_seconds']} s", flush=True)
                    faiss_ref = None
                    if not args.no_faiss:
                        r = run_timed([sys.executable, "-c", FAISS_CODE, str(feats), str(args.k),
                                       str(tmp / "faiss")], child_env(faiss_ct, base_env))
                        assert r["returncode"] == 0, r["stderr"]
                        faiss_ref = (np.load(tmp / "faiss_i.npy"), np.load(tmp / "faiss_s.npy"))
                        row["faiss"] = {"seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"],
                                        "coretype": faiss_ct or "unset", "coretype_probe_n8000": ct_probe}
                        print(f"  faiss IndexFlatIP   {r['seconds']:7.1f} s  peak {r['peak_rss_mib']:.0f} MiB",
                              flush=True)
                    results = {}
                    for prec in precisions:
                        r, res = run_ours(tmp, feats, args.k, prec, base_env)
                        results[prec] = res
                        row[f"ours_{prec}"] = {"seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"]}
                    if args.script:
                        out = tmp / "script.npy"
                        r = run_timed([sys.executable, str(REPO / "optimized_similarity.py"), "--data-dir",
                                       str(data), "--k", str(args.k), "--no-progress", "--device", "cpu",
                                       "--output", str(out)], base_env)
                        assert r["returncode"] == 0, r["stderr"]
                        table = np.load(out, allow_pickle=False)
                        results["script"] = (table["index"], table["score"])
                        row["ours_script"] = {"seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"]}
                    ref_i, ref_s = results["fp32"]
                    for name, (i, s) in results.items():
                        e = row[f"ours_{name}"]
                        e["identical_to_fp32"] = bool(np.array_equal(i, ref_i) and
                                                      np.array_equal(s.view(np.int32), ref_s.view(np.int32)))
                        e["ratio_to_floor_fp32_half"] = round(e["seconds"] / row["floor_fp32_half_seconds"], 3)
                        e["ratio_to_floor_bf16_half"] = round(e["seconds"] / row["floor_bf16_half_seconds"], 3)
                        if faiss_ref is not None:
                            e["ratio_to_faiss"] = round(e["seconds"] / row["faiss"]["seconds"], 3)
                            e["agreement_with_faiss"] = check(x, i, s, *faiss_ref)
                        print(f"  ours {name:5s}          {e['seconds']:7.1f} s  "
                              + (f"{e['ratio_to_faiss']:.2f}x faiss, " if faiss_ref is not None else "")
                              + f"{e['ratio_to_floor_fp32_half']:.2f}x fp32 floor, "
                              f"{e['ratio_to_floor_bf16_half']:.1f}x bf16 floor, identical to fp32: "
                              f"{e['identical_to_fp32']}, peak {e['peak_rss_mib']:.0f} MiB", flush=True)
                    if n <= args.naive_max:
                        r = run_timed([sys.executable, "-c", NAIVE_CODE, str(feats), str(args.k),
                                       str(tmp / "naive")], base_env)
                        assert r["returncode"] == 0, r["stderr"]
                        row["naive_matrix_argsort"] = {
                            "seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"],
                            "agreement_with_fp32": check(x, np.load(tmp / "naive_i.npy"),
                                                         np.load(tmp / "naive_s.npy"), ref_i, ref_s)}
                    if args.output_dir:
                        out = Path(args.output_dir) / f"similarity_{dist}_n{n}_d{d}.json"
                        out.parent.mkdir(parents=True, exist_ok=True)
                        out.write_text(json.dumps(row, indent=2) + "\n")
                        print(f"  -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
