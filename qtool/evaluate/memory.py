"""Memory a model takes: its tensors in memory, and the peak while it runs a phase of work.

On CPU the peak is the process's resident set high-water mark (VmHWM), reset at the start of
each phase through /proc/self/clear_refs, so prefill and decode each get their own peak. Where
that is not possible, the process-lifetime peak is reported and labelled so. On CUDA: torch's
max allocated bytes, reset per phase.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, counting tied/shared storage once."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.device, tensor.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


@dataclass
class PhasePeak:
    mib: float = 0.0
    kind: str = ""


@contextmanager
def peak_memory(device: str) -> Iterator[PhasePeak]:
    """Measure the peak memory of the block; the result is filled in when the block ends."""
    peak = PhasePeak()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield peak
        torch.cuda.synchronize()
        peak.mib, peak.kind = torch.cuda.max_memory_allocated() / 2**20, "cuda max allocated (this phase)"
        return
    phase = _reset_rss_peak()
    yield peak
    if phase:
        peak.mib, peak.kind = _rss_peak_mib(), "peak RSS (this phase)"
    else:
        peak.mib, peak.kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS (process lifetime)"


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # 5: reset the peak resident set size (Linux >= 4.0)
        return True
    except OSError:
        return False


def _rss_peak_mib() -> float:
    with open("/proc/self/status") as fh:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", fh.read())
    return int(match.group(1)) / 1024 if match else float("nan")


# Runs argv[3:] under an optional RLIMIT_DATA of argv[1] bytes; writes its exit code and ru_maxrss to argv[2].
_LAUNCHER = """
import json, os, resource, subprocess, sys
limit = int(sys.argv[1])
def cap():
    if limit:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
child = subprocess.Popen(sys.argv[3:], preexec_fn=cap)
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[2], "w") as fh:
    json.dump({"code": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}, fh)
"""


def run_with_peak(argv: list[str], data_limit: int | None = None, **kwargs: Any) -> tuple[subprocess.CompletedProcess, int]:
    """Run `argv` (output captured as text; `kwargs` go to subprocess.run) and return it with its
    peak resident set in bytes, from the kernel (wait4's ru_maxrss).

    `data_limit`: bytes of data (heap, anonymous and private writable mappings) the command may
    have (RLIMIT_DATA): the kernel refuses allocations beyond it. The command is started by a small
    launcher process, because Linux carries the RSS of the process a child was forked from into
    the child's ru_maxrss at exec: measured straight from a large parent (pytest, a benchmark
    holding tensors), every command would read at least the parent's size.
    """
    with tempfile.TemporaryDirectory() as folder:
        report = os.path.join(folder, "peak.json")
        launcher = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(data_limit or 0), report, *argv],
                                  capture_output=True, text=True, **kwargs)
        with open(report) as fh:
            measured = json.load(fh)
    result = subprocess.CompletedProcess(argv, measured["code"], launcher.stdout, launcher.stderr)
    return result, measured["maxrss_kib"] * 1024
