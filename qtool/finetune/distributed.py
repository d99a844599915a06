"""Multi-process fine-tuning: which process this is, errors all ranks agree on, and the launcher.

A run is multi-process when a launcher started it: torchrun (`python -m torch.distributed.run`),
`accelerate launch`, or `qtool qlora --nproc N`, which re-executes the same command under torch's
elastic launcher (torchrun's own machinery, called in-process so that a failed rank ends the run
with its one error line instead of torchrun's report). Each process reads RANK, WORLD_SIZE and
LOCAL_RANK from the environment the launcher set. The Trainer does the data parallelism (DDP,
FSDP or DeepSpeed through accelerate); qtool's part is that only rank 0 writes OUT, and that a
check failing on any rank fails on all of them at the same point (`agreed`), so no rank waits
forever at a collective that the others never reach.

Why torchrun rather than `accelerate launch` for --nproc: with --cpu, accelerate 1.15 always takes
its single-process launcher (measured: `--cpu --num_processes 2` ran one process); its multi-process
path (`--multi_gpu`, which on CPU works with the recipe's device: cpu) is torch.distributed.run
anyway. torchrun needs nothing beyond torch.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qtool.errors import BackendUnavailableError, QtoolError
from qtool.finetune.recipe import RecipeError

T = TypeVar("T")


class PeerError(QtoolError):
    """Another rank's error, raised here so that every rank stops at the same point.

    `quiet` is True on every rank but 0: the message is printed once, by rank 0."""

    def __init__(self, message: str, exit_code: int = 1, quiet: bool = False) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.quiet = quiet


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank 0 of 1 for a plain command."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world() -> World:
    """The launcher's RANK / WORLD_SIZE / LOCAL_RANK (torchrun and accelerate launch set all three)."""
    def number(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            return default

    return World(number("RANK", 0), number("WORLD_SIZE", 1), number("LOCAL_RANK", 0))


def backend_for(device: str) -> str:
    """gloo on CPU (the one torch.distributed backend every CPU build has), nccl on CUDA."""
    return "nccl" if device == "cuda" else "gloo"


def init_process_group(device: str) -> World:
    """Join the launcher's process group (once) so that qtool's own checks can agree before the
    Trainer exists; accelerate reuses this group. A plain command does nothing."""
    me = world()
    if me.distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            if device == "cuda":
                import torch

                torch.cuda.set_device(me.local_rank)
            # long enough for rank 0 to quantize OUT/base while the others wait at the next collective
            dist.init_process_group(backend=backend_for(device), timeout=datetime.timedelta(hours=3))
    return me


def _group_ready() -> bool:
    import torch.distributed as dist

    return world().distributed and dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (nothing for a plain command)."""
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()


def agreed(step: Callable[[], T]) -> T:
    """Run `step` on this rank; if it raised on any rank, raise on every rank, with one message.

    Every rank must call this at the same point. When rank 0 failed, it re-raises its own
    exception (a programming error keeps its type) and the others raise a quiet PeerError;
    otherwise rank 0 raises PeerError("rank K: ...") with the lowest failing rank's message and
    the others stay quiet. So one line is printed, by rank 0. A plain command just runs `step`."""
    if not _group_ready():
        return step()
    import torch.distributed as dist

    me = world()
    error: BaseException | None = None
    result: Any = None
    try:
        result = step()
    except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks, or they hang
        error = exc
    outcome = None if error is None else (str(error).strip().splitlines()[0] if str(error).strip()
                                          else type(error).__name__, getattr(error, "exit_code", 1))
    outcomes: list[Any] = [None] * me.world_size
    dist.all_gather_object(outcomes, outcome)
    failed = [(rank, o) for rank, o in enumerate(outcomes) if o is not None]
    if not failed:
        return result
    # Every rank is here: leave the group together, so that no rank's exit kills (gloo's threads
    # abort a process that exits inside a live group) and the launcher does not SIGTERM rank 0
    # before it has printed the error.
    dist.barrier()
    dist.destroy_process_group()
    if outcomes[0] is not None:  # rank 0 failed: it reports its own error, the others stop quietly
        if me.main:
            raise error  # type: ignore[misc]
        raise PeerError(outcomes[0][0], outcomes[0][1], quiet=True) from None
    first, (message, code) = failed[0]
    raise PeerError(f"rank {first}: {message}", code, quiet=not me.main) from None


def distributed_record(device: str, mode: str | None, batch_size: int, grad_accum: int) -> dict[str, Any]:
    """What qtool.json records about the processes: world size, backend, mode, batch sizes."""
    me = world()
    return {"world_size": me.world_size,
            "backend": backend_for(device) if me.distributed else None,
            "mode": (mode or "ddp") if me.distributed else None,
            "per_device_batch_size": batch_size,
            "gradient_accumulation_steps": grad_accum,
            "global_batch_size": batch_size * grad_accum * me.world_size,
            "launcher": launcher_name() if me.distributed else None}


def launcher_name() -> str:
    if os.environ.get("QTOOL_NPROC_LAUNCH"):
        return "qtool --nproc (torch elastic)"
    if os.environ.get("ACCELERATE_DYNAMO_BACKEND") is not None or os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return "accelerate launch"
    return "torchrun"


def check_distributed(mode: str, deepspeed: str | None, recipe_path: Path, device: str) -> str | None:
    """The recipe's multi-process settings, checked before any work; returns the DeepSpeed config path.

    Raises RecipeError for a bad DeepSpeed config (missing, not JSON, no ZeRO stage 2 or 3),
    BackendUnavailableError when DeepSpeed is not installed, and RecipeError for FSDP on CPU:
    accelerate 1.15 turns FSDP on only for multi-accelerator runs (its state.py switches the
    distributed type to FSDP for MULTI_GPU/XPU/NPU/..., never MULTI_CPU), so on CPU the Trainer
    would silently run plain DDP instead."""
    path = check_deepspeed_config(deepspeed, recipe_path) if deepspeed else None
    if mode == "fsdp" and device == "cpu":
        raise RecipeError("train.distributed: fsdp needs GPUs: accelerate enables FSDP only on accelerators and would "
                          "run plain DDP on CPU (use distributed: ddp, or device: cuda)")
    if path:
        from importlib.util import find_spec

        if find_spec("deepspeed") is None:
            raise BackendUnavailableError(f"train.deepspeed ({path}) needs the deepspeed package, which is not installed: "
                                          "pip install deepspeed")
    return path


def check_deepspeed_config(value: str, recipe_path: Path) -> str:
    """A DeepSpeed ZeRO config file: exists (relative paths beside the recipe, then the current
    folder), is a JSON object, and has zero_optimization.stage 2 or 3. Returns its path; raises
    RecipeError in one line otherwise."""
    raw = Path(value).expanduser()
    places = [raw] if raw.is_absolute() else [recipe_path.parent / raw, Path.cwd() / raw]
    path = next((p for p in places if p.is_file()), None)
    if path is None:
        raise RecipeError(f"train.deepspeed: {value} not found (looked beside the recipe and in the current folder)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RecipeError(f"train.deepspeed: {path} is not readable JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise RecipeError(f"train.deepspeed: {path} is not a JSON object")
    stage = (config.get("zero_optimization") or {}).get("stage") if isinstance(config.get("zero_optimization"), dict) else None
    if stage not in (2, 3):
        raise RecipeError(f"train.deepspeed: {path} has zero_optimization.stage {stage!r}; qtool passes ZeRO stage 2 or 3 "
                          "configs (set \"zero_optimization\": {\"stage\": 2} or 3)")
    return str(path.resolve())


def launch(argv: list[str], nproc: int) -> int:
    """Run `qtool <argv>` in `nproc` processes under torch's elastic launcher (what torchrun runs),
    on this machine; return the exit code: 0, or the first failing rank's own code.

    The ranks print their own output (rank 0 prints the summary and any error, once). The
    launcher's log and its ChildFailedError report are silenced: the failing rank already said
    what went wrong in one line. OMP_NUM_THREADS defaults to the CPUs divided among the ranks."""
    import torch.distributed.run  # noqa: F401 - registers the rendezvous backends
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.root.manager.loggerDict):  # torch's elastic loggers each set their own level
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ["QTOOL_NPROC_LAUNCH"] = "1"
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"qtool-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.2, start_method="spawn")
    try:
        elastic_launch(config, sys.executable)("-m", "qtool.cli", *argv)
    except ChildFailedError as exc:
        codes = [f.exitcode for _, f in sorted(exc.failures.items())]
        code = next((c for c in codes if c and c > 0), None)
        if code is None:  # killed by a signal (negative exit codes)
            sys.stderr.write(f"qtool: error: a training process was killed (exit codes {codes})\n")
            return 1
        return code
    except (KeyboardInterrupt, SignalException):  # Ctrl-C: rank 0 has printed how to --resume
        return 130
    return 0
