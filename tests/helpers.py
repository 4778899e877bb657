"""Shared test helpers: paths of the repository and a way to run a stage script for real."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "data" / "sample"
REAL_NGA_ROWS = Path(__file__).resolve().parent / "fixtures" / "nga_real"
SAMPLE_IMAGES = sorted((SAMPLE_DIR / "images").glob("*.jpg"))


def copy_sample_images(dst: Path, picks: Iterable[int]) -> list[str]:
    """Copy the sample paintings at these positions into ``dst``; their file names."""
    dst.mkdir(parents=True, exist_ok=True)
    names = []
    for i in picks:
        shutil.copy2(SAMPLE_IMAGES[i], dst / SAMPLE_IMAGES[i].name)
        names.append(SAMPLE_IMAGES[i].name)
    return names


def kill_when_chunks(cmd: list[str], progress: Path, at_least: int, timeout: float = 120) -> int:
    """Start a stage, SIGKILL it once ``progress`` holds ``at_least`` chunk files; how many it left."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(list(progress.glob("chunk-*.npz"))) < at_least:
        time.sleep(0.02)
    proc.kill()
    proc.wait(timeout=30)
    return len(list(progress.glob("chunk-*.npz")))


def run_script(script: str, *args: str, check: bool = True, timeout: float = 600,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a top-level stage script in a subprocess, as a user would."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc
