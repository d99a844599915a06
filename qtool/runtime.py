"""Process-level facts recorded next to every result: versions, device, peak memory, seeds."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import random
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from qtool.errors import DeviceError

# The packages every run goes through; each backend adds its own (Capabilities.packages).
CORE_PACKAGES = (
    "qtool", "torch", "transformers", "accelerate", "safetensors", "tokenizers", "gguf", "datasets", "peft", "lm_eval",
)


@functools.cache
def recorded_packages() -> tuple[str, ...]:
    """Distribution names whose versions go next to every result: CORE_PACKAGES, then each
    registered backend's `Capabilities.packages` (import names, mapped to their distributions).
    Computed once per process: mapping import names to distributions reads every installed one."""
    from qtool import backends

    distributions = importlib.metadata.packages_distributions()
    names = list(CORE_PACKAGES)
    for method in backends.known_methods():
        for module in backends.get(method).capabilities.packages:
            for name in (n.lower() for n in distributions.get(module.split(".")[0], [module])):
                if name not in names:
                    names.append(name)
    return tuple(names)


def package_versions() -> dict[str, str]:
    """Versions of the packages that can change a result; missing ones are left out."""
    versions = {"python": platform.python_version()}
    for name in recorded_packages():
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def check_device_name(requested: str) -> None:
    """DeviceError unless `requested` is auto, cpu or cuda."""
    if requested not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"unknown device {requested!r}: use cpu, cuda or auto")


def resolve_device(requested: str) -> str:
    """'auto' picks CUDA when present; asking for CUDA without it is a user error."""
    check_device_name(requested)
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but no CUDA device is visible to torch")
    return requested


def compute_dtype(device: str) -> torch.dtype:
    # On CPU fp32 is several times faster than bf16 without AVX512-bf16 (measured 4.7x here).
    return torch.float32 if device == "cpu" else torch.bfloat16


def configure_cpu() -> None:
    # Denormal floats make 4-bit matmuls on CPU crawl (bnb nf4 LoRA: 34 s -> 4.7 s a step).
    torch.set_flush_denormal(True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def peak_memory_mib(device: str) -> float:
    """Peak resident memory of this process (CPU) or peak allocated VRAM (CUDA), in MiB."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux


class Stopwatch:
    """Named stages and their wall times, in the order they ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)


@contextmanager
def library_output_to(log_path: Path) -> Iterator[Any]:
    """Send everything written to fds 1 and 2 into `log_path`; yield a stream to the real stderr.

    Some libraries (GPTQModel's UI, lm-eval's git probe) write to the file descriptors directly,
    so swapping sys.stdout would not catch them. After Ctrl-C fd 1 is not given back but sent to
    /dev/null: a library's worker threads can still be finishing (GPTQModel's print a row of its
    per-module table), and stdout may be a pipe a script reads as JSON; qtool writes nothing there
    once interrupted.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = os.fdopen(os.dup(saved[2]), "w", buffering=1)
    interrupted = False
    with open(log_path, "ab") as log:
        for fd in (1, 2):
            os.dup2(log.fileno(), fd)
        try:
            yield terminal
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                if fd == 1 and interrupted:
                    with open(os.devnull, "wb") as null:
                        os.dup2(null.fileno(), fd)
                else:
                    os.dup2(copy, fd)
                os.close(copy)
            terminal.close()
