"""Output folders: atomic creation, the qtool.json record, and integrity checks of weights."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from qtool.errors import CheckpointError, OutputExistsError

RECORD_NAME = "qtool.json"
# Files that mark a folder as qtool's output: --force may replace such a folder. merge.json marks a
# merge written as a plain Hugging Face folder; train_log.jsonl a qlora run folder.
OUTPUT_MARKERS = (RECORD_NAME, "merge.json", "train_log.jsonl", "export.json")


TMP_TAG, OLD_TAG = "qtool-tmp", "qtool-old"
_WORK_NAME = re.compile(rf"\.(?P<name>.+)\.(?P<tag>{TMP_TAG}|{OLD_TAG})-(?:(?P<pid>\d+)-)?[0-9a-f]{{8}}")
log = logging.getLogger("qtool")


def check_output_dir(out: Path, force: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse an OUT whose writing would destroy or hide data; raise OutputExistsError.

    Checked before any work, links resolved: OUT must not be, lie inside, or contain one of
    `inputs` (the model, data, adapters the run reads). An existing OUT needs `force`, and
    `force` replaces only a folder qtool wrote (it holds qtool.json) or an empty one: never a
    file, a link, or a folder of someone else's files.
    """
    out = Path(out).expanduser()
    refuse_overlap(out, inputs)
    if not (out.exists() or out.is_symlink()):
        check_writable_location(out)
        return
    if not force:
        raise OutputExistsError(f"output {out} already exists; pass --force to replace it")
    if out.is_symlink() or not out.is_dir():
        kind = "a symbolic link" if out.is_symlink() else "a file"
        raise OutputExistsError(f"output {out} is {kind}; --force replaces only a folder qtool wrote: remove it "
                                "yourself or pick another OUT")
    if not any((out / marker).is_file() for marker in OUTPUT_MARKERS) and any(out.iterdir()):
        raise OutputExistsError(f"output {out} is a folder qtool did not write (no {RECORD_NAME}); --force replaces "
                                "only qtool outputs: empty it yourself or pick another OUT")


def check_writable_location(path: Path, what: str = "output") -> None:
    """Refuse a path that cannot be created: a file on the way, no permission, a pseudo file system.

    Probes with a real temporary file in the nearest folder that exists (removed at once), since
    permission bits lie for root and for /proc or /sys. Raises OutputExistsError naming `path`.
    """
    path = Path(path).expanduser()
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputExistsError(f"{what} {path} cannot be created: {ancestor} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".qtool-probe-", dir=ancestor)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise OutputExistsError(f"{what} {path} cannot be written: no file can be made in {ancestor} "
                                f"({exc.strerror or exc})") from None


def refuse_overlap(out: Path, inputs: Iterable[str | Path], what: str = "output") -> None:
    """OutputExistsError when `out` is, lies inside, or contains one of `inputs` (links resolved)."""
    out = Path(out).expanduser()
    target = out.resolve()
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            continue  # a Hub id or an alias: nothing on disk to protect
        source = path.resolve()
        if target == source or source in target.parents or target in source.parents:
            relation = "is" if target == source else "lies inside" if source in target.parents else "contains"
            raise OutputExistsError(f"{what} {out} {relation} the input {item}: writing it would destroy the input; "
                                    "pick another path")


@contextmanager
def atomic_output_dir(out: Path, force: bool, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of OUT; rename it to OUT only if the block finishes.

    `check_output_dir` runs first. Any exception (Ctrl-C included) removes the temporary folder,
    so an interrupted run leaves neither a half-written OUT nor litter beside it (nor the parent
    folders it created for OUT, while they are empty); temporary
    folders of runs that were killed (their process is gone) are removed when the next run to
    the same OUT starts. An OUT that appeared while the block ran (another run writing the
    same OUT) is never replaced: the run fails with OutputExistsError and its result is dropped.
    """
    out = Path(out).expanduser()
    check_output_dir(out, force, inputs)
    existed = out.exists()
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_work_dirs(out)
    tmp = out.parent / f".{out.name}.{TMP_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists() or out.is_symlink():
            if not existed:
                raise OutputExistsError(f"output {out} appeared while this run was working (another run writing "
                                        "the same OUT?); it was left as it is and this run's result was dropped")
            trash = out.parent / f".{out.name}.{OLD_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            out.rename(trash)
            tmp.rename(out)
            _remove(trash)
        else:
            try:
                tmp.rename(out)  # refuses a non-empty folder that appeared since the check above
            except OSError:
                raise OutputExistsError(f"output {out} appeared while this run was working (another run writing "
                                        "the same OUT?); it was left as it is and this run's result was dropped") from None
    except BaseException:
        _remove(tmp)
        for folder in created:  # the parents this run made, if nothing else has been put in them since
            with suppress(OSError):
                folder.rmdir()
        raise


def remove_stale_work_dirs(out: Path) -> list[Path]:
    """Remove the temporary folders beside OUT that killed runs left (their process is gone).

    Folders named by an older qtool carry no process id: they are reported, not removed, since
    a run may still be writing them. Returns the folders removed.
    """
    out = Path(out)
    removed = []
    for sibling in out.parent.glob(f".{glob.escape(out.name)}.qtool-*"):
        match = _WORK_NAME.fullmatch(sibling.name)
        if not match or match["name"] != out.name:
            continue
        if match["pid"] is None:
            log.warning(f"{sibling} was left by an interrupted run of an older qtool; remove it if no qtool is running")
        elif not process_alive(int(match["pid"])):
            size = folder_size_bytes(sibling) if sibling.is_dir() else sibling.stat().st_size
            _remove(sibling)
            removed.append(sibling)
            log.warning(f"removed {sibling} ({size / 2**20:.0f} MiB), left by a run that was killed (process "
                        f"{match['pid']} is gone)")
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (a zombie counts: its parent has not reaped it yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename: a full disk or a kill never leaves a
    truncated file where the old one was. Raises OSError as writing does."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{TMP_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def resume_dir(out: Path) -> Path:
    """Where a resumable run keeps finished work until OUT is complete: `.OUT.qtool-resume/` beside OUT."""
    out = Path(out)
    return out.parent / f".{out.name}.qtool-resume"


def write_record(folder: Path, record: dict[str, Any]) -> None:
    write_text_atomic(Path(folder) / RECORD_NAME, json.dumps(record, indent=2, sort_keys=False) + "\n")


def emulated(record: dict[str, Any] | None) -> bool:
    """Whether a qtool.json record's kernel is transformers' emulation of the format (compressed-tensors
    FP8/W8A8/FP4 on CPU): its quality is the format's, its speed is not."""
    return str((record or {}).get("kernel", "")).startswith("emulation")


def read_record(folder: Path) -> dict[str, Any] | None:
    """The folder's qtool.json, or None when qtool did not write this folder."""
    path = Path(folder) / RECORD_NAME
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable or not JSON ({exc}); the checkpoint is corrupt") from None
    if isinstance(record, dict) and record.get("kind") == "qlora" and "method" not in record:
        output = record.get("output", "adapter")
        use = (f"{Path(folder) / output} (a plain model folder)" if output != "adapter"
               else f"its base with --adapter NAME={folder} (qtool chat), or merge it first (qtool merge)")
        raise CheckpointError(f"{folder} is a qtool qlora run folder, not a model: use {use}")
    if not isinstance(record, dict) or "method" not in record:
        raise CheckpointError(f"{path} has no 'method' field; the checkpoint is corrupt")
    if not isinstance(record["method"], str):
        raise CheckpointError(f"{path}: its 'method' is {record['method']!r}, not a method name; the checkpoint is corrupt")
    for key, kind in (("spec", dict), ("source", dict), ("timings_s", dict)):
        if key in record and not isinstance(record[key], kind) or key == "spec" and key not in record:
            raise CheckpointError(f"{path}: its '{key}' is missing or not a mapping; the checkpoint is corrupt")
    return record


def verify_weights(folder: Path) -> None:
    """Check every safetensors file's header and length without loading any tensor.

    Catches the common corruptions (truncated copy, interrupted download, wrong file) with a
    clear message, before transformers or a backend fails somewhere deep with a traceback.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a model folder: it has no config.json")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            return  # pickled weights: transformers checks them on load
        raise CheckpointError(f"{folder} has no weights (*.safetensors)")
    for path in files:
        verify_safetensors_file(path)


def safetensors_shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor name -> shape of every *.safetensors file in the folder, from the headers alone."""
    shapes: dict[str, list[int]] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        header, _ = safetensors_header(path)
        shapes |= {k: list(t.get("shape", [])) for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)}
    return shapes


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(the header's JSON, its length) of a safetensors file; CheckpointError when unreadable."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc}); the checkpoint is corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a valid safetensors file (header is not a mapping); the checkpoint is corrupt")
    return header, header_len


def tensor_bytes_under(folder: Path, modules: Iterable[str]) -> int:
    """Bytes of the tensors of every *.safetensors file in `folder` that belong to one of `modules`
    (names such as "model.layers.0.mlp.up_proj": its weight, packed codes, scales, zero points, ...),
    from the headers alone."""
    prefixes = tuple(f"{name}." for name in modules)
    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        header, _ = safetensors_header(path)
        total += sum(int(t["data_offsets"][1]) - int(t["data_offsets"][0]) for k, t in header.items()
                     if k.startswith(prefixes) and isinstance(t, dict))
    return total


def verify_safetensors_file(path: Path) -> None:
    """CheckpointError naming `path` unless its header parses and its length matches the header."""
    size = path.stat().st_size
    header, header_len = safetensors_header(path)
    try:
        data_end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise CheckpointError(f"{path} is not a valid safetensors file (malformed tensor entries); the checkpoint is corrupt") from None
    if 8 + header_len + data_end != size:
        raise CheckpointError(
            f"{path} is truncated or padded: {size} bytes on disk, {8 + header_len + data_end} expected;"
            " the checkpoint is corrupt"
        )


def folder_size_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def weights_size_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))

