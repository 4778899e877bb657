"""Is a bf16 product worth it on this machine? A short probe, measured once per machine and cached.

bf16 is ~5x float32 on CPUs with AMX (Sapphire Rapids) and ~15x on tensor-core GPUs, but ~6x
*slower* on AVX2-only CPUs (Zen 3: ~18 GFLOP/s against ~150 for sgemm), so the fast path is chosen
by measurement, never from the CPU's name. The probe (a few small products, well under a second on
the CPU) is cached as JSON under ``$PAINTSIM_CACHE``, else ``$XDG_CACHE_HOME/paintsim``, else
``~/.cache/paintsim``, keyed by CPU model and flags, torch version, thread count and device; a
missing, unreadable or corrupt cache file is simply measured again and rewritten (atomically).

``PAINTSIM_PRECISION_PROBE=fast|slow`` forces the answer (tests use it to force each branch).

Besides the fixed kinds (``matmul``, ``conv``), :func:`probe_model` times one real model's forward
(the extraction's embedder: float32 against bf16 autocast), cached beside them under the kind
``forward:<name>``: a toy convolution is no guide to a real network here (the 3-conv probe measured
0.96x on the Sapphire Rapids development machine, where ResNet50 runs ~2.5x and MobileNetV2 ~1.8x
faster in bf16 autocast).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

KINDS = ("matmul", "conv")
#: prefix of a model-forward probe's kind (:func:`probe_model`): ``forward:<name>``
MODEL_KIND_PREFIX = "forward:"
#: a low-precision path is used only where it is at least this much faster than float32
DEFAULT_THRESHOLD = 1.5
ENV_CACHE = "PAINTSIM_CACHE"
ENV_OVERRIDE = "PAINTSIM_PRECISION_PROBE"
CACHE_VERSION = 1
_FORCED = {"fast": 10.0, "slow": 0.1}
_memo: dict[str, dict] = {}


def cache_dir() -> Path:
    """Where the probe results live (created on first write)."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "paintsim"
    return Path.home() / ".cache" / "paintsim"


def _cpu_identity() -> tuple[str, str]:
    """CPU model name and a hash of its feature flags (/proc/cpuinfo; platform as a fallback)."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(value.split()))
                if model and flags:
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    return model, hashlib.sha256(flags.encode()).hexdigest()[:16]


def _normal_device(device: str) -> str:
    return "cuda" if device.startswith("cuda") and ":" not in device else device


def machine_key(device: str = "cpu") -> dict:
    """What the probe's answer depends on: CPU, torch, threads, and the device it ran on."""
    import torch

    device = _normal_device(device)
    model, flags = _cpu_identity()
    key = {"cpu_model": model, "cpu_flags_sha256": flags, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda"):
        key["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return key


def _cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"precision-probe-{digest}.json"


def _read(path: Path, key: dict) -> dict:
    """The cached records for this key, or {} when absent, unreadable, corrupt or for another key."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or data.get("key") != key:
        return {}
    recs = data.get("probes")
    if not isinstance(recs, dict):
        return {}
    return {k: v for k, v in recs.items()
            if _known_kind(k) and isinstance(v, dict) and isinstance(v.get("speedup"), (int, float))}


def _known_kind(kind: object) -> bool:
    return isinstance(kind, str) and (kind in KINDS or (kind.startswith(MODEL_KIND_PREFIX)
                                                        and len(kind) > len(MODEL_KIND_PREFIX)))


def _write(path: Path, key: dict, probes: dict) -> None:
    """Atomic: a temporary file in the same folder, then rename (a failure only loses the cache)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".probe-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"version": CACHE_VERSION, "key": key, "probes": probes}, fh, indent=2)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass


def _best_seconds(fn, sync, reps: int = 2) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


def _probe_matmul(device: str) -> dict:
    """bf16 against float32 ``a @ b.T`` (the kernel's own product: bf16 in, as torch returns it)."""
    import torch

    cuda = device.startswith("cuda")
    m, n, d = (4096, 4096, 4096) if cuda else (512, 2048, 2048)
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, d, generator=g).to(device)
    b = torch.randn(n, d, generator=g).to(device)
    ab, bb = a.to(torch.bfloat16), b.to(torch.bfloat16)
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            t32 = _best_seconds(lambda: a @ b.T, sync)
            t16 = _best_seconds(lambda: ab @ bb.T, sync)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    flops = 2 * m * n * d
    return {"fp32_gflops": round(flops / t32 / 1e9, 1), "bf16_gflops": round(flops / t16 / 1e9, 1),
            "speedup": round(t32 / t16, 3), "shape": [m, n, d]}


def _probe_conv(device: str) -> dict:
    """A few 3x3 convolutions (channels_last, batch 8, 56 x 56 x 64): float32 against bf16 autocast."""
    import torch

    cuda = device.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[m for _ in range(3) for m in (torch.nn.Conv2d(64, 64, 3, padding=1),
                                                             torch.nn.ReLU())])
    net = net.to(device).eval().to(memory_format=torch.channels_last)
    x = torch.randn(8, 64, 56, 56, device=device).to(memory_format=torch.channels_last)
    dev_type = "cuda" if cuda else "cpu"

    def low():
        with torch.autocast(dev_type, dtype=torch.bfloat16):
            net(x)

    with torch.inference_mode():
        t32 = _best_seconds(lambda: net(x), sync)
        t16 = _best_seconds(low, sync)
    flops = 3 * 2 * 8 * 56 * 56 * 64 * 64 * 9
    return {"fp32_gflops": round(flops / t32 / 1e9, 1), "bf16_gflops": round(flops / t16 / 1e9, 1),
            "speedup": round(t32 / t16, 3), "shape": "3 x conv3x3 64->64, 8 x 56 x 56, channels_last"}


_PROBES = {"matmul": _probe_matmul, "conv": _probe_conv}


def _forced() -> str | None:
    forced = os.environ.get(ENV_OVERRIDE, "").strip().lower()
    return forced if forced in _FORCED else None


def _lookup(kind: str, device: str, measure, refresh: bool) -> tuple[dict, str]:
    """(the record of ``kind`` on ``device``, where it came from): this process's memo, the cache
    file, or ``measure(device)`` run now and written to the cache."""
    key = machine_key(device)
    path = _cache_path(key)
    memo_key = f"{path}:{kind}"
    if not refresh and memo_key in _memo:
        return dict(_memo[memo_key]), f"cache {path}"
    cached = {} if refresh else _read(path, key)
    source = f"cache {path}"
    if kind not in cached:
        rec = measure(device)
        rec["measured_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        cached = {**_read(path, key), kind: rec}
        _write(path, key, cached)
        source = f"measured now (cached in {path})"
    _memo[memo_key] = cached[kind]
    return dict(cached[kind]), source


def probe(kind: str, device: str = "cpu", *, refresh: bool = False) -> dict:
    """The record for ``kind`` on ``device``: rates, speedup, date; measured once, then cached."""
    if kind not in KINDS:
        raise ValueError(f"unknown probe kind {kind!r}; choose from {', '.join(KINDS)}")
    device = _normal_device(device)
    forced = _forced()
    if forced:
        return {"speedup": _FORCED[forced], "forced_by": f"{ENV_OVERRIDE}={forced}"}
    rec, _ = _lookup(kind, device, _PROBES[kind], refresh)
    return rec


def _time_model(run, sync, images: int, reps: int = 2) -> dict:
    """float32 against bf16 autocast, interleaved (a noisy second hits both sides), best of ``reps``
    after one warm-up of each (oneDNN builds its bf16 kernels on first use)."""
    run("fp32")
    run("bf16")
    sync()
    best = {"fp32": float("inf"), "bf16": float("inf")}
    for _ in range(reps):
        for prec in ("fp32", "bf16"):
            t0 = time.perf_counter()
            run(prec)
            sync()
            best[prec] = min(best[prec], time.perf_counter() - t0)
    t32, t16 = max(best["fp32"], 1e-9), max(best["bf16"], 1e-9)
    return {"fp32_images_per_s": round(images / t32, 2), "bf16_images_per_s": round(images / t16, 2),
            "speedup": round(t32 / t16, 3), "batch": images, "statistic": f"best of {reps}, interleaved"}


def probe_model(name: str, run, device: str = "cpu", *, images: int = 8, refresh: bool = False) -> dict:
    """bf16 autocast over float32 speed of one model's forward on ``device``, cached as the kind
    ``forward:<name>`` (``name`` says what was timed: model, input size, batch, layout).

    ``run(precision)`` runs one forward of a batch of ``images`` in ``"fp32"`` or ``"bf16"``; it is
    called only when nothing is cached (six times: a warm-up and two timed runs of each). The
    record gets ``source``: ``measured now``, ``cache <file>`` or ``forced by ...`` (not stored).
    """
    kind = MODEL_KIND_PREFIX + str(name)
    if not _known_kind(kind):
        raise ValueError("probe_model needs a name")
    device = _normal_device(device)
    forced = _forced()
    if forced:
        return {"kind": kind, "speedup": _FORCED[forced], "forced_by": f"{ENV_OVERRIDE}={forced}",
                "source": f"forced by {ENV_OVERRIDE}={forced}"}
    cuda = device.startswith("cuda")

    def measure(dev: str) -> dict:
        import torch

        sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
        return _time_model(run, sync, images)

    rec, source = _lookup(kind, device, measure, refresh)
    return {"kind": kind, **rec, "source": source}


def matmul_speedup(device: str = "cpu") -> float:
    """bf16 GEMM rate over float32 GEMM rate on ``device`` (cached probe)."""
    return float(probe("matmul", device)["speedup"])


def conv_speedup(device: str = "cpu") -> float:
    """bf16-autocast over float32 rate of a small conv net forward on ``device`` (cached probe)."""
    return float(probe("conv", device)["speedup"])


def choose(kind: str, device: str = "cpu", threshold: float = DEFAULT_THRESHOLD) -> str:
    """``"bf16"`` where the probe shows bf16 at least ``threshold`` x faster, else ``"fp32"``."""
    return "bf16" if probe(kind, device)["speedup"] >= threshold else "fp32"


def measurements(device: str = "cpu") -> dict:
    """What was measured on this machine (for a stage's metadata): key and the cached probes."""
    device = _normal_device(device)
    forced = _forced()
    if forced:
        return {"forced_by": f"{ENV_OVERRIDE}={forced}"}
    key = machine_key(device)
    return {"key": key, "probes": _read(_cache_path(key), key)}


def clear_memo() -> None:
    """Forget in-process results (tests; the file cache is untouched)."""
    _memo.clear()


__all__ = ["cache_dir", "machine_key", "probe", "probe_model", "matmul_speedup", "conv_speedup", "choose",
           "measurements", "clear_memo", "KINDS", "MODEL_KIND_PREFIX", "DEFAULT_THRESHOLD", "ENV_CACHE",
           "ENV_OVERRIDE"]
