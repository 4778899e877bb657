"""Where a run computes and with how much memory: ``auto`` becomes CUDA when a GPU is present,
and blocks of scores are sized to a memory budget capped by what the machine has free."""
from __future__ import annotations

import os

from .errors import UserError

DEVICES = ("auto", "cpu", "cuda")
#: Memory a kernel may use for its score blocks when no budget is given (capped by what is free).
DEFAULT_MEMORY_BUDGET = 512 * 2**20


def resolve_device(name: str) -> str:
    """``auto|cpu|cuda[:i]`` -> a torch device string; CUDA asked for but absent is a clear error.
    ``cpu``, and ``auto`` on a machine without a GPU driver, answer without importing torch."""
    if name == "cpu":
        return name
    if name == "auto" and not _gpu_driver_present():
        return "cpu"
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available "
                        "(use --device cpu or --device auto)")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; choose from {', '.join(DEVICES)}")
    return name


def _gpu_driver_present() -> bool:
    """An NVIDIA or ROCm driver is loaded (its device files exist); without one torch sees no GPU."""
    return any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/nvidia0",
                                          "/dev/kfd"))


def available_memory() -> int:
    """Bytes of memory available now (``MemAvailable``), or 4 GiB when it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def auto_block_size(n: int, bytes_per_score_row: int | None = None,
                    memory_budget: int | None = None) -> int:
    """Rows per block so that the block's working set fits ``memory_budget`` bytes.

    The working set of one block of ``b`` rows is about ``b * n * 12`` bytes (scores, a mask and
    selection scratch); the default budget is ``DEFAULT_MEMORY_BUDGET`` capped at a quarter of
    the memory available now.
    """
    if memory_budget is None:
        memory_budget = min(DEFAULT_MEMORY_BUDGET, available_memory() // 4)
    per_row = bytes_per_score_row or 12 * n
    return int(max(1, min(n, 4096, memory_budget // max(per_row, 1))))


def configure_threads(threads: int, device: str) -> int:
    """Set torch's intra-op threads (0 = all cores on the CPU); return the number used."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    elif device == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    return torch.get_num_threads()


def auto_workers(device: str, threads: int, cores: int | None = None) -> int:
    """DataLoader processes for ``--workers -1``: min(8, cores) on CUDA; on the CPU 1, except 0
    (decode in the main process, between batches) on a machine of at most 2 cores whose compute
    threads take every core. There a decoding process preempts one of the two OpenMP threads and
    stalls both at every barrier: measured on the 2-vCPU Sapphire Rapids, 2026-11-25
    (``benchmarks/bench_extract.py --compare-precision``, benchmarks/results/extract_precision.json),
    workers 0 against 1, threads 2, batch 8, medians of 3: ResNet50 fp32 24.3 vs 20.2 img/s, bf16
    54.0 vs 44.6; MobileNetV2 fp32 87.9 vs 63.1, bf16 119.2 vs 80.9."""
    cores = cores or os.cpu_count() or 1
    if device == "cuda":
        return min(8, cores)
    return 0 if cores <= 2 and threads >= cores else 1
