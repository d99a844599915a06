"""`qtool compare`: run a matrix of quantization cells on one model and evaluate each the same way.

A compare recipe names a base model, a calibration source, the evaluation settings, and cells
(method × bits × group size × options; list values expand into their product). Each cell is
quantized into OUT/models/CELL and evaluated; its result is appended to OUT/results.jsonl as
soon as it is known. A rerun skips cells whose last result is "ok", so an interrupted compare
resumes; a failing cell is recorded with its one-line error and the others go on. The base model
is always a cell of its own: it is the reference for KL, PPL ratios and recommendations.
By default the cells run one after another in this process; `run_compare(..., cluster=...)` runs
each as a job of qtool.cluster (local worker processes or a Slurm job array) with the same
`cell_record`, and this process stays the one writer of results.jsonl.
"""

from __future__ import annotations

import datetime as dt
import gc
import itertools
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt

from qtool.calibration import CalibrationFields
from qtool.cluster import ClusterSettings
from qtool.errors import QtoolError, SpecError
from qtool.evaluate.plan import EvalPlan
from qtool.recipes import read_recipe_section
from qtool.report import ReportSettings
from qtool.request import OptionValue, QuantizeRequest
from qtool.schema import Section, Seed, parse_section

BASE = "base"
RESULTS = "results.jsonl"


@dataclass(frozen=True)
class Cell:
    method: str
    bits: int | None = None
    group_size: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    target_bits: float | None = None  # mixed precision: average bits per weight (qtool.mixed)
    sensitivity: str | None = None  # mixed precision: the cost measure and perturbation (None: defaults)
    perturbation: str | None = None
    mixed_bits: tuple[int, ...] | None = None  # mixed precision: the widths a layer may take (None: the backend's)

    @property
    def id(self) -> str:
        if self.method == BASE:
            return BASE
        parts = [self.method, f"b{self.bits}" if self.bits else "", f"t{self.target_bits:g}" if self.target_bits else "",
                 f"g{self.group_size}" if self.group_size else ""]
        parts += [f"{k}={v}" for k, v in sorted(self.options.items())]
        parts += [p for p in (self.sensitivity, self.perturbation) if p]
        parts += [f"widths{'_'.join(map(str, self.mixed_bits))}"] if self.mixed_bits else []
        return "-".join(p for p in parts if p).replace("/", "_")


class CellEntry(Section):
    """One `cells:` entry; list values expand into their product."""

    method: str = Field(min_length=1)
    bits: PositiveInt | list[PositiveInt] | None = None
    group_size: int | list[int] | None = None
    options: dict[str, OptionValue | list[OptionValue]] = Field(default_factory=dict)
    # mixed precision: each value is one cell whose layers' bits qtool chooses (instead of `bits`)
    target_bits: PositiveFloat | list[PositiveFloat] | None = None
    sensitivity: Literal["fisher", "output", "kl"] | None = None
    perturbation: Literal["rtn", "method"] | None = None
    mixed_bits: list[PositiveInt] | None = None  # the widths a plan may give a layer (qtool quantize --mixed-bits)


class CompareSection(CalibrationFields):
    """A compare recipe's `compare:` section."""

    name: str | None = None
    model: str = Field(min_length=1)
    cells: list[CellEntry] = Field(min_length=1)
    eval: EvalPlan = Field(default_factory=EvalPlan)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: Seed = 0
    description: str = ""
    report: dict[str, Any] = Field(default_factory=dict)  # see qtool.report.ReportSettings


class CompareRecipe(CompareSection):
    """A loaded compare recipe: its name resolved and its cells expanded (base first)."""

    name: str
    cells: list[Cell]


def load_compare_recipe(name_or_path: str) -> CompareRecipe:
    path, body, description = read_recipe_section(name_or_path, "compare")
    section = parse_section(CompareSection, body, f"recipe {path}")
    ReportSettings.from_dict(section.report)
    return CompareRecipe.model_validate({
        **dict(section), "name": section.name or path.stem, "cells": expand_cells(section.cells),
        "description": description or section.description,
    })


def expand_cells(entries: list[CellEntry]) -> list[Cell]:
    """Every combination of each entry's list values; the base cell first, exactly once."""
    cells = [Cell(BASE)]
    for entry in entries:
        axes = [_as_list(entry.bits), _as_list(entry.target_bits), _as_list(entry.group_size),
                *[[(k, v) for v in _as_list(vals)] for k, vals in entry.options.items()]]
        for bits, target, group, *opts in itertools.product(*axes):
            widths = tuple(entry.mixed_bits) if entry.mixed_bits else None
            cell = Cell(entry.method, bits, group, dict(opts), target, entry.sensitivity, entry.perturbation, widths)
            if cell.id not in {c.id for c in cells}:
                cells.append(cell)
    return cells


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def cell_request(recipe: CompareRecipe, cell: Cell, device: str) -> QuantizeRequest:
    """The checked quantize request of one cell: its method, bits, group size and options, the
    recipe's seed, and the recipe's calibration keys when the method calibrates."""
    from qtool import backends
    from qtool.backends.base import parse_options
    from qtool.request import option_strings

    backend = backends.get(cell.method)
    options = parse_options(backend.Options, option_strings(cell.options), cell.method)
    calibrates = backend.calibrates(options) or cell.target_bits is not None  # a plan measures on calibration data
    calibration = recipe.calibration_arguments() if calibrates else {}
    return parse_section(QuantizeRequest, {"method": cell.method, "bits": cell.bits, "group_size": cell.group_size,
                                           "options": cell.options, "seed": recipe.seed, "device": device,
                                           "target_bits": cell.target_bits, "sensitivity": cell.sensitivity,
                                           "perturbation": cell.perturbation,
                                           "mixed_bits": list(cell.mixed_bits) if cell.mixed_bits else None,
                                           **calibration}, "cell", error=SpecError)


def check_recipe(recipe: CompareRecipe, device: str, here: bool = True) -> None:
    """Everything that can fail without weights, for every cell, before the first cell runs.

    The evaluation text must be readable, the plan must fit the model's context, and every
    cell's method, bits, group size, options and calibration must be valid and its backend
    ready on `device`. Raises the QtoolError of the first problem, naming the cell. With
    `here=False` (cells that run on other machines: Slurm) backends and engines are not checked
    for readiness on this one; a cell whose backend is not ready there fails on its own.
    """
    from qtool import backends
    from qtool.data import load_text
    from qtool.models import quantizable_linears, resolve_model

    load_text(recipe.eval.text, purpose="eval")
    config = resolve_model(recipe.model).config()
    linears = quantizable_linears(config)
    recipe.eval = recipe.eval.for_model(config, recipe.model)
    for cell in recipe.cells:
        if cell.method == BASE:
            continue
        try:
            spec = cell_request(recipe, cell, device).spec
            backend = backends.get(cell.method)
            backend.check_model(spec, config)
            backend.check_layers(spec, linears)
            if spec.target:  # a budget no plan meets fails here, not after the cells before it ran
                from qtool.api import mixed_budget

                mixed_budget(backend, spec, config, linears, device)
            if here:
                backend.require_available(device)
        except QtoolError as exc:
            raise type(exc)(f"cell {cell.id}: {exc}") from None
    if recipe.calib:
        load_text(recipe.calib, purpose="calibration")
    if here:
        recipe.eval.check_engines()


RECORD_SECTIONS = {"quantization": dict, "memory": dict, "divergence": dict, "perplexity": dict,
                   "word_perplexity": dict, "speed": list, "engines": dict, "versions": dict}


def read_results(out: Path) -> dict[str, dict[str, Any]]:
    """The last record of each cell in OUT/results.jsonl.

    Lines that are not a result record (a torn last line, an edit by hand, bytes that are not
    UTF-8, sections of the wrong type) are skipped with a warning that counts them.
    """
    path = Path(out) / RESULTS
    latest: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return latest
    skipped = 0
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if _is_result(record):
            latest[record["cell"]] = record
        elif line.strip():
            skipped += 1
    if skipped and latest:  # with no record at all, the caller's error says so in one line
        import logging

        logging.getLogger("qtool").warning(f"{path}: {skipped} lines are not result records; skipped")
    return latest


def _is_result(record: Any) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("cell"), str) and isinstance(record.get("status"), str)
            and all(record.get(key) is None or isinstance(record[key], kind) for key, kind in RECORD_SECTIONS.items()))


def _append(out: Path, record: dict[str, Any]) -> None:
    with open(Path(out) / RESULTS, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def run_compare(recipe: CompareRecipe, out: Path, progress: bool = True, log: Any = None,
                cluster: ClusterSettings | None = None, threads: int | None = None) -> dict[str, dict[str, Any]]:
    """Run every cell not done yet; return the latest record per cell.

    Without `cluster` the cells run one after another in this process, sharing one loaded base
    (`threads`: torch threads for them; None keeps torch's default); with it each cell is a job of
    qtool.cluster (local worker processes or a Slurm job array) and this process appends the
    records as the jobs end.
    """
    from qtool.runtime import resolve_device

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    out = Path(out)
    slurm = cluster is not None and cluster.executor == "slurm"
    if cluster is not None:
        from qtool.cluster import require_executor

        require_executor(cluster)
    device = _slurm_device(recipe, cluster) if slurm else resolve_device(recipe.device)
    check_recipe(recipe, device, here=not slurm)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("models/\n" + ("jobs/\n" if cluster else ""))  # regenerated, never committed
    done = {cell for cell, record in read_results(out).items() if record.get("status") == "ok"}
    todo = [cell for cell in recipe.cells if cell.id not in done]
    for cell in recipe.cells:
        if cell.id in done:
            log(f"[{cell.id}] done already, skipped")
    if not todo:
        return read_results(out)
    if cluster is not None:
        from qtool.cluster import run_cells

        records = run_cells(recipe, todo, out, device, cluster, log)
        try:
            for number, record in enumerate(records, 1):
                _append(out, record)
                log(f"[{record['cell']}] ({number}/{len(todo)}) {_outcome(record)}")
        finally:
            records.close()  # cancels the jobs still running (Ctrl-C)
        return read_results(out)
    from qtool import api
    from qtool.cluster import worker_info

    worker = worker_info("in-process", threads)
    base = api.load(recipe.model, device=device)
    for number, cell in enumerate(todo, 1):
        log(f"[{cell.id}] ({number}/{len(todo)}) quantize and evaluate")
        record = {**cell_record(recipe, cell, base, device, out, progress), "worker": worker}
        _append(out, record)
        log(f"[{cell.id}] {_outcome(record)}")
        gc.collect()
    return read_results(out)


def _outcome(record: dict[str, Any]) -> str:
    worker = record.get("worker") or {}
    where = f" on {worker['host']} pid {worker['pid']}" if worker.get("executor") not in (None, "in-process") else ""
    if record["status"] == "failed":
        return f"failed{where}: {record['error']}"
    return f"ok{where}" + (f" in {record['seconds']} s" if where else "")


def _slurm_device(recipe: CompareRecipe, cluster: ClusterSettings) -> str:
    if recipe.device != "auto":
        return recipe.device
    return "cuda" if cluster.gpus_per_task else "cpu"


def cell_record(recipe: CompareRecipe, cell: Cell, base: Any, device: str, out: Path, progress: bool) -> dict[str, Any]:
    """Quantize (unless OUT/models/CELL is there already) and evaluate one cell against `base`.

    Returns its results.jsonl record: "ok" with the measurements, or "failed" with a one-line
    error (any exception of the cell; the caller goes on with the next cell).
    """
    started = dt.datetime.now(dt.timezone.utc)
    record: dict[str, Any] = {"cell": cell.id, **asdict(cell), "started_utc": started.isoformat(timespec="seconds")}
    try:
        record |= {"status": "ok", **_run_cell(recipe, cell, base, device, out, progress)}
    except Exception as exc:  # noqa: BLE001 - one broken backend must not stop the other cells
        record |= {"status": "failed", "error": failure(exc)}
    record["seconds"] = round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1)
    return record


def failure(exc: BaseException) -> str:
    """The one-line error of a failed cell: a QtoolError's message, else the type and first line."""
    if isinstance(exc, QtoolError):
        return str(exc)
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"


def _run_cell(recipe: CompareRecipe, cell: Cell, base: Any, device: str, out: Path, progress: bool) -> dict[str, Any]:
    from qtool import api
    from qtool.checkpoint import read_record
    from qtool.evaluate.run import as_records, run_plan
    from qtool.runtime import package_versions

    if cell.method == BASE:
        loaded = base
    else:
        folder = out / "models" / cell.id
        if not (folder.exists() and read_record(folder)):
            api.quantize_request(recipe.model, folder, cell_request(recipe, cell, device), force=True)
        loaded = api.load(folder, device=device)
    record = loaded.record or {}
    kept = ("spec", "kernel", "format", "effective_bits_per_weight", "timings_s", "peak_memory_mib",
            "peak_memory_kind", "weights_bytes", "calibration", "reload_check")
    quantization = {k: record[k] for k in kept if k in record}
    if "mixed_precision" in record:  # the plan's summary; its per-group table stays in the cell's qtool.json
        quantization["mixed_precision"] = {k: v for k, v in record["mixed_precision"].items() if k != "groups"}
    result: dict[str, Any] = {"device": loaded.device, "quantization": quantization or None,
                              **as_records(run_plan(recipe.eval, loaded, base, progress))}
    result["memory"]["parameters"] = sum(p.numel() for p in base.model.parameters())
    result["versions"] = package_versions()
    return result
