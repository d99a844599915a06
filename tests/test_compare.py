"""qtool compare and its report: recipe parsing, real cells on the tiny Llama, resume, rendering."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qtool.compare import CellEntry, expand_cells, load_compare_recipe, read_results
from qtool.recipes import RecipeError
from qtool.report import (
    ReportSettings,
    Row,
    pareto_front,
    recommendations,
    rows_from_results,
    write_report,
)
from tests.conftest import assert_one_line_error, interrupt_qtool_when, run_qtool

FIXED_RESULTS = Path(__file__).parent / "data" / "compare-results.jsonl"


def _recipe(tmp_path: Path, model: Path, text: Path, cells: str, extra: str = "") -> Path:
    path = tmp_path / "compare.yaml"
    path.write_text(f"""\
description: tiny mechanics
compare:
  name: tiny
  model: {model}
  device: cpu
  eval:
    text: {text}
    ctx: 64
    max_tokens: 512
{extra}  cells:
{cells}""")
    return path


def test_cells_expand_lists_into_their_product_with_base_first():
    cells = expand_cells([CellEntry.model_validate(entry) for entry in [
        {"method": "rtn", "bits": [4, 3], "group_size": [32, 64]},
        {"method": "gptq", "bits": 4, "group_size": 64, "options": {"sym": [True, False]}},
        {"method": "rtn", "bits": 4, "group_size": 32},  # a repeat is run once
    ]])
    assert [c.id for c in cells] == [
        "base", "rtn-b4-g32", "rtn-b4-g64", "rtn-b3-g32", "rtn-b3-g64", "gptq-b4-g64-sym=True", "gptq-b4-g64-sym=False",
    ]


@pytest.mark.parametrize(("body", "message"), [
    ("  model: m\n  cells: [{method: rtn}]\n  colour: red\n", "unknown key 'colour'"),
    ("  model: m\n  cells: [{method: rtn, bitz: 4}]\n", "unknown key 'cells.0.bitz'"),
    ("  model: m\n  cells: []\n", "cells: List should have at least 1 item"),
    ("  model: m\n  cells: [{bits: 4}]\n", "missing 'cells.0.method'"),
    ("  cells: [{method: rtn}]\n", "missing 'model'"),
    ("  model: m\n  eval: {ctx: 64, speed: {batches: [1]}}\n  cells: [{method: rtn}]\n", "unknown key 'eval.speed.batches'"),
    ("  model: m\n  eval: {ctx: 64, stride: 128}\n  cells: [{method: rtn}]\n", "stride 128 is longer than ctx 64"),
    ("  model: m\n  eval: {max_tokens: -5}\n  cells: [{method: rtn}]\n", "eval.max_tokens: Input should be greater than 0"),
    ("  model: m\n  cells: [{method: rtn, group_size: sixty}]\n", "cells.0.group_size"),
])
def test_bad_recipes_name_the_problem(tmp_path, body, message):
    path = tmp_path / "r.yaml"
    path.write_text("compare:\n" + body)
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_compare_recipe(str(path))


def test_bundled_compare_recipe_parses():
    recipe = load_compare_recipe("compare-smollm2")
    assert recipe.model == "smollm2-135m" and recipe.cells[0].id == "base"
    assert {c.method for c in recipe.cells} >= {"rtn", "hqq", "bnb", "gptq", "awq", "eetq"}
    ReportSettings.from_dict(recipe.report)


def test_compare_runs_cells_isolates_failures_and_resumes(tiny_llama, wikitext_test, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("A calibration text far too short for sixty-four samples of sixty-four tokens. " * 3)
    recipe = _recipe(tmp_path, tiny_llama, wikitext_test, """\
    - {method: rtn, bits: [4, 2], group_size: 32}
    - {method: hqq, bits: 4, group_size: 32}
    - {method: gptq, bits: 4, group_size: 32}
""", extra=f"    speed: {{batch: [1, 2], prompt_len: 8, new_tokens: 3, repeats: 1}}\n  calib: {calib}\n"
           "  nsamples: 64\n  seqlen: 64\n")
    out = tmp_path / "report"
    proc = run_qtool("compare", recipe, "--out", out, "--quiet")
    assert proc.returncode == 1, proc.stderr  # a failed cell makes the run fail, after the others ran
    assert proc.stderr.splitlines()[-1].startswith("qtool: error: 1 of 5 cells failed: gptq-b4-g32")
    results = read_results(out)
    assert list(results) == ["base", "rtn-b4-g32", "rtn-b2-g32", "hqq-b4-g32", "gptq-b4-g32"]
    assert results["gptq-b4-g32"]["status"] == "failed" and "calib" in results["gptq-b4-g32"]["error"]
    ok = [r for r in results.values() if r["status"] == "ok"]
    assert len(ok) == 4
    for record in ok:
        assert record["perplexity"]["protocol"] == "token-ppl" and record["perplexity"]["ctx"] == 64
        assert record["perplexity"]["dataset"]["sha256"] and record["versions"]["torch"]
        assert [s["batch"] for s in record["speed"]] == [1, 2]
    assert results["base"]["divergence"] is None  # the reference itself
    kl = {c: results[c]["divergence"]["kl_mean"] for c in ("rtn-b4-g32", "rtn-b2-g32")}
    assert 0 < kl["rtn-b4-g32"] < kl["rtn-b2-g32"]  # fewer bits, further from the base
    assert results["rtn-b4-g32"]["quantization"]["spec"]["bits"] == 4
    for name in ("report.md", "report.html", "quality_vs_size.png", "speed.png", "memory.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / ".gitignore").read_text().strip() == "models/"
    md = (out / "report.md").read_text()
    assert "| rtn-b2-g32 |" in md and "gptq-b4-g32" in md.split("## Failed cells")[1]

    # Drop the last successful cell's line: a rerun redoes only that cell (and the failed one).
    lines = (out / "results.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["cell"] != "hqq-b4-g32"]
    (out / "results.jsonl").write_text("\n".join(kept) + "\n")
    before = {c: r["started_utc"] for c, r in read_results(out).items()}
    proc = run_qtool("compare", recipe, "--out", out, "--quiet")
    assert proc.returncode == 1, proc.stderr  # the gptq cell fails again
    for cell in ("base", "rtn-b4-g32", "rtn-b2-g32"):
        assert f"[{cell}] done already, skipped" in proc.stderr
    assert "[hqq-b4-g32] (1/2) quantize and evaluate" in proc.stderr
    after = read_results(out)
    assert all(after[c]["started_utc"] == before[c] for c in ("base", "rtn-b4-g32", "rtn-b2-g32"))
    assert after["hqq-b4-g32"]["status"] == "ok"


def test_interrupted_compare_finishes_only_the_missing_cells(tiny_llama, wikitext_test, tmp_path):
    cells = "    - {method: rtn, bits: [8, 7, 6, 5, 4, 3, 2], group_size: 32}\n"
    recipe = _recipe(tmp_path, tiny_llama, wikitext_test, cells)
    out = tmp_path / "report"
    code, stderr = interrupt_qtool_when(["compare", recipe, "--out", out, "--quiet"], lambda: len(read_results(out)) >= 3)
    assert code == 130, stderr
    assert "rerun the same command" in stderr
    first = read_results(out)
    assert 3 <= len(first) < 8, first.keys()
    assert not [p for p in (out / "models").iterdir() if p.name.startswith(".")]  # no half-written checkpoint

    proc = run_qtool("compare", recipe, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("done already, skipped") == len(first)
    final = read_results(out)
    assert len(final) == 8 and all(r["status"] == "ok" for r in final.values())
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 8  # no cell ran twice


def test_report_from_a_fixed_results_file(tmp_path):
    shutil.copy(FIXED_RESULTS, tmp_path / "results.jsonl")
    results = read_results(tmp_path)
    rows = {r.cell: r for r in rows_from_results(results)}
    assert rows["rtn-b4-g32"].status == "ok"  # a failed attempt followed by a success counts as done
    assert rows["bnb-b3"].status == "failed"
    md, page = write_report(results, tmp_path, ReportSettings(ppl_tolerances_pct=[1.0]), title="fixed")
    text = md.read_text()
    base = rows["base"]
    assert f"| base | {base.size_mib:.1f} |" in text
    assert "bnb cannot do 3 bits" in text
    html = page.read_text()
    assert html.count("<img") == 3 and "data:image/png;base64," in html and "<table id='results'>" in html


def test_a_report_names_untimed_cells_and_cells_run_with_other_versions(tmp_path):
    """An emulated format's record says why its speed was not timed (no decode figures in its row),
    and a resumed compare whose later cells ran after an upgrade says which and what differs."""
    records = [json.loads(line) for line in FIXED_RESULTS.read_text().splitlines()]
    for record in records:
        if record["cell"] == "hqq-b4-g32" and record["status"] == "ok":
            record["speed"] = [{"batch": b, "not_measured": "transformers emulates this format"} for b in (1, 8)]
            record["versions"] = {**record["versions"], "transformers": "9.9.9"}
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    results = read_results(tmp_path)
    rows = {r.cell: r for r in rows_from_results(results)}
    assert rows["hqq-b4-g32"].decode == {} and rows["hqq-b4-g32"].ppl is not None and rows["rtn-b4-g32"].decode
    md, _ = write_report(results, tmp_path, ReportSettings(ppl_tolerances_pct=[1.0]), title="resumed")
    text = md.read_text()
    assert "Run with other versions: `hqq-b4-g32`: transformers 9.9.9." in text
    assert text.count("Run with other versions") == 1 and "Versions: python" in text


def test_a_report_column_is_one_entry_naming_a_path_in_the_record(monkeypatch):
    from qtool import report

    rows = {r.cell: r for r in rows_from_results(_read_fixed())}
    monkeypatch.setattr(report, "COLUMNS", [*report.COLUMNS, ("word bits/byte", "word_perplexity.bits_per_byte")])
    cells = report.table_cells(rows["hqq-b4-g32"], rows["base"])
    expected = rows["hqq-b4-g32"].record["word_perplexity"]["bits_per_byte"]
    assert cells[-1] == f"{expected:.1f}" and len(cells) == len(report.COLUMNS)


def _read_fixed() -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(FIXED_RESULTS, Path(folder) / "results.jsonl")
        return read_results(Path(folder))


def _row(cell: str, size: float, ppl: float, decode: float = 10.0, quantize_s: float | None = 5.0) -> Row:
    return Row(cell=cell, method=cell.split("-")[0], status="ok", error=None, size_mib=size, bits_per_weight=4.0,
               ppl=ppl, bpb=1.0, kl_mean=0.1, kl_p99=0.5, top1=0.9, word_ppl=None, decode={1: decode},
               prefill_b1=None, ttft_ms_b1=None, memory_mib=size, peak_generate_mib=None, quantize_s=quantize_s,
               quantize_peak_mib=100.0)


def test_pareto_front_and_recommendations_follow_the_numbers():
    rows = [_row("base", 500, 10.0, decode=5, quantize_s=None), _row("a", 100, 10.1, decode=8, quantize_s=50),
            _row("b", 80, 11.5, decode=20, quantize_s=1), _row("c", 120, 10.05), _row("d", 90, 13.0)]
    assert [r.cell for r in pareto_front(rows)] == ["b", "a", "c", "base"]
    recs = {r.constraint: r for r in recommendations(rows, ReportSettings(ppl_tolerances_pct=[1, 20], size_budgets_mib=[95]))}
    assert recs["smallest within 1 % of base PPL"].cell == "a"
    assert recs["smallest within 20 % of base PPL"].cell == "b"
    assert recs["best quality with weights ≤ 95 MiB"].cell == "b"
    assert recs["fastest decode at batch 1 with weights ≤ 95 MiB"].cell == "b"
    assert recs["cheapest to produce within 20 % of base PPL"].cell == "b"
    none = recommendations(rows, ReportSettings(ppl_tolerances_pct=[0.1], size_budgets_mib=[10]))
    assert none[0].cell is None and "no quantized cell" in none[0].why


def test_report_renders_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        if os.environ.get("QTOOL_REQUIRE_CHROMIUM"):
            pytest.fail("QTOOL_REQUIRE_CHROMIUM is set but no chromium is on PATH")
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    shutil.copy(FIXED_RESULTS, tmp_path / "results.jsonl")
    _, page = write_report(read_results(tmp_path), tmp_path, title="render check")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
                   capture_output=True, timeout=120, check=False)
    assert shot.exists() and shot.stat().st_size > 10_000
    dom = subprocess.run([chromium, *flags, "--dump-dom", "--virtual-time-budget=5000", page.as_uri()],
                         capture_output=True, text=True, timeout=120, check=False).stdout
    assert 'data-images-ok="3/3"' in dom  # every plot decoded in the browser
    assert "<table id=\"results\">" in dom and dom.count("<tr") >= 7


def test_compare_checks_every_cell_and_the_text_before_any_work(tiny_llama, wikitext_test, tmp_path):
    out = tmp_path / "report"
    for cells, text, needle in [
        ("    - {method: rtn, bits: 4, group_size: 32}\n", tmp_path / "missing.txt", "missing.txt"),
        ("    - {method: rtn, bits: 4, group_size: 32}\n    - {method: bnb, bits: 3}\n", wikitext_test,
         "cell bnb-b3: bnb cannot quantize to 3 bits"),
        ("    - {method: rtn, bits: 4, group_size: 48}\n", wikitext_test, "cell rtn-b4-g48: group size 48 does not divide"),
        ("    - {method: int3-magic}\n", wikitext_test, "cell int3-magic: unknown method"),
    ]:
        recipe = _recipe(tmp_path, tiny_llama, text, cells)
        assert_one_line_error(run_qtool("compare", recipe, "--out", out, "--quiet"), needle)
        assert not out.exists()  # nothing quantized, nothing written


def test_compare_errors_are_one_line(tmp_path):
    assert_one_line_error(run_qtool("compare", tmp_path / "nope.yaml"), "neither a file nor a bundled recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("compare:\n  model: m\n  cells: [{method: rtn, bitz: 4}]\n")
    assert_one_line_error(run_qtool("compare", bad), "unknown key 'cells.0.bitz'")
    assert_one_line_error(run_qtool("compare", "compare-smollm2", "--report-only", "--out", tmp_path / "empty"),
                          "no results.jsonl")
