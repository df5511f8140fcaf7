"""Reproducibility helpers used by every run: one seeding function, a provenance record, and atomic
writes so an interrupted run never leaves a half-written result behind."""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

# Packages whose versions change numbers; recorded in every provenance record.
TRACKED_PACKAGES = ("coalora", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets",
                    "scipy", "numpy", "botorch", "gpytorch", "pandas")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so the same seed and preset give the same numbers
    on the same machine."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


PACKAGE_ROOT = Path(__file__).resolve().parent.parent
# What the notebooks write: regenerating them mid-sequence does not make the code differ from its commit.
GENERATED_FOLDERS = ("results", "figures")


def git_commit(root: Path = PACKAGE_ROOT) -> dict:
    """The commit of the coalora checkout and whether anything but its generated outputs
    (GENERATED_FOLDERS) has uncommitted changes ('unknown' when not run from a git checkout)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        excluded = [f":(exclude){folder}" for folder in GENERATED_FOLDERS]
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", *excluded))
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit, "dirty": dirty}


def package_versions(names=TRACKED_PACKAGES) -> dict:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_description() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"cpu: {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def provenance(parameters: dict, seed: int | None = None) -> dict:
    """A JSON-ready record of what produced a result: parameters, seed, git commit, package
    versions, device, Python and the time."""
    return {
        "parameters": parameters,
        "seed": seed,
        "git": git_commit(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "device": device_description(),
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success rename it onto `path`, on error delete it.
    Readers therefore see either the old file or the complete new one, never a partial write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_directory(directory: str | Path, write: Callable[[Path], None]) -> Path:
    """Fill `directory` by `write(staging)` on a fresh folder beside it, then rename that into place:
    the directory appears whole or not at all, and an earlier one is replaced only once the new is whole."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"cannot write to {str(directory)!r}: it exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's private 0700 would outlive the rename
    try:
        write(staging)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(staging, directory)
            shutil.rmtree(old)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")


def processes():
    """accelerate's state of this process: alone, or one of several under `accelerate launch` (gloo
    on CPUs, NCCL on GPUs). Training's Accelerator makes the same CPU-or-GPU choice. Only its main
    process writes caches and saved models; `wait_for_everyone()` lets the others read them after."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def from_main(value):
    """The main process's `value` in every process (`value` itself when there is one process): how
    processes agree on a decision (is it cached?) or a draw (which configurations to train on)."""
    state = processes()
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]
