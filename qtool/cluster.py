"""`qtool compare --workers N`: run compare cells as jobs of submitit, locally or on Slurm.

Each cell that is not done yet is one job: a fresh worker process loads the base model (the
reference for KL), quantizes and evaluates its cell exactly as the in-process run does
(`qtool.compare.cell_record`), and returns its record. The driver (the `qtool compare` process)
is the only writer of OUT/results.jsonl: it appends each record when its job ends, so resume
("ok" cells are skipped), failure isolation (a cell that raises, or a worker that dies, becomes a
"failed" record with one line) and the report work as they do for a sequential run. Ctrl-C on the
driver cancels the jobs still running; the records already appended stay valid.

Executors: `local` runs at most N jobs at a time as subprocesses of this machine (one GPU each
when the recipe runs on CUDA and GPUs are here); `slurm` submits all cells as one Slurm job array
with at most N array tasks running at once (`--array=0-K%N`), one task per cell, each with
`--gpus-per-task` GPUs. The compute nodes must see the same file system (OUT, the recipe's text
and model) and the same Python environment (submitit starts `sys.executable` there).
Every record says who ran it: `worker = {executor, host, pid, job_id, threads, gpus}`. Torch's
threads per worker are set and recorded (default: this machine's cores divided among the workers,
on Slurm `--cpus-per-task`), so two local workers on 2 cores use 1 thread each.

Why submitit (measured 2026-11-30 on the shared 2-core machine, Python 3.11, fresh venvs):
- submitit 1.5.4: +1 MB and 1 package for qtool (cloudpickle and typing_extensions are in qtool's
  environment already); no server: a local job is a subprocess (first job 1.0 s, 4 more 1.6 s);
  on a cluster it writes an sbatch file, which is what users of GPU clusters run already (job
  arrays, partitions, GPUs per task, time limits, requeue on preemption).
- Ray 2.60.0 (`ray[default]`): +350 MB and 54 packages; `ray.init()` starts a head node (GCS,
  raylet, workers) in 4.1 s, then a task costs 0.01-0.2 s. On a Slurm cluster a Ray cluster must
  itself be started inside an allocation first (`ray start --head` + workers), a second scheduler
  inside the first one.
- Dask distributed 2026.8.0: +44 MB and 18 packages; LocalCluster in 0.5 s; on Slurm through
  dask-jobqueue, again a scheduler process that must outlive the jobs.
- joblib (installed): local processes only, no cluster.
A cell costs seconds to minutes (a worker's start, imports and base-model load are ~8 s for
SmolLM2-135M), so Ray's and Dask's lower per-task overhead buys nothing here, while submitit
adds almost nothing to install and maps one-to-one onto Slurm job arrays without a head node.
Speed on the quiet 2-core machine (reports/distributed-compare): 2 workers took 111.0 s against
96.1 s sequential with torch's 2 threads (157.3 s with 1), numbers identical at equal threads:
one process already uses both cores, so workers pay off where each has its own cores or GPU.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from qtool.errors import QtoolError, SpecError

if TYPE_CHECKING:
    from qtool.compare import Cell, CompareRecipe

JOBS = "jobs"  # OUT/jobs: submitit's pickles and each job's stdout/stderr
POLL_S = 0.5


class ClusterError(QtoolError):
    """The cluster executor cannot run here (submitit missing, no Slurm)."""


@dataclass(frozen=True)
class ClusterSettings:
    """Where `qtool compare` runs its cells: N workers of the local machine or of a Slurm array.

    threads: torch threads per worker (None: local cores // workers, at least 1; on Slurm
    cpus_per_task when given). time_min: a job's time limit (Slurm --time; a local job is killed
    after it too). gpus_per_task: GPUs of each Slurm array task (local workers on CUDA get one
    GPU each, round-robin over the visible GPUs).
    """

    workers: int = 2
    executor: Literal["local", "slurm"] = "local"
    threads: int | None = None
    partition: str | None = None
    gpus_per_task: int = 0
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time_min: int = 240

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise SpecError(f"--workers takes a positive number, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise SpecError(f"--threads takes a positive number, got {self.threads}")
        if self.time_min < 1:
            raise SpecError(f"--time-limit takes a positive number of minutes, got {self.time_min}")
        if self.gpus_per_task < 0 or (self.cpus_per_task is not None and self.cpus_per_task < 1):
            raise SpecError("--gpus-per-task must be 0 or more and --cpus-per-task 1 or more")
        if self.executor == "local" and (self.partition or self.gpus_per_task or self.cpus_per_task or self.mem_gb):
            raise SpecError("--slurm-partition, --gpus-per-task, --cpus-per-task and --mem-gb need --executor slurm")

    def worker_threads(self) -> int | None:
        """Torch threads each worker sets; None leaves torch's default (a Slurm job without --cpus-per-task)."""
        if self.threads is not None:
            return self.threads
        if self.executor == "slurm":
            return self.cpus_per_task
        return max(1, (os.cpu_count() or 1) // self.workers)


def worker_info(executor: str, threads: int | None = None) -> dict[str, Any]:
    """Who runs a cell: executor, host, pid, submitit job id (None in-process), torch threads, GPUs."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    job_id = None
    if executor != "in-process":
        try:
            import submitit

            job_id = submitit.JobEnvironment().job_id
        except (ImportError, RuntimeError):
            pass
    return {"executor": executor, "host": socket.gethostname(), "pid": os.getpid(), "job_id": job_id,
            "threads": torch.get_num_threads(), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES") or None}


def run_cell_job(recipe: CompareRecipe, cell: Cell, out: str, device: str, executor: str,
                 threads: int | None) -> dict[str, Any]:
    """One job: set the worker's threads, load the base, run `cell` and return its record.

    Runs in the worker process; every error of the cell is in the record, so the job itself
    fails only when the worker dies.
    """
    from qtool import api
    from qtool.compare import cell_record
    from qtool.runtime import resolve_device

    worker = worker_info(executor, threads)
    device = resolve_device(device)
    try:
        base = api.load(recipe.model, device=device)
    except Exception as exc:  # noqa: BLE001 - reported as the cell's failure
        return {**_failed(cell, exc), "worker": worker}
    return {**cell_record(recipe, cell, base, device, Path(out), progress=False), "worker": worker}


def _failed(cell: Cell, exc: BaseException) -> dict[str, Any]:
    from qtool.compare import failure

    return {"cell": cell.id, **asdict(cell), "status": "failed", "error": failure(exc)}


def require_executor(settings: ClusterSettings) -> None:
    """ClusterError (one line, with the fix) when `settings` cannot run here: submitit missing, no Slurm."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ClusterError("--workers needs submitit: pip install 'qtool[cluster]'") from None
    if settings.executor == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise ClusterError("--executor slurm needs Slurm's sbatch and srun on PATH: run it on a login node "
                           "of the cluster (or use --executor local)")


def _executor(settings: ClusterSettings, folder: Path) -> Any:
    import submitit

    require_executor(settings)
    if settings.executor == "slurm":
        executor = submitit.SlurmExecutor(folder=folder)
        executor.update_parameters(**slurm_parameters(settings))
        return executor
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=settings.time_min)
    return executor


def slurm_parameters(settings: ClusterSettings) -> dict[str, Any]:
    """submitit SlurmExecutor parameters: one task per array element, at most `workers` at once."""
    params: dict[str, Any] = {"time": settings.time_min, "ntasks_per_node": 1, "nodes": 1,
                              "array_parallelism": settings.workers, "job_name": "qtool-compare"}
    if settings.partition:
        params["partition"] = settings.partition
    if settings.gpus_per_task:
        params["gpus_per_task"] = settings.gpus_per_task
    if settings.cpus_per_task:
        params["cpus_per_task"] = settings.cpus_per_task
    if settings.mem_gb:
        params["mem"] = f"{int(settings.mem_gb * 1024)}M"
    return params


def local_gpus(device: str) -> list[int]:
    """The GPU indices local workers share out (none unless the cells run on CUDA)."""
    if device != "cuda":
        return []
    import torch

    return list(range(torch.cuda.device_count()))


def run_cells(recipe: CompareRecipe, cells: list[Cell], out: Path, device: str, settings: ClusterSettings,
              log: Any) -> Iterator[dict[str, Any]]:
    """Run `cells` as submitit jobs and yield each record as its job ends (in finishing order).

    A job that dies (killed, out of memory, timed out) yields a "failed" record naming the
    worker's last words; closing the generator (Ctrl-C on the driver) cancels the jobs still running.
    """
    executor = _executor(settings, Path(out) / JOBS)
    threads = settings.worker_threads()
    job_device = recipe.device if settings.executor == "slurm" else device  # a login node may have no GPU
    args = [(recipe, cell, str(out), job_device, settings.executor, threads) for cell in cells]
    pending = list(zip(cells, args, strict=True))
    running: dict[Any, tuple[Cell, int | None, float]] = {}
    gpus = local_gpus(device) if settings.executor == "local" else []
    free = list(range(settings.workers))
    try:
        if settings.executor == "slurm":  # one job array; Slurm keeps at most `workers` tasks running
            with executor.batch():
                jobs = [executor.submit(run_cell_job, *a) for _, a in pending]
            for job, (cell, _) in zip(jobs, pending, strict=True):
                running[job] = (cell, None, time.monotonic())
                log(f"[{cell.id}] submitted as Slurm job {job.job_id}")
            pending = []
        while pending or running:
            while pending and free:
                slot = free.pop(0)
                cell, a = pending.pop(0)
                if gpus:
                    executor.update_parameters(visible_gpus=[gpus[slot % len(gpus)]], gpus_per_node=1)
                job = executor.submit(run_cell_job, *a)
                running[job] = (cell, slot, time.monotonic())
                log(f"[{cell.id}] started on worker {slot} (job {job.job_id})")
            finished = [job for job in running if job.done()]
            for job in finished:
                cell, slot, started = running.pop(job)
                if slot is not None:
                    free.append(slot)
                yield _collect(job, cell, settings.executor, started)
            if not finished:
                time.sleep(POLL_S)
    finally:
        for job in running:
            try:
                job.cancel(check=False)
            except Exception:  # noqa: BLE001, S110 - cancelling is best effort on the way out
                pass


def _collect(job: Any, cell: Cell, executor: str, started: float) -> dict[str, Any]:
    try:
        return job.result()
    except Exception as exc:  # noqa: BLE001 - a worker that died fails its cell only
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        last = lines[-1] if lines else type(exc).__name__
        record = {"cell": cell.id, **asdict(cell), "status": "failed",
                  "error": f"worker died (job {job.job_id}): {last}"[:500],
                  "seconds": round(time.monotonic() - started, 1),
                  "worker": {"executor": executor, "host": None, "pid": None, "job_id": str(job.job_id),
                             "threads": None, "gpus": None}}
        return record

