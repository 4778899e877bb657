#!/usr/bin/env python3
"""All-pairs top-k on synthetic unit vectors: optimized_similarity.py against its floor and peers.

For each N (default 20,000 and 50,000; D = 2048, k = 10), side by side in one run, each timed as a
whole process (start-up and loading included) with its peak resident memory (``wait4``):

* floor     2*N*N*D flops over the best float32 matrix-multiply rate measured in this run
            (numpy/OpenBLAS sgemm and torch, 2048 x 8192 x 2048, best of 3, in a child process
            with the same environment as the runs);
* ours      ``optimized_similarity.py`` (default method: symmetric tiles, exact float32 + float64
            re-ranking), and ``--method dense`` for reference;
* faiss     ``IndexFlatIP`` exact search of k+1 (self dropped), faiss-cpu as installed for the
            benchmark only, run with the ``OPENBLAS_CORETYPE`` that is fastest for it here
            (probed first at a small N among unset / SkylakeX / Zen / Haswell; a coretype this CPU
            cannot execute just fails the probe);
* naive     the obvious way: the whole N x N matrix in memory, then ``argsort`` of every row
            (only for N <= --naive-max).

Every result is checked against FAISS's neighbours (same scores within 1e-5). Runs use the
environment's OPENBLAS_CORETYPE unless --coretype is given (``unset`` removes it); the
docs/performance.md figures were taken with ``env -u OPENBLAS_CORETYPE`` and again with ``OPENBLAS_CORETYPE=Haswell``.

    flock /tmp/paintsim-cpu.lock env -u OPENBLAS_CORETYPE .venv/bin/python benchmarks/bench_similarity.py \\
        --sizes 20000 50000 --output benchmarks/results/similarity.json
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
import json, time, numpy as np, torch
d = 2048; m, n = 2048, 8192
rng = np.random.default_rng(0)
a = rng.standard_normal((m, d), dtype=np.float32); b = rng.standard_normal((n, d), dtype=np.float32)
def best(f):
    f(); t = 1e9
    for _ in range(3):
        t0 = time.perf_counter(); f(); t = min(t, time.perf_counter() - t0)
    return 2 * m * n * d / t
ta, tb = torch.from_numpy(a), torch.from_numpy(b)
with torch.inference_mode():
    print(json.dumps({"numpy_sgemm": best(lambda: a @ b.T), "torch_sgemm": best(lambda: ta @ tb.T)}))
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


def make_data(root: Path, n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "features.npy", x)
    np.save(root / "image_names.npy", np.array([f"{i:06d}.jpg" for i in range(n)]))
    return x


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


def probe_faiss_coretype(tmp: Path, base_env: dict[str, str], k: int) -> tuple[str | None, dict]:
    """FAISS at N = 8000 under each OPENBLAS_CORETYPE; the fastest that runs wins."""
    data = tmp / "probe"
    make_data(data, 8000, 2048, 1)
    times = {}
    for ct in (None, "SkylakeX", "Zen", "Haswell"):
        r = run_timed([sys.executable, "-c", FAISS_CODE, str(data / "features.npy"), str(k),
                       str(tmp / "probe_out")], child_env(ct, base_env))
        times[ct or "unset"] = r["seconds"] if r["returncode"] == 0 else f"failed ({r['returncode']})"
    ok = {c: t for c, t in times.items() if isinstance(t, float)}
    best = min(ok, key=ok.get)
    return (None if best == "unset" else best), times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[20000, 50000], help="collection sizes N")
    p.add_argument("--dim", type=int, default=2048, help="embedding dimension D")
    p.add_argument("--k", type=int, default=10, help="neighbours per row")
    p.add_argument("--naive-max", type=int, default=20000, help="largest N for the naive baseline")
    p.add_argument("--no-dense", action="store_true", help="skip our --method dense reference run")
    p.add_argument("--no-faiss", action="store_true", help="skip FAISS")
    p.add_argument("--coretype", default=None,
                   help="OPENBLAS_CORETYPE for our runs and the floor ('unset' removes it; default: "
                        "as in the environment)")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    args = p.parse_args()

    base_env = dict(os.environ)
    if args.coretype == "unset":
        base_env.pop("OPENBLAS_CORETYPE", None)
    elif args.coretype:
        base_env["OPENBLAS_CORETYPE"] = args.coretype
    ours_coretype = base_env.get("OPENBLAS_CORETYPE")
    results: dict = {"machine": {"cpu": platform.processor() or platform.machine(),
                                 "cores": os.cpu_count(), "python": platform.python_version()},
                     "OPENBLAS_CORETYPE (ours, floor)": ours_coretype or "unset", "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench_sim_") as tmpd:
        tmp = Path(tmpd)
        floor = run_timed([sys.executable, "-c", FLOOR_CODE], base_env)
        rates = json.loads(floor["stdout"].strip().splitlines()[-1])
        best_rate = max(rates.values())
        results["matmul_gflops"] = {k: round(v / 1e9, 1) for k, v in rates.items()}
        print("float32 matmul: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items()),
              flush=True)
        faiss_ct, probe = (None, {}) if args.no_faiss else probe_faiss_coretype(tmp, base_env, args.k)
        if not args.no_faiss:
            results["faiss_coretype_probe_seconds_n8000"] = probe
            results["faiss_coretype"] = faiss_ct or "unset"
            print(f"faiss OPENBLAS_CORETYPE probe (N=8000, s): {probe} -> {faiss_ct or 'unset'}", flush=True)

        for n in args.sizes:
            data = tmp / f"n{n}"
            x = make_data(data, n, args.dim, 0)
            feats = data / "features.npy"
            floor_s = 2 * n * n * args.dim / best_rate
            row: dict = {"n": n, "d": args.dim, "k": args.k, "floor_seconds": round(floor_s, 2),
                         "features_mib": round(x.nbytes / 2**20, 1)}
            print(f"\nN={n}: floor {floor_s:.1f} s", flush=True)
            ref = None
            if not args.no_faiss:
                r = run_timed([sys.executable, "-c", FAISS_CODE, str(feats), str(args.k),
                               str(tmp / "faiss")], child_env(faiss_ct, base_env))
                assert r["returncode"] == 0, r["stderr"]
                ref = (np.load(tmp / "faiss_i.npy"), np.load(tmp / "faiss_s.npy"))
                row["faiss"] = {"seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"]}
                print(f"  faiss IndexFlatIP  {r['seconds']:.1f} s  ({r['seconds'] / floor_s:.2f}x floor)"
                      f"  peak {r['peak_rss_mib']:.0f} MiB", flush=True)
            methods = ["auto"] + ([] if args.no_dense else ["dense"])
            for method in methods:
                out = tmp / f"ours_{method}.npy"
                r = run_timed([sys.executable, str(REPO / "optimized_similarity.py"), "--data-dir",
                               str(data), "--k", str(args.k), "--no-progress", "--device", "cpu",
                               "--method", method, "--output", str(out)], base_env)
                assert r["returncode"] == 0, r["stderr"]
                table = np.load(out, allow_pickle=False)
                entry = {"seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"],
                         "peak_over_features_mib": round(r["peak_rss_mib"] - x.nbytes / 2**20, 1),
                         "ratio_to_floor": round(r["seconds"] / floor_s, 3)}
                if ref is None:
                    ref = (table["index"], table["score"])
                else:
                    entry["ratio_to_faiss"] = round(r["seconds"] / row["faiss"]["seconds"], 3)
                    entry["agreement_with_faiss"] = check(x, table["index"], table["score"], *ref)
                row[f"ours_{method}"] = entry
                print(f"  ours --method {method:5s} {r['seconds']:.1f} s  ({entry['ratio_to_floor']:.2f}x floor"
                      + (f", {entry['ratio_to_faiss']:.2f}x faiss" if "ratio_to_faiss" in entry else "")
                      + f")  peak {r['peak_rss_mib']:.0f} MiB (features {x.nbytes / 2**20:.0f} MiB)",
                      flush=True)
            if n <= args.naive_max:
                r = run_timed([sys.executable, "-c", NAIVE_CODE, str(feats), str(args.k),
                               str(tmp / "naive")], base_env)
                assert r["returncode"] == 0, r["stderr"]
                entry = {"seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"],
                         "ratio_to_floor": round(r["seconds"] / floor_s, 3)}
                entry["agreement_with_reference"] = check(x, np.load(tmp / "naive_i.npy"),
                                                          np.load(tmp / "naive_s.npy"), *ref)
                row["naive_matrix_argsort"] = entry
                print(f"  naive matrix+argsort {r['seconds']:.1f} s  ({entry['ratio_to_floor']:.2f}x floor)"
                      f"  peak {r['peak_rss_mib']:.0f} MiB", flush=True)
            results["runs"].append(row)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nresults -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
