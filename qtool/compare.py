"""`qtool compare`: run a matrix of quantization cells on one model and evaluate each the same way.

A compare recipe names a base model, a calibration source, the evaluation settings, and cells
(method × bits × group size × options; list values expand into their product). Each cell is
quantized into OUT/models/CELL and evaluated; its result is appended to OUT/results.jsonl as
soon as it is known. A rerun skips cells whose last result is "ok", so an interrupted compare
resumes; a failing cell is recorded with its one-line error and the others go on. The base model
is always a cell of its own: it is the reference for KL, PPL ratios and recommendations.
"""

from __future__ import annotations

import datetime as dt
import gc
import itertools
import json
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qtool.errors import QtoolError
from qtool.recipes import RecipeError, check_keys, read_recipe_section

BASE = "base"
RESULTS = "results.jsonl"


@dataclass(frozen=True)
class Cell:
    method: str
    bits: int | None = None
    group_size: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        if self.method == BASE:
            return BASE
        parts = [self.method, f"b{self.bits}" if self.bits else "", f"g{self.group_size}" if self.group_size else ""]
        parts += [f"{k}={v}" for k, v in sorted(self.options.items())]
        return "-".join(p for p in parts if p).replace("/", "_")


@dataclass
class SpeedSettings:
    batch: list[int] = field(default_factory=lambda: [1, 8])
    prompt_len: int = 128
    new_tokens: int = 32
    repeats: int = 3


@dataclass
class LmEvalSettings:
    limit: int | None = None  # documents


@dataclass
class EvalSettings:
    text: str = "builtin"
    ctx: int = 2048
    stride: int | None = None
    max_tokens: int | None = None
    kl: bool = True
    speed: SpeedSettings | None = None
    lm_eval: LmEvalSettings | None = None


@dataclass
class CompareRecipe:
    name: str
    model: str
    cells: list[Cell]
    eval: EvalSettings
    device: str = "auto"
    seed: int = 0
    calib: str | None = None
    nsamples: int | None = None
    seqlen: int | None = None
    description: str = ""
    report: dict[str, Any] = field(default_factory=dict)  # see qtool.report.ReportSettings


def load_compare_recipe(name_or_path: str) -> CompareRecipe:
    path, body, description = read_recipe_section(name_or_path, "compare")
    where = f"recipe {path}"
    _check(body, CompareRecipe, where, required=("model", "cells"))
    eval_data = body.get("eval") or {}
    _check(eval_data, EvalSettings, f"{where}, eval")
    speed, lm_eval = eval_data.get("speed"), eval_data.get("lm_eval")
    if speed:
        _check(speed, SpeedSettings, f"{where}, eval.speed")
    if lm_eval:
        _check(lm_eval, LmEvalSettings, f"{where}, eval.lm_eval")
    settings = EvalSettings(**{**eval_data, "speed": SpeedSettings(**speed) if speed else None,
                               "lm_eval": LmEvalSettings(**lm_eval) if lm_eval else None})
    return CompareRecipe(**{**body, "name": body.get("name") or path.stem, "cells": expand_cells(body["cells"], where),
                            "eval": settings, "description": description or str(body.get("description", ""))})


def expand_cells(entries: Any, where: str) -> list[Cell]:
    """Every combination of each entry's list values; the base cell first, exactly once."""
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"{where}: 'cells' must be a non-empty list of {{method, bits, group_size, options}}")
    cells = [Cell(BASE)]
    for entry in entries:
        if not isinstance(entry, dict) or "method" not in entry:
            raise RecipeError(f"{where}: each cell needs a 'method', got {entry!r}")
        _check(entry, Cell, f"{where}, cell {entry['method']}")
        options = entry.get("options") or {}
        if not isinstance(options, dict):
            raise RecipeError(f"{where}, cell {entry['method']}: 'options' must be a mapping")
        axes = [_as_list(entry.get("bits")), _as_list(entry.get("group_size")),
                *[[(k, v) for v in _as_list(vals)] for k, vals in options.items()]]
        for bits, group, *opts in itertools.product(*axes):
            cell = Cell(entry["method"], bits, group, dict(opts))
            if cell.id not in {c.id for c in cells}:
                cells.append(cell)
    return cells


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _check(data: Any, cls: type, where: str, required: tuple[str, ...] = ()) -> None:
    check_keys(data, [f.name for f in fields(cls)], where, required)


def read_results(out: Path) -> dict[str, dict[str, Any]]:
    """The last record of each cell in OUT/results.jsonl (a torn last line is ignored)."""
    path = Path(out) / RESULTS
    latest: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return latest
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "cell" in record:
            latest[record["cell"]] = record
    return latest


def _append(out: Path, record: dict[str, Any]) -> None:
    with open(Path(out) / RESULTS, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def run_compare(recipe: CompareRecipe, out: Path, progress: bool = True, log: Any = None) -> dict[str, dict[str, Any]]:
    """Run every cell not done yet; return the latest record per cell."""
    import qtool
    from qtool.runtime import resolve_device

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("models/\n")  # checkpoints are regenerated, never committed
    done = {cell for cell, record in read_results(out).items() if record.get("status") == "ok"}
    todo = [cell for cell in recipe.cells if cell.id not in done]
    for cell in recipe.cells:
        if cell.id in done:
            log(f"[{cell.id}] done already, skipped")
    if not todo:
        return read_results(out)
    device = resolve_device(recipe.device)
    base = qtool.load(recipe.model, device=device)
    for number, cell in enumerate(todo, 1):
        log(f"[{cell.id}] ({number}/{len(todo)}) quantize and evaluate")
        started = dt.datetime.now(dt.timezone.utc)
        record: dict[str, Any] = {"cell": cell.id, **asdict(cell), "started_utc": started.isoformat(timespec="seconds")}
        try:
            record |= {"status": "ok", **_run_cell(recipe, cell, base, device, out, progress)}
        except QtoolError as exc:
            record |= {"status": "failed", "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - one broken backend must not stop the other cells
            first = (str(exc).strip().splitlines() or [""])[0]
            record |= {"status": "failed", "error": f"{type(exc).__name__}: {first}"}
        record["seconds"] = round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1)
        _append(out, record)
        log(f"[{cell.id}] {record['status']}" + (f": {record['error']}" if record["status"] == "failed" else ""))
        gc.collect()
    return read_results(out)


def _run_cell(recipe: CompareRecipe, cell: Cell, base: Any, device: str, out: Path, progress: bool) -> dict[str, Any]:
    import qtool
    from qtool import backends
    from qtool.checkpoint import read_record
    from qtool.runtime import package_versions

    if cell.method == BASE:
        loaded = base
    else:
        folder = out / "models" / cell.id
        if not (folder.exists() and read_record(folder)):
            # the recipe's calibration settings apply to the methods that calibrate
            calibrates = backends.get(cell.method).capabilities.needs_calibration
            calibration = {"calib": recipe.calib, "nsamples": recipe.nsamples, "seqlen": recipe.seqlen} if calibrates else {}
            qtool.quantize(recipe.model, folder, cell.method, cell.bits, cell.group_size,
                           {k: str(v) for k, v in cell.options.items()}, device=device, force=True, seed=recipe.seed,
                           **calibration)
        loaded = qtool.load(folder, device=device)
    settings = recipe.eval
    windows = {"ctx": settings.ctx, "stride": settings.stride, "max_tokens": settings.max_tokens, "progress": progress}
    record = loaded.record or {}
    kept = ("spec", "kernel", "format", "effective_bits_per_weight", "timings_s", "peak_memory_mib",
            "peak_memory_kind", "weights_bytes", "calibration", "reload_check")
    result: dict[str, Any] = {"device": loaded.device, "quantization": {k: record[k] for k in kept if k in record} or None,
                              "memory": qtool.memory_footprint(loaded), "divergence": None}
    result["memory"]["parameters"] = sum(p.numel() for p in base.model.parameters())
    if settings.kl and cell.method != BASE:
        perplexity, divergence = qtool.evaluate_divergence(loaded, base, settings.text, **windows)
        result["divergence"] = divergence.as_dict()
    else:
        perplexity = qtool.evaluate_perplexity(loaded, settings.text, **windows)
    result["perplexity"] = perplexity.as_dict()
    if settings.lm_eval:
        words = qtool.evaluate_word_perplexity(loaded, settings.text, max_length=settings.ctx, limit=settings.lm_eval.limit)
        result["word_perplexity"] = words.as_dict()
    if settings.speed:
        s = settings.speed
        speeds = qtool.evaluate_speed(loaded, tuple(s.batch), s.prompt_len, s.new_tokens, s.repeats, settings.text)
        result["speed"] = [r.as_dict() for r in speeds]
    result["versions"] = package_versions()
    return result
