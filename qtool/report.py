"""Compare reports: results.jsonl → report.md, a self-contained report.html, and PNG plots.

Every sentence of the recommendations is computed from the numbers in results.jsonl (thresholds
come from the recipe's `report:` settings); nothing is hand-written per run. The HTML embeds its
images as data URIs, so the single file can be mailed or attached to a ticket.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, PositiveFloat

from qtool.checkpoint import emulated
from qtool.schema import Section, parse_section

PLOTS = {"quality_vs_size": "quality_vs_size.png", "speed": "speed.png", "memory": "memory.png"}


class ReportSettings(Section):
    """A compare recipe's `report:` section: thresholds of the recommendations."""

    ppl_tolerances_pct: list[PositiveFloat] = Field(default_factory=lambda: [2.0, 5.0, 10.0])
    size_budgets_mib: list[PositiveFloat] | None = None  # default: 50 % and 30 % of the base model's size
    title: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ReportSettings:
        return parse_section(cls, data, "recipe, report")


@dataclass(frozen=True)
class Row:
    """One cell's numbers, flattened for tables and plots (None where not measured)."""

    cell: str
    method: str
    status: str
    error: str | None
    size_mib: float | None  # weights files; the base: its tensors as loaded
    bits_per_weight: float | None
    ppl: float | None
    bpb: float | None
    kl_mean: float | None
    kl_p99: float | None
    top1: float | None
    word_ppl: float | None
    decode: dict[int, float]  # batch -> median decode tokens/s in transformers (engine hf)
    prefill_b1: float | None
    ttft_ms_b1: float | None
    memory_mib: float | None  # weights in memory
    peak_generate_mib: float | None  # largest batch
    quantize_s: float | None
    quantize_peak_mib: float | None
    record: dict[str, Any] = field(default_factory=dict, repr=False)  # the cell's result record as compare wrote it
    engine_decode: dict[str, dict[int, float]] = field(default_factory=dict)  # engine -> batch -> decode tokens/s

    def decode_in(self, engine: str) -> dict[int, float]:
        """batch -> median decode tokens/s in `engine` (hf: transformers in qtool's process)."""
        return self.decode if engine == "hf" else self.engine_decode.get(engine, {})


def rows_from_results(results: dict[str, dict[str, Any]]) -> list[Row]:
    """One Row per cell; a record whose numbers are not where a qtool compare writes them is skipped
    with a warning (a results.jsonl edited by hand)."""
    rows = []
    for cell, r in results.items():
        try:
            rows.append(_row(cell, r))
        except (TypeError, KeyError, AttributeError, ValueError, IndexError):
            import logging

            logging.getLogger("qtool").warning(f"the result of cell {cell} is malformed; left out of the report")
    return rows


def _row(cell: str, r: dict[str, Any]) -> Row:
    ok = r.get("status") == "ok"
    q = (r.get("quantization") or {}) if ok else {}
    mem = r.get("memory") or {}
    ppl = r.get("perplexity") or {}
    div = r.get("divergence") or {}
    words = r.get("word_perplexity") or {}
    speed = timed(r.get("speed"))
    # quantized cells: their weights files; the base: its tensors as loaded, what saving it would write
    if q.get("weights_bytes"):
        size = q["weights_bytes"] / 2**20
    elif ok and mem.get("in_memory_bytes"):
        size = mem["in_memory_bytes"] / 2**20
    else:
        size = None
    params = mem.get("parameters")
    by_batch = {s["batch"]: s for s in speed}
    b1 = by_batch.get(1)
    return Row(
        cell=cell, method=r.get("method", "?"), status=r.get("status", "?"), error=r.get("error"),
        size_mib=size, bits_per_weight=q.get("effective_bits_per_weight") or (
            8 * mem["in_memory_bytes"] / params if ok and cell == "base" and params else None),
        ppl=ppl.get("ppl"), bpb=ppl.get("bpb"), kl_mean=div.get("kl_mean") if div else (0.0 if ok and cell == "base" else None),
        kl_p99=div.get("kl_p99"), top1=div.get("top1_agreement"), word_ppl=words.get("word_perplexity"),
        decode={b: s["decode_tokens_per_s"]["median"] for b, s in sorted(by_batch.items())},
        prefill_b1=b1["prefill_tokens_per_s"]["median"] if b1 else None,
        ttft_ms_b1=1000 * b1["time_to_first_token_s"]["median"] if b1 else None,
        memory_mib=mem["in_memory_bytes"] / 2**20 if mem.get("in_memory_bytes") else None,
        peak_generate_mib=by_batch[max(by_batch)]["peak_memory_generate_mib"] if by_batch else None,
        quantize_s=sum(q["timings_s"].values()) if q.get("timings_s") else None,
        quantize_peak_mib=q.get("peak_memory_mib"),
        record=r,
        engine_decode={name: {e["batch"]: e["decode_tokens_per_s"]["median"] for e in timed(run.get("speed"))}
                       for name, run in (r.get("engines") or {}).items()},
    )


def timed(entries: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The speed entries of a record that carry timings, without {"batch", "not_measured"} ones (a
    format transformers only emulates, a batch size an engine cannot run)."""
    return [e for e in entries or [] if "decode_tokens_per_s" in e]


def pareto_front(rows: list[Row]) -> list[Row]:
    """Cells no other cell beats on both size and PPL (smaller and better), by size."""
    points = sorted((r for r in rows if r.size_mib is not None and r.ppl is not None), key=lambda r: (r.size_mib, r.ppl))
    front, best = [], float("inf")
    for row in points:
        if row.ppl < best:
            front.append(row)
            best = row.ppl
    return front


@dataclass(frozen=True)
class Recommendation:
    constraint: str
    cell: str | None
    why: str


def recommendations(rows: list[Row], settings: ReportSettings) -> list[Recommendation]:
    ok = [r for r in rows if r.status == "ok" and r.ppl is not None]
    base = next((r for r in ok if r.cell == "base"), None)
    if base is None:
        return [Recommendation("any", None, "the base cell has no result, so nothing can be compared with it")]
    quantized = [r for r in ok if r.cell != "base"]
    out: list[Recommendation] = []

    def within(pct: float) -> list[Row]:
        return [r for r in quantized if r.ppl <= base.ppl * (1 + pct / 100)]

    def delta(r: Row) -> str:
        return f"PPL {r.ppl:.2f} ({100 * (r.ppl / base.ppl - 1):+.1f} % vs base {base.ppl:.2f})"

    for pct in settings.ppl_tolerances_pct:
        pick = min(within(pct), key=lambda r: (r.size_mib, r.ppl), default=None)
        out.append(Recommendation(
            f"smallest within {pct:g} % of base PPL", pick and pick.cell,
            f"{pick.size_mib:.1f} MiB of weights, {delta(pick)}" if pick else f"no quantized cell is within {pct:g} %",
        ))
    engine = deployment_engine(rows)
    where = "" if engine == "hf" else f", in {engine}"
    budgets = settings.size_budgets_mib or [round(base.size_mib * f, 1) for f in (0.5, 0.3)]
    for budget in budgets:
        fits = [r for r in quantized if r.size_mib is not None and r.size_mib <= budget]
        pick = min(fits, key=lambda r: r.ppl, default=None)
        out.append(Recommendation(
            f"best quality with weights ≤ {budget:g} MiB", pick and pick.cell,
            f"{delta(pick)}, {pick.size_mib:.1f} MiB" if pick else f"no cell fits in {budget:g} MiB",
        ))
        batches = sorted({b for r in fits for b in r.decode_in(engine)})
        if batches:
            batch = batches[-1]
            fast = max((r for r in fits if batch in r.decode_in(engine)), key=lambda r: r.decode_in(engine)[batch])
            out.append(Recommendation(
                f"fastest decode at batch {batch} with weights ≤ {budget:g} MiB{where}", fast.cell,
                f"{fast.decode_in(engine)[batch]:.1f} tokens/s (base "
                f"{base.decode_in(engine).get(batch, float('nan')):.1f}), {delta(fast)}",
            ))
    for name in engines_in(rows):
        base_b1 = base.decode_in(name).get(1)
        faster = [r for r in quantized if base_b1 and r.decode_in(name).get(1)]
        pick = max(faster, key=lambda r: r.decode_in(name)[1], default=None)
        if pick:
            ratio = pick.decode_in(name)[1] / base_b1
            out.append(Recommendation(
                f"fastest batch-1 decode against the base, in {name}", pick.cell,
                f"{ratio:.2f}× the base ({pick.decode_in(name)[1]:.1f} vs {base_b1:.1f} tokens/s), {delta(pick)}"))
    loose = max(settings.ppl_tolerances_pct)
    timed = [r for r in within(loose) if r.quantize_s is not None]
    pick = min(timed, key=lambda r: r.quantize_s, default=None)
    out.append(Recommendation(
        f"cheapest to produce within {loose:g} % of base PPL", pick and pick.cell,
        f"{pick.quantize_s:.0f} s to quantize, peak {pick.quantize_peak_mib:.0f} MiB, {delta(pick)}" if pick
        else f"no quantized cell is within {loose:g} %",
    ))
    return out


DEPLOYMENT_ENGINES = ("vllm", "llamacpp")  # preferred, in order, over transformers' eager loop (hf)


def engines_in(rows: list[Row]) -> list[str]:
    """The engines with decode numbers in any row: hf first, then the others in DEPLOYMENT_ENGINES order."""
    found = {"hf"} if any(r.decode for r in rows) else set()
    found |= {name for r in rows for name, speeds in r.engine_decode.items() if speeds}
    return [e for e in ("hf", *DEPLOYMENT_ENGINES) if e in found] + sorted(found - {"hf", *DEPLOYMENT_ENGINES})


def deployment_engine(rows: list[Row]) -> str:
    """The engine whose speeds rank the cells: a serving engine when one was measured, else hf."""
    return next((e for e in DEPLOYMENT_ENGINES if e in engines_in(rows)), "hf")


def plot(rows: list[Row], folder: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.status == "ok"]
    paths = {}
    points = [r for r in ok if r.size_mib is not None and r.ppl is not None]
    if points:
        fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
        front = pareto_front(points)
        ax.scatter([r.size_mib for r in points], [r.ppl for r in points], color="#4477aa", zorder=3)
        ax.plot([r.size_mib for r in front], [r.ppl for r in front], color="#cc3311", drawstyle="steps-post",
                label="Pareto front", zorder=2)
        plot_mixed_curves(ax, points)
        for r in points:
            ax.annotate(r.cell, (r.size_mib, r.ppl), textcoords="offset points", xytext=(4, 4), fontsize=7)
        base = next((r for r in points if r.cell == "base"), None)
        if base:
            ax.axhline(base.ppl, color="grey", linestyle=":", label=f"base PPL {base.ppl:.2f}")
        ax.set_xlabel("weights (MiB, as saved; base as loaded)")
        ax.set_ylabel("token perplexity (lower is better)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("Quality vs size")
        paths["quality_vs_size"] = _save(fig, folder / PLOTS["quality_vs_size"])
    timed = [r for r in ok if r.decode or any(r.engine_decode.values())]
    if timed:
        series = [(e, b) for e in engines_in(timed) for b in sorted({b for r in timed for b in r.decode_in(e)})]
        fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
        width = 0.8 / len(series)
        for i, (engine, batch) in enumerate(series):
            ax.bar([x + i * width for x in range(len(timed))], [r.decode_in(engine).get(batch, 0) for r in timed], width,
                   label=f"{engine}, batch {batch}")
        ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(timed))], [r.cell for r in timed],
                      rotation=35, ha="right", fontsize=8)
        ax.set_yscale("log" if len(series) > 1 else "linear")
        ax.set_ylabel("decode tokens/s (median)")
        ax.set_title("Decode speed")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        paths["speed"] = _save(fig, folder / PLOTS["speed"])
    sized = [r for r in ok if r.memory_mib is not None]
    if sized:
        fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
        xs = range(len(sized))
        ax.bar([x - 0.2 for x in xs], [r.memory_mib for r in sized], 0.4, label="weights in memory")
        ax.bar([x + 0.2 for x in xs], [r.peak_generate_mib or 0 for r in sized], 0.4, label="peak while generating")
        ax.set_xticks(list(xs), [r.cell for r in sized], rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("MiB")
        ax.set_title("Memory")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        paths["memory"] = _save(fig, folder / PLOTS["memory"])
    return paths


def is_mixed(row: Row) -> bool:
    return bool((row.record.get("quantization") or {}).get("mixed_precision"))


def plot_mixed_curves(ax: Any, points: list[Row]) -> None:
    """Per method with mixed-precision cells: their curve over size, and the method's uniform
    (one bit-width) cells marked next to it."""
    colors = iter(["#228833", "#aa3377", "#ee7733", "#66ccee"])
    for method in sorted({r.method for r in points if is_mixed(r)}):
        color = next(colors, "#777777")
        mixed = sorted((r for r in points if r.method == method and is_mixed(r)), key=lambda r: r.size_mib)
        ax.plot([r.size_mib for r in mixed], [r.ppl for r in mixed], color=color, marker="o", zorder=4,
                label=f"{method} mixed precision (qtool plan)")
        uniform = [r for r in points if r.method == method and not is_mixed(r)]
        if uniform:
            ax.scatter([r.size_mib for r in uniform], [r.ppl for r in uniform], color=color, marker="s", s=50,
                       facecolors="none", zorder=5, label=f"{method} uniform bits")


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# (title, what): a Row attribute, or a dotted path into the cell's result record
# (e.g. "word_perplexity.bits_per_byte"), which is all a new metric's column needs.
COLUMNS = [
    ("cell", "cell"), ("weights MiB", "size_mib"), ("bits/w", "bits_per_weight"), ("token PPL", "ppl"), ("ΔPPL", None),
    ("bits/byte", "bpb"), ("KL mean", "kl_mean"), ("KL p99", "kl_p99"), ("top-1 agree", "top1"),
    ("lm-eval word PPL", "word_ppl"), ("decode tok/s", None), ("prefill tok/s b1", "prefill_b1"),
    ("TTFT ms b1", "ttft_ms_b1"), ("MiB in memory", "memory_mib"), ("peak MiB generating", "peak_generate_mib"),
    ("quantize s", "quantize_s"), ("quantize peak MiB", "quantize_peak_mib"),
]


def columns(rows: list[Row]) -> list[tuple[str, str | None]]:
    """COLUMNS, with the decode column named after transformers and, per serving engine measured,
    its decode speeds, peak memory and how it ran the cell (kernel, weights' types)."""
    out: list[tuple[str, str | None]] = []
    extra = [e for e in engines_in(rows) if e != "hf"]
    for title, attr in COLUMNS:
        if title == "decode tok/s" and extra:
            out.append(("decode tok/s hf", None))
            for engine in extra:
                out += [(f"decode tok/s {engine}", None), (f"peak MiB {engine}", f"engines.{engine}.peak_memory_mib"),
                        (f"{engine} ran", f"engines.{engine}")]
        else:
            out.append((title, attr))
    return out


def _ran(run: dict[str, Any] | None) -> str:
    if not run:
        return "—"
    if run.get("error"):
        return "not loaded (see notes)"
    kernel = run.get("kernel") or ""
    return f"{run.get('dtype')}; {kernel}" if kernel and run.get("engine") == "vllm" else str(run.get("dtype"))


def table_cells(row: Row, base: Row | None, cols: list[tuple[str, str | None]] | None = None) -> list[str]:
    cells = []
    for _title, attr in cols or COLUMNS:
        if _title == "ΔPPL":
            cells.append(f"{100 * (row.ppl / base.ppl - 1):+.1f} %" if base and row.ppl and base.ppl else "—")
        elif _title.startswith("decode tok/s"):
            engine = _title.removeprefix("decode tok/s").strip() or "hf"
            cells.append(" / ".join(f"{v:.1f}" for v in row.decode_in(engine).values()) or "—")
        elif _title.endswith(" ran"):
            cells.append(_ran(_dig(row.record, attr or "")))
        else:
            cells.append(_fmt(attr, getattr(row, attr) if hasattr(row, attr) else _dig(row.record, attr)))
    return cells


def engine_notes(rows: list[Row]) -> list[str]:
    """One line per cell an engine could not load, with the engine's reason."""
    return [f"`{r.cell}` in {name}: {run['error']}" for r in rows if r.status == "ok"
            for name, run in (r.record.get("engines") or {}).items() if isinstance(run, dict) and run.get("error")]


def _dig(record: dict[str, Any], path: str) -> Any:
    value: Any = record
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _fmt(attr: str, value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if attr == "top1":
        return f"{100 * value:.1f} %"
    if attr in ("kl_mean", "kl_p99", "bpb"):
        return f"{value:.4f}"
    if attr in ("ppl", "word_ppl", "bits_per_weight"):
        return f"{value:.2f}"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


@dataclass
class Report:
    title: str
    rows: list[Row]
    recommendations: list[Recommendation]
    protocol: list[str]
    plots: dict[str, Path]

    @property
    def base(self) -> Row | None:
        return next((r for r in self.rows if r.cell == "base" and r.status == "ok"), None)


def build_report(results: dict[str, dict[str, Any]], folder: Path, settings: ReportSettings, title: str,
                 recipe_note: str = "") -> Report:
    rows = rows_from_results(results)
    return Report(title=settings.title or title, rows=rows, recommendations=recommendations(rows, settings),
                  protocol=protocol_lines(results, recipe_note), plots=plot(rows, folder))


def protocol_lines(results: dict[str, dict[str, Any]], recipe_note: str) -> list[str]:
    ok = [r for r in results.values() if r.get("status") == "ok"]
    if not ok:
        return []
    first = ok[0]
    p = first.get("perplexity") or {}
    ds = p.get("dataset") or {}
    lines = [
        f"Token perplexity: protocol `{p.get('protocol')}`, ctx {p.get('ctx')}, stride {p.get('stride')}, "
        f"{p.get('tokens_scored')} tokens scored of `{Path(str(ds.get('origin', '?'))).name}` "
        f"(sha256 {str(ds.get('sha256', '?'))[:12]}…, first {ds.get('max_tokens') or 'all'} tokens).",
        "Weights MiB: the weights files of each quantized checkpoint (tensors left unquantized are stored in the "
        "compute dtype); the base: its tensors as loaded. bits/w: the quantized layers' bits per weight, scales included.",
        "KL: next-token KL(base ‖ model) in nats on the same windows; top-1: share of positions where both argmaxes agree.",
    ]
    emulations = [name for name, r in results.items() if r.get("status") == "ok" and emulated(r.get("quantization"))]
    if emulations:
        lines.append("Evaluated by emulation (their qtool.json `kernel`): " + ", ".join(f"`{n}`" for n in emulations)
                     + ": weights decompressed to dense, activations and KV cache quantize-dequantized on the fly; "
                     "quality only, no speed of the format in transformers.")
    words = first.get("word_perplexity")
    if words:
        lines.append(f"Word perplexity: lm-evaluation-harness {words['harness']} `{words['metric']}` "
                     f"(loglikelihood_rolling, max length {words['max_length']}, {words['documents']} documents). "
                     "Word PPL and token PPL are different protocols: compare each only within its own column.")
    speed = next((timed(row.get("speed")) for row in ok if timed(row.get("speed"))), [])  # emulated cells: none
    if speed:
        s = speed[0]
        lines.append(f"Speed in hf (transformers' eager loop in qtool's process): {s['prompt_tokens']}-token prompt + "
                     f"{s['new_tokens']} greedy tokens, median of "
                     f"{s['repeats']} runs after a warm-up, on {s['device']}; decode column = batch "
                     f"{' / '.join(str(x['batch']) for x in speed)}. Memory peak: {s['peak_memory_kind']}.")
    for name, run in (first.get("engines") or {}).items():
        if not isinstance(run, dict) or run.get("error"):
            continue
        entries = timed(run.get("speed"))
        lines.append(
            f"Speed in {name} {run.get('version')} on {run.get('device')}: {run.get('mode')}, threads "
            f"{run.get('threads')}; "
            + (f"{entries[0]['prompt_tokens']}-token prompt + {entries[0]['new_tokens']} greedy tokens (EOS ignored), "
               f"median of {entries[0]['repeats']} after a warm-up; " if entries else "")
            + "decode tok/s = batch × (new tokens − 1) / (time to all tokens − time to the first); each run "
            "prefills (no prefix cache). Peak MiB: resident memory of the engine's process tree over load and "
            "all runs. " + ("Kernel per cell in its 'ran' column." if name == "vllm" else
                            f"Kernel: {run.get('kernel')}; weight types per cell in its 'ran' column.")
            + (" Not measured: " + "; ".join(f"batch {e['batch']} ({e['not_measured']})" for e in run.get("speed")
                                              if "not_measured" in e) if any("not_measured" in e for e in
                                                                              run.get("speed") or []) else ""))
    versions = first.get("versions") or {}
    if versions:
        lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
        lines += _other_versions(results, versions)
    if recipe_note:
        lines.append(recipe_note)
    return lines


def _other_versions(results: dict[str, dict[str, Any]], first: dict[str, str]) -> list[str]:
    """One line per set of cells whose packages differ from the first cell's (a resumed compare
    whose later cells ran after an upgrade), naming the differing versions (a package the first
    cell did not load is no difference)."""
    groups: dict[str, list[str]] = {}
    for name, r in results.items():
        versions = r.get("versions") or {}
        differ = ", ".join(f"{k} {v}" for k, v in versions.items() if k in first and first[k] != v)
        if r.get("status") == "ok" and differ:
            groups.setdefault(differ, []).append(f"`{name}`")
    return [f"Run with other versions: {', '.join(cells)}: {differ}." for differ, cells in groups.items()]


def write_markdown(report: Report, path: Path) -> Path:
    base = report.base
    lines = [f"# {report.title}", "", "## Recommendations", ""]
    lines += [f"- **{r.constraint}**: {f'`{r.cell}`' if r.cell else 'none'} — {r.why}" for r in report.recommendations]
    cols = columns(report.rows)
    lines += ["", "## Results", "", "| " + " | ".join(t for t, _ in cols) + " |", "|" + "---|" * len(cols)]
    for row in [r for r in report.rows if r.status == "ok"]:
        lines.append("| " + " | ".join(table_cells(row, base, cols)) + " |")
    notes = engine_notes(report.rows)
    if notes:
        lines += ["", "## Engine notes", ""] + [f"- {n}" for n in notes]
    failed = [r for r in report.rows if r.status != "ok"]
    if failed:
        lines += ["", "## Failed cells", ""] + [f"- `{r.cell}`: {r.error}" for r in failed]
    lines += ["", "## Plots", ""] + [f"![{name}]({p.name})" for name, p in report.plots.items()]
    lines += ["", "## Protocol", ""] + [f"- {line}" for line in report.protocol]
    path.write_text("\n".join(lines) + "\n")
    return path


_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
table{border-collapse:collapse;font-size:.85rem;margin:1rem 0}th,td{border:1px solid #ccc;padding:.3rem .5rem;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left;font-family:monospace}
tr.front td:first-child{font-weight:bold}img{max-width:100%;margin:.5rem 0;border:1px solid #eee}
.failed{color:#a00}code{background:#f5f5f5;padding:0 .2rem}
"""
# Marks the body once every image has decoded, so a headless browser can check the report renders.
_SCRIPT = """window.addEventListener('load',()=>{const i=[...document.images];
document.body.dataset.imagesOk=i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length});"""


def write_html(report: Report, path: Path) -> Path:
    esc = html.escape
    base = report.base
    front = {r.cell for r in pareto_front([r for r in report.rows if r.status == "ok"])}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(report.title)}</title>",
             f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body>", f"<h1>{esc(report.title)}</h1>",
             "<h2>Recommendations</h2><ul>"]
    for r in report.recommendations:
        parts.append(f"<li><b>{esc(r.constraint)}</b>: {f'<code>{esc(r.cell)}</code>' if r.cell else 'none'} — {esc(r.why)}</li>")
    parts.append("</ul><h2>Results</h2><table id='results'><thead><tr>")
    cols = columns(report.rows)
    parts += [f"<th>{esc(t)}</th>" for t, _ in cols]
    parts.append("</tr></thead><tbody>")
    for row in [r for r in report.rows if r.status == "ok"]:
        cls = " class='front'" if row.cell in front else ""
        parts.append(f"<tr{cls}>" + "".join(f"<td>{esc(c)}</td>" for c in table_cells(row, base, cols)) + "</tr>")
    parts.append("</tbody></table><p>Bold cells lie on the quality-vs-size Pareto front.</p>")
    notes = engine_notes(report.rows)
    if notes:
        parts.append("<h2>Engine notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    failed = [r for r in report.rows if r.status != "ok"]
    if failed:
        parts.append("<h2>Failed cells</h2><ul>")
        parts += [f"<li class='failed'><code>{esc(r.cell)}</code>: {esc(r.error or '')}</li>" for r in failed]
        parts.append("</ul>")
    parts.append("<h2>Plots</h2>")
    for name, png in report.plots.items():
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='{esc(name)}' src='data:image/png;base64,{data}'></figure>")
    parts.append("<h2>Protocol</h2><ul>" + "".join(f"<li>{esc(line)}</li>" for line in report.protocol) + "</ul>")
    parts.append("</body></html>")
    path.write_text("".join(parts))
    return path


def write_report(results: dict[str, dict[str, Any]], folder: Path, settings: ReportSettings | None = None,
                 title: str = "qtool compare", recipe_note: str = "") -> tuple[Path, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report = build_report(results, folder, settings or ReportSettings(), title, recipe_note)
    return write_markdown(report, folder / "report.md"), write_html(report, folder / "report.html")

