"""Text sources for calibration and evaluation.

A source is a file (.txt/.md as is; .jsonl/.json rows with a `text` field), the project's own
calibration text (`builtin`), or a named Hugging Face dataset (`wikitext2`, `c4`, `pile`) fetched
online with the `datasets` package.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qtool.errors import DatasetError, QtoolError
from qtool.resources import bundled_dir

Purpose = Literal["eval", "calibration"]


@dataclass(frozen=True)
class Text:
    name: str  # what the user typed
    origin: str  # resolved file path or dataset id and split
    content: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode("utf-8")).hexdigest()

    def describe(self) -> dict[str, object]:
        return {"source": self.name, "origin": self.origin, "sha256": self.sha256, "chars": len(self.content)}


# name -> (dataset id, config, split for eval, split or data file for calibration, text column)
NAMED_DATASETS: dict[str, dict[str, object]] = {
    "wikitext2": {"path": "wikitext", "name": "wikitext-2-raw-v1", "eval": "test", "calibration": "train", "column": "text"},
    "c4": {
        "path": "allenai/c4",
        "data_files": {
            "eval": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
            "calibration": {"train": "en/c4-train.00000-of-01024.json.gz"},
        },
        "eval": "validation", "calibration": "train", "column": "text",
    },
    "pile": {"path": "mit-han-lab/pile-val-backup", "eval": "validation", "calibration": "validation", "column": "text"},
}


def load_text(source: str, purpose: Purpose = "eval") -> Text:
    if source == "builtin":
        folder = bundled_dir("calib_data")
        parts = [p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))]
        return _non_empty(Text("builtin", str(folder), "\n\n".join(parts)))
    if source in NAMED_DATASETS:
        return _non_empty(_load_named(source, purpose))
    path = Path(source).expanduser()
    if not path.exists():
        known = ", ".join(["builtin", *NAMED_DATASETS])
        raise DatasetError(f"dataset {source} is neither a file nor a known name ({known})")
    return _non_empty(Text(source, str(path.resolve()), _read_file(path)))


def read_utf8(path: Path, what: str, folder_hint: str, error: type[QtoolError] = DatasetError) -> str:
    """The text of a user's file; `error` (one line naming `what` and the path) when it is a folder,
    cannot be read or is not UTF-8."""
    if path.is_dir():
        raise error(f"{what} {path} is a folder; {folder_hint}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text") from None
    except OSError as exc:
        raise error(f"{what} {path} cannot be read: {exc.strerror}") from None


def _read_file(path: Path) -> str:
    raw = read_utf8(path, "dataset", "give a .txt, .jsonl or .json file")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                rows.append(_text_field(_parse_json(line, path, number), path, number))
        return "\n\n".join(rows)
    if path.suffix == ".json":
        data = _parse_json(raw, path, None)
        if not isinstance(data, list):
            raise DatasetError(f"dataset {path} must hold a JSON list of objects with a 'text' field")
        return "\n\n".join(_text_field(row, path, i + 1) for i, row in enumerate(data))
    return raw


def _parse_json(text: str, path: Path, line: int | None) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f" line {line}" if line else ""
        raise DatasetError(f"dataset {path}{where} is not valid JSON ({exc.msg})") from None


def _text_field(row: object, path: Path, number: int) -> str:
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise DatasetError(f"dataset {path} row {number} has no string field 'text'")
    return row["text"]


def _non_empty(text: Text) -> Text:
    if not text.content.strip():
        raise DatasetError(f"dataset {text.name} is empty")
    return text


def _load_named(name: str, purpose: Purpose) -> Text:
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"named dataset {name} needs the datasets package: pip install 'qtool[eval]'") from None
    from qtool.models import hub_reachable

    if not hub_reachable():
        raise DatasetError(
            f"named dataset {name} must be fetched from the Hugging Face Hub, which is unreachable"
            " (offline); pass a local .txt/.jsonl file instead"
        )
    info = NAMED_DATASETS[name]
    split = str(info[purpose])
    kwargs: dict[str, object] = {"split": split}
    if "name" in info:
        kwargs["name"] = info["name"]
    if "data_files" in info:
        kwargs["data_files"] = info["data_files"][purpose]  # type: ignore[index]
    try:
        rows = datasets.load_dataset(str(info["path"]), **kwargs)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DatasetError(f"could not fetch dataset {name} ({info['path']}): {first}") from None
    # Papers join WikiText rows with blank lines before tokenizing; the same for all sources here.
    return Text(name, f"hf:{info['path']}:{split}", "\n\n".join(rows[str(info["column"])]))


def as_valid_text(text: str) -> tuple[str, bool]:
    """`text` with bytes that are not UTF-8 (which Python carries as lone surrogates from argv or a
    binary stdin) replaced by U+FFFD; also whether anything was replaced."""
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), True
