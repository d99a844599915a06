"""Output folders: atomic creation, the qtool.json record, and integrity checks of weights."""

from __future__ import annotations

import json
import shutil
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qtool.errors import CheckpointError, OutputExistsError

RECORD_NAME = "qtool.json"


@contextmanager
def atomic_output_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling of OUT; rename it to OUT only if the block finishes.

    Any exception (Ctrl-C included) removes the temporary folder, so an interrupted run leaves
    neither a half-written OUT nor litter beside it. An existing OUT is replaced only with force.
    """
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.qtool-tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            trash = out.parent / f".{out.name}.qtool-old-{uuid.uuid4().hex[:8]}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resume_dir(out: Path) -> Path:
    """Where a resumable run keeps finished work until OUT is complete: `.OUT.qtool-resume/` beside OUT."""
    out = Path(out)
    return out.parent / f".{out.name}.qtool-resume"


def write_record(folder: Path, record: dict[str, Any]) -> None:
    (Path(folder) / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")


def read_record(folder: Path) -> dict[str, Any] | None:
    """The folder's qtool.json, or None when qtool did not write this folder."""
    path = Path(folder) / RECORD_NAME
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable or not JSON ({exc}); the checkpoint is corrupt") from None
    if not isinstance(record, dict) or "method" not in record:
        raise CheckpointError(f"{path} has no 'method' field; the checkpoint is corrupt")
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
        _verify_safetensors(path)


def _verify_safetensors(path: Path) -> None:
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc}); the checkpoint is corrupt") from None
    data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end != size:
        raise CheckpointError(
            f"{path} is truncated or padded: {size} bytes on disk, {8 + header_len + data_end} expected;"
            " the checkpoint is corrupt"
        )


def folder_size_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def weights_size_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))

