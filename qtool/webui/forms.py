"""Form values → the `qtool` CLI's arguments, and results read back for the page.

No Gradio here: every function takes and returns plain values, so the page's logic is tested
without a browser. Validation is the CLI's own: a form builds the argv a user would type and the
job prints the CLI's one-line error, so the page and the terminal cannot disagree. Numbers that
are not whole stay as typed (`4.5` for bits) for the CLI to refuse, never silently rounded. Flag
values are passed as `--flag=value` and positional arguments after `--`, so a value that starts
with `-` is a value, never a flag.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

OPTION_HEADERS = ["option", "value", "default", "choices", "help"]
CELL_HEADERS = ["method", "bits", "group_size", "options", "target_bits", "mixed_bits", "sensitivity", "perturbation"]
RESULT_HEADERS = ["cell", "status", "weights MiB", "bits/weight", "token PPL", "ΔPPL", "error"]
PREVIEW_ROWS = 5


class JobFile(str):
    """An argument naming a file the job folder will hold (e.g. the recipe a form wrote); the job
    replaces it with the file's path. Form text is never such an argument."""


# ---- methods -------------------------------------------------------------------------------------

def methods_table(device: str = "cpu") -> list[list[str]]:
    """`qtool methods` as rows: method, ready, bits, calibration, and what it is or why not / the fix."""
    from qtool.backends import available, get

    rows = []
    for r in available(device):
        bits = ",".join(map(str, r.capabilities.bits)) if r.capabilities else ""
        backend = get(r.name)
        calib = ("with " + " or ".join(backend.calibrating_options) if backend.calibrating_options
                 else "yes" if r.capabilities and r.capabilities.needs_calibration else "no")
        rows.append([r.name, "ready" if r.ready else "not ready", bits, calib, r.summary if r.ready else r.reason])
    return rows


def method_names() -> list[str]:
    from qtool.backends import known_methods

    return list(known_methods())


def option_rows(method: str) -> list[list[str]]:
    """One editable row per field of the method's `Options` dataclass (value starts at the default)."""
    from qtool.backends import get
    from qtool.backends.base import option_help

    try:
        backend = get(method)
    except Exception:  # an unknown name typed into the box: the CLI says so when the job starts
        return []
    return [[o["name"], _text(o["default"]), _text(o["default"]), ", ".join(map(str, o.get("choices", []))), o["help"]]
            for o in option_help(backend.Options)]


# ---- quantize ------------------------------------------------------------------------------------

def quantize_argv(model: str, out: str, method: str, bits: Any = None, group_size: Any = None,
                  options: list[list[Any]] | None = None, calib: str = "", nsamples: Any = None,
                  seqlen: Any = None, target_bits: Any = None, force: bool = False, mixed_bits: Any = None) -> list[str]:
    """`qtool quantize` arguments: only what the user set; an option row is passed as --opt KEY=VALUE
    when its value differs from its default."""
    argv = ["quantize", f"--method={_str(method)}"]
    argv += flag("--bits", bits) + flag("--group-size", group_size) + flag("--target-bits", target_bits)
    argv += flag("--mixed-bits", mixed_bits)
    for row in options or []:
        name, value, default = (list(row) + ["", "", ""])[:3]
        if str(name).strip() and _text(value) != _text(default):
            argv.append(f"--opt={str(name).strip()}={_text(value)}")
    argv += flag("--calib", calib) + flag("--nsamples", nsamples) + flag("--seqlen", seqlen)
    if force:
        argv.append("--force")
    return argv + ["--", _str(model), _str(out)]


def quantize_card(root: Path, out: str) -> tuple[str, dict[str, Any] | None]:
    """The result card of a finished quantize: (markdown, the qtool.json record)."""
    from qtool.checkpoint import read_record
    from qtool.errors import QtoolError

    try:
        record = read_record(Path(root) / out)
    except QtoolError:  # a corrupt qtool.json: the job's own log says what went wrong
        record = None
    if record is None:
        return "", None
    spec = record.get("spec", {})
    mixed = record.get("mixed_precision")
    width = f"mixed, average {mixed['average_bits']:.3f} bits" if mixed else f"{spec.get('bits')}-bit"
    lines = [f"### {out}", f"- **method**: {spec.get('method')} {width}, group size {spec.get('group_size')}",
             f"- **weights**: {record.get('weights_bytes', 0) / 2**20:.1f} MiB",
             f"- **time to quantize**: {record.get('timings_s', {}).get('quantize', 0):.1f} s",
             f"- **peak memory**: {record.get('peak_memory_mib', 0):.0f} MiB"]
    return "\n".join(lines), record


# ---- compare -------------------------------------------------------------------------------------

def recipe_names(kind: str) -> list[str]:
    """Bundled recipes whose file holds a `kind` section (compare, qlora, quantize)."""
    from qtool.recipes import bundled_dir

    names = []
    for path in sorted(bundled_dir("recipes").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if kind in data:
            names.append(path.stem)
    return names


def recipe_cells(recipe: str) -> list[list[str]]:
    """A compare recipe's cells, one row each (base left out: it is always run)."""
    from qtool.compare import BASE, load_compare_recipe

    cells = load_compare_recipe(recipe).cells
    return [[c.method, _text(c.bits), _text(c.group_size), _options_text(c.options), _text(c.target_bits),
             ",".join(map(str, c.mixed_bits or ())), _text(c.sensitivity), _text(c.perturbation)]
            for c in cells if c.method != BASE]


def compare_argv(recipe: str, out: str, rows: list[list[Any]] | None, eval_text: str = "") -> tuple[list[Any], dict[str, str]]:
    """(argv, files for the job folder): the recipe as it is, or, when the cells were edited or
    `eval_text` replaces its evaluation text, a copy written as `recipe.yaml` into the job folder."""
    from qtool.recipes import find_recipe, read_recipe_section

    rows = [r for r in (rows or []) if any(_text(v) for v in r)]
    head = ["compare", *flag("--out", out), "--"]
    if not _str(recipe):
        return [*head, ""], {}
    try:
        unchanged = rows == recipe_cells(recipe) or not rows
    except Exception:  # an unreadable recipe: the CLI gives the one line
        return [*head, _str(recipe)], {}
    if unchanged and not _str(eval_text):
        return [*head, _str(recipe)], {}
    path, section, description = read_recipe_section(recipe, "compare")
    section["name"] = section.get("name") or find_recipe(recipe).stem
    if rows:
        section["cells"] = [_cell_entry(r) for r in rows]
    if _str(eval_text):
        section["eval"] = {**(section.get("eval") or {}), "text": _str(eval_text)}
    text = yaml.safe_dump({"description": f"{description} (cells edited in qtool webui)".strip(),
                           "compare": section}, sort_keys=False)
    return [*head, JobFile("recipe.yaml")], {"recipe.yaml": text}


def cell_results(root: Path, out: str, recipe: str | None = None, running: bool = False) -> list[list[str]]:
    """The cells recorded so far in OUT/results.jsonl (the report's own rows), in the order they
    finished; with `recipe`, its cells not recorded yet follow as pending (the first one as running
    while the job runs)."""
    from qtool.compare import load_compare_recipe, read_results
    from qtool.report import rows_from_results

    folder = Path(root) / _str(out)
    rows = rows_from_results(read_results(folder)) if _str(out) and folder.is_dir() else []
    base = next((r.ppl for r in rows if r.cell == "base"), None)
    table = [[r.cell, r.status, _fmt(r.size_mib, 1, ".1f"), _fmt(r.bits_per_weight, 1, ".2f"), _fmt(r.ppl, 1, ".2f"),
              f"{100 * (r.ppl / base - 1):+.1f} %" if r.ppl and base else "", str(r.error or "")[:200]]
             for r in rows]
    try:
        local = Path(root) / recipe if recipe else None
        cells = load_compare_recipe(str(local) if local and local.is_file() else recipe).cells if recipe else []
    except Exception:  # the job reports an unreadable recipe itself
        cells = []
    done = {r.cell for r in rows}
    waiting = [c.id for c in cells if c.id not in done]
    return table + [[cell, "running" if running and i == 0 else "pending", "", "", "", "", ""]
                    for i, cell in enumerate(waiting)]


def report_view(root: Path, folder: str) -> tuple[str, list[str]]:
    """(report.md without its image lines, the plots beside it) of a compare report folder.
    Raises FileNotFoundError with one line when the folder has no report.md."""
    path = Path(root) / _str(folder)
    md = path / "report.md"
    if not _str(folder) or not md.is_file():
        raise FileNotFoundError(f"{folder or '(no folder)'} has no report.md: run the compare first, "
                                "or name a folder that `qtool compare` wrote")
    text = "\n".join(line for line in md.read_text().splitlines()
                     if not line.startswith("![") and line.strip() != "## Plots")  # the plots are shown beside it
    plots = [str(p) for p in sorted(path.glob("*.png"))]
    return text, plots


# ---- fine-tune -----------------------------------------------------------------------------------

QLORA_FIELDS = ["model", "method", "bits", "group_size", "dataset", "format", "r", "alpha",
                "learning_rate", "epochs", "max_steps", "batch_size"]


def qlora_form(recipe: str) -> dict[str, Any]:
    """A qlora recipe's main keys as form fields (the dataset path made absolute), plus the whole
    section under `_section` for the keys the form does not show."""
    from qtool.recipes import read_recipe_section

    path, section, _ = read_recipe_section(recipe, "qlora")
    quant = section.get("quantization") or {}
    data = dict(section.get("dataset") or {})
    if data.get("path") and not Path(data["path"]).is_absolute() and (path.parent / data["path"]).exists():
        data["path"] = str((path.parent / data["path"]).resolve())
    lora, train = section.get("lora") or {}, section.get("train") or {}
    section["dataset"] = data
    return {"model": section.get("model", ""), "method": quant.get("method", ""), "bits": quant.get("bits"),
            "group_size": quant.get("group_size"), "dataset": data.get("path", ""),
            "format": data.get("format", "alpaca"), "r": lora.get("r", 16), "alpha": lora.get("alpha", 32),
            "learning_rate": train.get("learning_rate", 2e-4), "epochs": train.get("epochs", 3),
            "max_steps": train.get("max_steps"), "batch_size": train.get("batch_size", 4), "_section": section}


def qlora_recipe_text(fields: dict[str, Any], section: dict[str, Any] | None = None) -> str:
    """A qlora recipe YAML from the form's fields over `section` (the loaded recipe's other keys).
    Values go in as typed (numbers that are whole become ints); the recipe schema checks them."""
    section = json.loads(json.dumps(section or {}))
    section["model"] = _str(fields.get("model"))
    quant = {k: _value(fields.get(k)) for k in ("method", "bits", "group_size") if _text(fields.get(k))}
    if quant:
        section["quantization"] = {**(section.get("quantization") or {}), **quant}
    else:
        section.pop("quantization", None)
    section["dataset"] = {**(section.get("dataset") or {}), "path": _str(fields.get("dataset")),
                          "format": _str(fields.get("format")) or "alpaca"}
    section["lora"] = {**(section.get("lora") or {}), "r": _value(fields.get("r")), "alpha": _value(fields.get("alpha"))}
    train = {**(section.get("train") or {}), "learning_rate": _value(fields.get("learning_rate")),
             "epochs": _value(fields.get("epochs")), "batch_size": _value(fields.get("batch_size"))}
    train.pop("max_steps", None)
    if _text(fields.get("max_steps")):
        train["max_steps"] = _value(fields.get("max_steps"))
    section["train"] = train
    section.pop("out", None)  # the form's run folder is passed as --out
    return yaml.safe_dump({"description": "written by qtool webui", "qlora": section}, sort_keys=False)


def dataset_preview(path: str, rows: int = PREVIEW_ROWS) -> list[dict[str, Any]]:
    """The first `rows` records of a .jsonl/.json dataset (or lines of a text file).
    Raises FileNotFoundError / ValueError with one line."""
    file = Path(_str(path)).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"dataset {path or '(empty)'} is not a file")
    if file.suffix == ".jsonl":
        out = []
        with open(file, encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        out.append(_record(json.loads(line)))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"dataset {path} line {number} is not JSON ({exc.msg})") from None
                if len(out) >= rows:
                    break
        return out
    if file.suffix == ".json":
        try:
            data = json.loads(file.read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"dataset {path} is not JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(data, list):
            raise ValueError(f"dataset {path} is a JSON {type(data).__name__}, not a list of records")
        return [_record(r) for r in data[:rows]]
    with open(file, encoding="utf-8", errors="replace") as fh:
        return [{"text": line.rstrip("\n")} for _, line in zip(range(rows), fh, strict=False)]


def loss_points(root: Path, out: str) -> list[dict[str, float]]:
    """(step, loss, split) points from OUT/train_log.jsonl: training and validation losses."""
    log = Path(root) / _str(out) / "train_log.jsonl"
    points = []
    if not _str(out) or not log.is_file():
        return points
    for line in log.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written
        for key, split in (("loss", "train"), ("eval_loss", "validation")):
            if isinstance(row.get(key), (int, float)):
                points.append({"step": row["step"], "loss": row[key], "split": split})
    return points


# ---- merge / export ------------------------------------------------------------------------------

def merge_argv(base: str, adapter: str, out: str, requantize: str = "", bits: Any = None,
               group_size: Any = None, force: bool = False) -> list[str]:
    argv = ["merge", *flag("--requantize", requantize), *flag("--bits", bits), *flag("--group-size", group_size)]
    return argv + (["--force"] if force else []) + ["--", _str(base), _str(adapter), _str(out)]


def export_argv(folder: str, fmt: str, type_: str = "", output: str = "", force: bool = False) -> list[str]:
    argv = ["export", f"--format={_str(fmt) or 'gguf'}", *flag("--type", type_), *flag("--output", output)]
    return argv + (["--force"] if force else []) + ["--", _str(folder)]


# ---- helpers -------------------------------------------------------------------------------------

def flag(name: str, value: Any) -> list[str]:
    """`--name=value` (one word, so a value starting with '-' stays a value), or nothing when empty."""
    return [f"{name}={_text(value)}"] if _text(value) else []


def _text(value: Any) -> str:
    """A form value as the CLI would get it typed: None → '', 4.0 → '4', True → 'true'."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _str(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _value(value: Any) -> Any:
    """A form value for YAML: numbers as numbers, whole floats as ints, text as text."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            return value
    return value


def _options_text(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_text(v)}" for k, v in options.items())


def _cell_entry(row: list[Any]) -> dict[str, Any]:
    method, bits, group, options, target, widths, sensitivity, perturbation = (list(row) + [""] * 8)[:8]
    entry: dict[str, Any] = {"method": _str(method)}
    for key, value in (("bits", bits), ("group_size", group), ("target_bits", target), ("sensitivity", sensitivity),
                       ("perturbation", perturbation)):
        if _text(value):
            entry[key] = _value(_text(value))
    if _text(widths):
        entry["mixed_bits"] = [_value(w.strip()) for w in _text(widths).split(",") if w.strip()]
    opts = {}
    for item in _str(options).split(","):
        key, sep, val = item.partition("=")
        if key.strip():
            opts[key.strip()] = _value(val.strip()) if sep else None
    if opts:
        entry["options"] = opts
    return entry


def _record(row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        return {"text": json.dumps(row)}
    return {k: v if isinstance(v, (str, int, float)) else json.dumps(v) for k, v in row.items()}


def _fmt(value: Any, scale: float, spec: str) -> str:
    return format(value / scale, spec) if isinstance(value, (int, float)) else ""
