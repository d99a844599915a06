"""qtool compare --workers: cells as submitit jobs (qtool.cluster), same numbers as the sequential run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qtool.cluster import ClusterSettings, run_cells, slurm_parameters
from qtool.compare import Cell, load_compare_recipe, run_compare
from tests.conftest import REPO, assert_one_line_error, qtool_in_process

pytest.importorskip("submitit")

# What must not differ between a cell run in-process and in a worker: everything but timings,
# peak memory (per process) and who ran it.
VOLATILE = {"seconds", "started_utc", "worker", "timings_s", "peak_memory_mib", "quantization_cost", "versions"}


def _numbers(record: dict) -> dict:
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(record)


def _recipe(tmp_path: Path, model: Path, text: Path, cells: str, extra: str = "") -> Path:
    path = tmp_path / "compare.yaml"
    path.write_text(f"""\
compare:
  name: tiny
  model: {model}
  device: cpu
  eval: {{text: {text}, ctx: 64, max_tokens: 256}}
{extra}  cells:
{cells}""")
    return path


def test_two_local_workers_give_the_sequential_numbers_and_resume(tiny_llama, wikitext_test, tmp_path):
    recipe_path = _recipe(tmp_path, tiny_llama, wikitext_test, """\
    - {method: rtn, bits: 4, group_size: 32}
    - {method: hqq, bits: 4, group_size: 32}
""")
    sequential = run_compare(load_compare_recipe(str(recipe_path)), tmp_path / "seq", progress=False, log=lambda m: None)
    out = tmp_path / "dist"
    distributed = run_compare(load_compare_recipe(str(recipe_path)), out, progress=False, log=lambda m: None,
                              cluster=ClusterSettings(workers=2))
    assert list(sequential) == ["base", "rtn-b4-g32", "hqq-b4-g32"]
    assert set(distributed) == set(sequential) and all(r["status"] == "ok" for r in distributed.values())
    for cell, record in sequential.items():
        assert _numbers(distributed[cell]) == _numbers(record), cell  # perplexity, KL, sizes: equal, not close
    assert distributed["rtn-b4-g32"]["divergence"]["kl_mean"] > 0
    workers = [r["worker"] for r in distributed.values()]
    assert {w["executor"] for w in workers} == {"local"} and {w["threads"] for w in workers} == {max(1, os.cpu_count() // 2)}
    assert len({w["pid"] for w in workers}) == 3  # one worker process per cell
    assert sequential["base"]["worker"]["executor"] == "in-process"
    assert (out / ".gitignore").read_text().split() == ["models/", "jobs/"]

    # Resume: drop a finished cell's line; a rerun on workers redoes that cell only.
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(x for x in lines if json.loads(x)["cell"] != "hqq-b4-g32") + "\n")
    logged: list[str] = []
    again = run_compare(load_compare_recipe(str(recipe_path)), out, progress=False, log=logged.append,
                        cluster=ClusterSettings(workers=2))
    assert sorted(m.split("]")[0][1:] for m in logged if "done already" in m) == ["base", "rtn-b4-g32"]
    assert _numbers(again["hqq-b4-g32"]) == _numbers(sequential["hqq-b4-g32"])
    assert len((out / "results.jsonl").read_text().splitlines()) == len(lines)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _start(args: list) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qtool.cli", *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "TQDM_DISABLE": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_job(proc: subprocess.Popen, cell: str, lines: list[str]) -> int:
    """Read the driver's stderr until `cell` is started; return its job id (the local controller's pid)."""
    for line in proc.stderr:
        lines.append(line)
        found = re.search(rf"\[{re.escape(cell)}\] started on worker \d+ \(job (\d+)\)", line)
        if found:
            return int(found.group(1))
    raise AssertionError("".join(lines))


def test_a_dead_worker_fails_its_cell_only_and_ctrl_c_cancels_the_rest(tiny_llama, wikitext_test, tmp_path):
    recipe = _recipe(tmp_path, tiny_llama, wikitext_test, "    - {method: rtn, bits: [4, 3, 2], group_size: 32}\n")
    out = tmp_path / "report"
    proc = _start(["compare", recipe, "--out", out, "--quiet", "--workers", "2"])
    lines: list[str] = []
    controller = _wait_for_job(proc, "rtn-b4-g32", lines)
    deadline = time.monotonic() + 60
    while not (workers := _children(controller)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)  # the worker dies as under the OOM killer
    for line in proc.stderr:  # the dead worker's record and one more are in results.jsonl
        lines.append(line)
        if "(2/4)" in line:
            break
    controllers = [int(j) for j in re.findall(r"\(job (\d+)\)", "".join(lines))]
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    stderr = "".join(lines) + rest
    assert proc.returncode == 130, stderr
    assert "rerun the same command" in rest
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in controllers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in controllers if _alive(pid)], "a cancelled job is still running"
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert 2 <= len(records) < 4 and len({r["cell"] for r in records}) == len(records)
    dead = next(r for r in records if r["cell"] == "rtn-b4-g32")
    assert dead["status"] == "failed" and dead["error"].startswith(f"worker died (job {controller})"), dead
    assert "\n" not in dead["error"]
    assert all(r["status"] == "ok" for r in records if r is not dead)


class _Job:
    def __init__(self, job_id: str, outcome: object, polls: int = 1):
        self.job_id, self.outcome, self.polls, self.cancelled = job_id, outcome, polls, False

    def done(self) -> bool:
        self.polls -= 1
        return self.polls < 0

    def result(self) -> dict:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    def cancel(self, check: bool = True) -> None:
        self.cancelled = True


class _Executor:
    def __init__(self, outcomes: dict[str, object]):
        self.outcomes, self.jobs, self.running, self.most = outcomes, [], 0, 0

    def update_parameters(self, **kwargs) -> None:
        pass

    def submit(self, fn, recipe, cell, *args) -> _Job:
        job = _Job(f"j{len(self.jobs)}", self.outcomes[cell.id], polls=2 + 3 * len(self.jobs))  # they end in turn
        self.jobs.append(job)
        self.most = max(self.most, sum(not j.polls < 0 for j in self.jobs))
        return job


def test_the_driver_keeps_n_jobs_running_and_a_lost_job_is_one_failed_record(monkeypatch):
    from submitit.core.utils import UncompletedJobError

    from qtool import cluster

    cells = [Cell("base"), Cell("rtn", 4, 32), Cell("rtn", 3, 32), Cell("rtn", 2, 32)]
    outcomes = {c.id: {"cell": c.id, "status": "ok"} for c in cells}
    outcomes["rtn-b3-g32"] = UncompletedJobError("Job 12 (task: 0) with path /x/12_0_result.pkl\n"
                                                 "has not produced any output (state: NODE_FAIL)")
    fake = _Executor(outcomes)
    monkeypatch.setattr(cluster, "_executor", lambda settings, folder: fake)
    monkeypatch.setattr(cluster, "POLL_S", 0.001)

    class Recipe:
        device = "cpu"

    records = list(run_cells(Recipe(), cells, Path("/nonexistent"), "cpu", ClusterSettings(workers=2), lambda m: None))
    assert sorted(r["cell"] for r in records) == sorted(c.id for c in cells)
    lost = next(r for r in records if r["cell"] == "rtn-b3-g32")
    assert lost["status"] == "failed" and lost["error"] == "worker died (job j2): has not produced any output (state: NODE_FAIL)"
    assert fake.most == 2  # never more than --workers jobs at once

    fake = _Executor({c.id: {"cell": c.id, "status": "ok"} for c in cells})
    monkeypatch.setattr(cluster, "_executor", lambda settings, folder: fake)
    records = run_cells(Recipe(), cells, Path("/nonexistent"), "cpu", ClusterSettings(workers=2), lambda m: None)
    next(records)
    records.close()  # what Ctrl-C on the driver does
    unfinished = [j for j in fake.jobs if j.polls >= 0]
    assert unfinished and all(j.cancelled for j in unfinished)


def test_slurm_settings_become_one_job_array():
    from submitit.slurm.slurm import _make_sbatch_string

    settings = ClusterSettings(workers=3, executor="slurm", partition="gpu", gpus_per_task=1, cpus_per_task=8,
                               mem_gb=32, time_min=90)
    params = slurm_parameters(settings)
    script = _make_sbatch_string(command="python -m submitit.core._submit /out/jobs", folder="/out/jobs",
                                 map_count=12, **params)
    for line in ("#SBATCH --array=0-11%3", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --time=90", "#SBATCH --mem=32768M", "#SBATCH --ntasks-per-node=1"):
        assert line in script, script
    assert settings.worker_threads() == 8


@pytest.mark.parametrize(("flags", "needle"), [
    (["--executor", "local"], "need --workers N"),
    (["--threads", "0"], "--threads takes a positive number"),
    (["--workers", "0"], "--workers takes a positive number"),
    (["--workers", "2", "--gpus-per-task", "1"], "need --executor slurm"),
    (["--executor", "slurm"], "needs Slurm's sbatch and srun on PATH"),
])
def test_cluster_flag_errors_are_one_line(tiny_llama, wikitext_test, tmp_path, monkeypatch, flags, needle):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no sbatch here
    recipe = _recipe(tmp_path, tiny_llama, wikitext_test, "    - {method: rtn, bits: 4, group_size: 32}\n")
    assert_one_line_error(qtool_in_process("compare", recipe, "--out", tmp_path / "out", "--quiet", *flags), needle)
