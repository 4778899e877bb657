"""What a benchmark result names as its machine: lscpu's model name and the flags that decide the
bf16 path, cores, torch and its CPU capability, the date and the command line."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys

BF16_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def lscpu() -> dict[str, str]:
    """lscpu's fields (empty when lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                             env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def machine() -> dict:
    import torch

    info = lscpu()
    flags = set(info.get("Flags", "").split())
    return {"cpu_model_name": info.get("Model name") or platform.processor() or platform.machine(),
            "cpu_family_model": f"{info.get('CPU family', '?')}/{info.get('Model', '?')}",
            "cpu_flags": {f: f in flags for f in BF16_FLAGS},
            "hypervisor": info.get("Hypervisor vendor", ""),
            "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "(unset)")}


def stamp() -> dict:
    """machine, date (UTC) and the command that produced the result."""
    return {"machine": machine(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable)] + sys.argv)}
