"""Background jobs for the web UI: each long action is the `qtool` CLI in its own process.

Why not a task queue library: Celery, RQ and Huey need a broker or a consumer process, and a job
must be exactly what a user would type (same validation, same one-line error, same Ctrl-C
clean-up), outlive a page reload and even the web server, and be found again by a new page.
A detached process per job, with its state in files, is the smallest thing that does all of
that (LLaMA-Factory's web UI runs its trainer the same way). Arguments are always an argv list
handed to `subprocess` without a shell, so no form value is ever parsed by a shell.

A job folder `<root>/.qtool-webui/jobs/<id>/` holds:
- `job.json`: id, kind (quantize, compare, qlora, merge, export), the argv, a title, the output
  path, start time and the runner's pid;
- `log.txt`: the CLI's stdout and stderr, progress bars included;
- `exit_code`: written by the runner (`python -m qtool.webui.jobs DIR -- ARGV`) when the CLI ends.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtool.checkpoint import write_text_atomic

JOBS_DIR = Path(".qtool-webui") / "jobs"
_PERCENT = re.compile(r"(\d{1,3})%\|")
_ERROR = re.compile(r"^qtool(?: [a-z-]+)?: (?:internal )?error: .*")
_KINDS = ("quantize", "compare", "qlora", "merge", "export")


@dataclass
class JobStatus:
    """What a page shows of a job. `state`: running, done, failed, interrupted or lost (the process
    died without an exit code: killed, or the machine restarted); `progress`: 0..1 from the last
    progress bar in the log, None before the first; `error`: the CLI's one-line error, if any."""

    id: str
    kind: str
    title: str
    state: str
    exit_code: int | None
    progress: float | None
    error: str | None
    log_tail: str
    out: str | None
    seconds: float
    argv: list[str]


def jobs_root(root: Path) -> Path:
    return Path(root) / JOBS_DIR


def start(root: Path, kind: str, argv: list[str], title: str, out: str | None = None,
          files: dict[str, str] | None = None) -> str:
    """Start `qtool ARGV` in the background, with `root` as its working folder; returns the job id.

    `files` (name → text) are written into the job folder first (e.g. a recipe the form built);
    the argv names them as `forms.JobFile(NAME)`. Raises ValueError for an unknown kind.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown job kind {kind!r}")
    folder = jobs_root(root)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while (folder / f"{stamp}-{kind}-{n}").exists():
        n += 1
    job = folder / f"{stamp}-{kind}-{n}"
    job.mkdir()
    for name, text in (files or {}).items():
        (job / name).write_text(text)
    from qtool.webui.forms import JobFile

    argv = [str(job.resolve() / a) if isinstance(a, JobFile) else str(a) for a in argv]
    record = {"id": job.name, "kind": kind, "argv": argv, "title": title, "out": out, "started": time.time()}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "0.5"}
    with open(job / "log.txt", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "qtool.webui.jobs", str(job.resolve()), "--", *argv],
                                cwd=root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    record["pid"] = proc.pid
    write_text_atomic(job / "job.json", json.dumps(record, indent=2))
    return job.name


def list_jobs(root: Path, kind: str | None = None) -> list[str]:
    """Job ids, newest first, optionally of one kind."""
    folder = jobs_root(root)
    if not folder.is_dir():
        return []
    ids = [p.name for p in folder.iterdir() if (p / "job.json").is_file()]
    if kind:
        ids = [i for i in ids if _read_json(folder / i / "job.json").get("kind") == kind]
    return sorted(ids, reverse=True)


def status(root: Path, job_id: str, tail_lines: int = 30) -> JobStatus:
    """The job's state read from its folder. Raises FileNotFoundError for an unknown id."""
    if not job_id or Path(job_id).name != job_id or job_id.startswith("."):
        raise FileNotFoundError(f"no job {job_id!r}: a job id is a folder name under {jobs_root(root)}")
    job = jobs_root(root) / job_id
    record = _read_json(job / "job.json")
    if not record:
        raise FileNotFoundError(f"no job {job_id!r} under {jobs_root(root)}")
    log = _read_tail(job / "log.txt")
    code_file = job / "exit_code"
    exit_code = int(code_file.read_text()) if code_file.is_file() else None
    if exit_code is None:
        state = "running" if _alive(record.get("pid")) else "lost"
    else:
        state = "done" if exit_code == 0 else "interrupted" if exit_code == 130 else "failed"
    lines = [seg for line in log.splitlines() for seg in line.split("\r") if seg.strip()]
    errors = [m.group(0) for line in lines for m in [_ERROR.match(line.strip())] if m]
    percents = _PERCENT.findall(log)
    end = code_file.stat().st_mtime if code_file.is_file() else time.time()
    return JobStatus(
        id=job_id, kind=record["kind"], title=record.get("title", ""), state=state, exit_code=exit_code,
        progress=1.0 if state == "done" else min(int(percents[-1]), 100) / 100 if percents else None,
        error=errors[-1] if errors and state != "done" else None,
        log_tail="\n".join(lines[-tail_lines:]), out=record.get("out"),
        seconds=end - record.get("started", end), argv=record.get("argv", []),
    )


def cancel(root: Path, job_id: str) -> bool:
    """Ctrl-C the job (SIGINT to its process group), so the CLI cleans up as it does in a terminal.
    Returns False when it was not running."""
    try:
        pid = status(root, job_id).state == "running" and _read_json(jobs_root(root) / job_id / "job.json").get("pid")
    except FileNotFoundError:
        return False
    if not _alive(pid):
        return False
    try:
        os.killpg(pid, signal.SIGINT)
    except ProcessLookupError:
        return False
    return True


def wait(root: Path, job_id: str, timeout: float = 600, poll: float = 0.5) -> JobStatus:
    """Block until the job is no longer running (tests, scripts). Raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(root, job_id)
        if st.state != "running":
            return st
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still running after {timeout:.0f} s")
        time.sleep(poll)


def _alive(pid: Any) -> bool:
    """checkpoint.process_alive, after reaping the runner if it is this server's finished child
    (a zombie would otherwise count as alive)."""
    from qtool.checkpoint import process_alive

    if not isinstance(pid, int):
        return False
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: another server started it
        pass
    return process_alive(pid)


def _read_tail(path: Path, limit: int = 64_000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _run(job: Path, argv: list[str]) -> int:
    """The runner: the CLI as a child (so the exit code is recorded even if the web server is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the CLI; the runner waits for it
    proc = subprocess.Popen([sys.executable, "-m", "qtool.cli", *argv],
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    code = proc.wait()
    code = 130 if code in (-signal.SIGINT, 130) else code
    write_text_atomic(job / "exit_code", str(code))
    return code


if __name__ == "__main__":
    folder, sep, *rest = sys.argv[1:]
    sys.exit(_run(Path(folder), rest))
