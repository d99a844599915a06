"""Engines that live in their own environment, driven as a subprocess (JSON in, JSON out).

vLLM's CPU build pins torch and transformers versions that conflict with qtool's, and llama.cpp is
a compiled runtime: each gets a venv under .engines/NAME (scripts/setup-engine.sh NAME). qtool
writes the job as JSON, runs the engine's worker script (qtool/engines/workers) with that venv's
Python, samples the resident memory of the worker's process tree (psutil) while it runs, and
reads the JSON result. The worker's output goes to a log file; when it fails, its last error
line becomes one QtoolError line with the log's path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

from qtool.engines.base import Engine, EngineJob, EngineRun
from qtool.errors import EngineError

WORKERS = Path(__file__).parent / "workers"
REPO = Path(__file__).resolve().parents[2]


def engines_dir() -> Path:
    """Where engine venvs live: $QTOOL_ENGINES_DIR, else .engines/ of the qtool checkout."""
    return Path(os.environ.get("QTOOL_ENGINES_DIR") or REPO / ".engines")


class ExternalEngine(Engine):
    worker: str = ""
    setup_minutes: str = ""

    def python(self) -> Path:
        return engines_dir() / self.name / "bin" / "python"

    @property
    def setup_hint(self) -> str:  # type: ignore[override]
        return f"make engine-{self.name} (scripts/setup-engine.sh {self.name}, {self.setup_minutes})"

    def unavailable(self) -> str | None:
        if not self.python().exists():
            return f"engine {self.name} is not set up in {self.python().parents[1]}: run {self.setup_hint}"
        return None

    def run(self, job: EngineJob) -> EngineRun:
        reason = self.unavailable()
        if reason:
            raise EngineError(reason)
        with tempfile.TemporaryDirectory(prefix=f"qtool-engine-{self.name}-") as tmp:
            job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
            job_file.write_text(json.dumps(asdict(job)))
            log = Path(tmp) / "engine.log"
            with open(log, "w") as out:
                proc = subprocess.Popen([str(self.python()), str(WORKERS / self.worker), str(job_file), str(result_file)],
                                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env={**os.environ, "PYTHONPATH": str(WORKERS)})
                peak = _PeakRss(proc.pid)
                try:
                    rc = proc.wait()
                finally:
                    peak.stop()
                    peak.kill_tree()  # engine processes left behind (vLLM's EngineCore), or all on Ctrl-C
            text = log.read_text(errors="replace")
            if rc != 0 or not result_file.exists():
                kept, reason = _keep_log(log, self.name), last_error(text)
                broken = rc < 0 or re.search(r"ImportError|ModuleNotFoundError|No module named|undefined symbol|"
                                             r"exited without output", reason)
                hint = f"; a broken engine environment is rebuilt by {self.setup_hint}" if broken else ""
                raise EngineError(f"{self.name} could not run {job.model}: {reason} (log: {kept}{hint})")
            result = json.loads(result_file.read_text())
        result.setdefault("kernel", self.kernel_from_log(text, result.get("quantization")))
        return EngineRun(**result, peak_memory_mib=peak.mib, model=job.model)

    def kernel_from_log(self, text: str, quantization: str | None) -> str | None:
        """The kernel the engine says it picked, from its log (None when it says nothing)."""
        return None


def _keep_log(log: Path, engine: str) -> Path:
    """A failed run's log, moved out of the run's temporary folder (which is removed) so the user can read it."""
    fd, kept = tempfile.mkstemp(prefix=f"qtool-engine-{engine}-", suffix=".log")
    os.close(fd)
    shutil.copyfile(log, kept)
    return Path(kept)


def last_error(text: str) -> str:
    """The most telling line of a failed worker's output: the root exception line (an engine's
    wrapper error such as vLLM's "See root cause above" points back to it), else the last line."""
    lines = [re.sub(r"^\(.*?\) ERROR .*?\] ", "", line.strip()) for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Exit)\b.*:", line)
              or re.match(r"^[\w.]+Error$", line)]
    for line in reversed(errors):
        if "root cause" not in line and "initialization failed" not in line:
            if "validation error for" in line:  # pydantic puts the reason on a later line
                detail = next((d for d in lines[lines.index(line):] if "Value error," in d), "")
                line = f"{line}: {detail.split('Value error,', 1)[1].split('[type=')[0].strip()}" if detail else line
            return line[:300]
    if errors:
        return errors[-1][:300]
    return lines[-1][:300] if lines else "it exited without output"


class _PeakRss:
    """Samples the resident memory of a process and its children every 0.1 s (psutil)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self._proc, self._psutil, self.peak = psutil.Process(pid), psutil, 0
        self.seen: set = set()  # every descendant seen while sampling
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.is_set():
            try:
                children = self._proc.children(recursive=True)
                self.seen.update(children)
                procs = [self._proc, *children]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except self._psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except self._psutil.Error:
                return
            time.sleep(0.1)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=1)

    def kill_tree(self) -> None:
        """Kill the worker and every process it started that is still alive."""
        for p in [self._proc, *self.seen]:
            try:
                p.kill()
            except self._psutil.Error:
                pass

    @property
    def mib(self) -> float | None:
        return round(self.peak / 2**20, 1) if self.peak else None
