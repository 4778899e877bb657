#!/usr/bin/env python3
"""The GPU paths on a lent GPU: the exact top-k kernel at the full NGA size against the GPU's own
matrix-multiply floors, and extraction (MobileNetV2, ResNet50; random weights: speed only) in
float32 and bf16 autocast on tensors already on the GPU.

    python benchmarks/bench_gpu.py --n 122477 --dim 2048

Features are realistic and anisotropic (a shared mean direction plus clusters: cosines 0.5-0.9).
The floors are 2 N^2 D flops (N^2 D for the symmetric kernel's half) over the best rate of a
4096 x 8192 x 2048 matmul in float32 (TF32 off) and bf16. One JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def realistic(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(dim).astype(np.float32)
    u /= np.linalg.norm(u)
    cen = rng.standard_normal((300, dim)).astype(np.float32) / np.sqrt(dim)
    x = u + 0.6 * cen[rng.integers(0, 300, n)] + 0.6 * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def matmul_rate(dtype) -> float:
    import torch

    a = torch.randn(4096, 2048, device="cuda", dtype=dtype)
    b = torch.randn(2048, 8192, device="cuda", dtype=dtype)
    best = 0.0
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 20 * 2 * 4096 * 8192 * 2048 / (time.perf_counter() - t))
    return best


def extraction(name: str, batch: int = 64) -> dict:
    import torch
    import torchvision

    model = getattr(torchvision.models, name)(weights=None).eval().cuda().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    out = {}
    for label, ctx in (("fp32", torch.autocast("cuda", enabled=False)),
                       ("bf16", torch.autocast("cuda", dtype=torch.bfloat16))):
        with torch.inference_mode(), ctx:
            for _ in range(3):
                model(x)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                model(x)
            torch.cuda.synchronize()
        out[label] = round(20 * batch / (time.perf_counter() - t), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=122477)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--k", type=int, default=10)
    a = ap.parse_args()
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    from paintsim.knn import top_k_neighbors

    res: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "n": a.n, "dim": a.dim}
    res["fp32_tflops"] = round(matmul_rate(torch.float32) / 1e12, 1)
    res["bf16_tflops"] = round(matmul_rate(torch.bfloat16) / 1e12, 1)
    feats = realistic(a.n, a.dim)
    first = None
    for method, precision in (("auto", "auto"), ("auto", "fp32"), ("auto", "bf16"), ("dense", "fp32")):
        top_k_neighbors(feats[:4096], a.k, device="cuda", method=method, precision=precision)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        stats: dict = {}
        got = top_k_neighbors(feats, a.k, device="cuda", method=method, precision=precision, stats=stats)
        torch.cuda.synchronize()
        name = method if precision == "auto" else f"{method}_{precision}"
        res[f"knn_{name}_s"] = round(time.perf_counter() - t, 2)
        res[f"knn_{name}_ran"] = stats.get("precision")
        first = first or got
        res[f"knn_{name}_identical"] = bool((got[0] == first[0]).all() and (got[1] == first[1]).all())
    flops = 2 * a.n * a.n * a.dim
    res["floor_fp32_dense_s"] = round(flops / (res["fp32_tflops"] * 1e12), 2)
    res["floor_bf16_dense_s"] = round(flops / (res["bf16_tflops"] * 1e12), 2)
    res["knn_auto_over_bf16_floor_half"] = round(res["knn_auto_s"] / (res["floor_bf16_dense_s"] / 2), 1)
    res["extraction_images_per_s"] = {m: extraction(m) for m in ("mobilenet_v2", "resnet50")}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
