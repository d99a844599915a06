"""Serving engines without the engines: registry, plans, one-line errors, report columns.

What needs an engine's own environment (vLLM, llama.cpp) is in test_engines_live.py, run by
`make test-engines`. Here: what a user meets when an engine is not set up or is broken, and how
engine records become report columns and recommendations.
"""

import os
import stat

import pytest

from qtool import engines
from qtool.engines.external import last_error
from qtool.errors import CheckpointError, EngineError, SpecError
from qtool.evaluate.plan import EvalPlan
from qtool.report import (
    ReportSettings,
    columns,
    deployment_engine,
    recommendations,
    rows_from_results,
    table_cells,
)
from qtool.schema import parse_section
from qtool.serve_check import first_divergence, until_eos
from tests.conftest import assert_one_line_error, run_qtool


@pytest.fixture
def no_engines(tmp_path):
    return {"QTOOL_ENGINES_DIR": str(tmp_path / "engines")}


@pytest.fixture
def broken_vllm(tmp_path):
    """An engine venv whose Python dies on import, as a half-installed vLLM does."""
    python = tmp_path / "engines" / "vllm" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\necho 'Traceback (most recent call last):' >&2\n"
                      "echo \"ModuleNotFoundError: No module named 'vllm'\" >&2\nexit 1\n")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return {"QTOOL_ENGINES_DIR": str(tmp_path / "engines")}


def test_registry_knows_each_engine_and_says_how_to_set_it_up(no_engines, monkeypatch):
    monkeypatch.setenv("QTOOL_ENGINES_DIR", no_engines["QTOOL_ENGINES_DIR"])
    assert engines.ENGINE_NAMES == ("hf", "vllm", "llamacpp")
    status = engines.statuses()
    assert status["hf"] is None
    assert "make engine-vllm" in status["vllm"] and "make engine-llamacpp" in status["llamacpp"]
    with pytest.raises(EngineError, match="unknown engine 'tgi'; engines: hf, vllm, llamacpp"):
        engines.get("tgi")


def test_engines_command_lists_readiness_as_text_and_json(no_engines):
    import json

    proc = run_qtool("engines", env=no_engines)
    assert proc.returncode == 0, proc.stderr
    assert "hf        ready" in proc.stdout and "vllm      not ready" in proc.stdout
    rows = json.loads(run_qtool("engines", "--json", env=no_engines).stdout)
    assert {r["engine"]: r["ready"] for r in rows} == {"hf": True, "vllm": False, "llamacpp": False}


@pytest.mark.parametrize("args", [
    ["serve-check", "{model}", "--engine", "vllm"],
    ["serve-check", "{model}", "--engine", "llamacpp"],
    ["export", "{model}", "--format", "gguf"],
    ["eval", "{model}", "--speed", "--engine", "vllm"],
])
def test_a_missing_engine_is_one_line_with_the_fix(args, tiny_llama, no_engines):
    proc = run_qtool(*[a.format(model=tiny_llama) for a in args], env=no_engines)
    line = assert_one_line_error(proc, "not set up")
    assert "make engine-" in line and "scripts/setup-engine.sh" in line


def test_a_broken_engine_is_one_line_with_its_log(tiny_llama, broken_vllm):
    proc = run_qtool("serve-check", tiny_llama, "--engine", "vllm", "--quiet", env=broken_vllm)
    line = assert_one_line_error(proc, "ModuleNotFoundError: No module named 'vllm'", "log:", "make engine-vllm")
    log = line.split("log: ")[1].split(";")[0]
    assert os.path.exists(log)
    # without --quiet the progress comes first: the engine runs before the reference, so a broken
    # one fails before the reference's generation starts
    lines = run_qtool("serve-check", tiny_llama, "--engine", "vllm", env=broken_vllm).stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"qtool: vllm: loading {tiny_llama}")
    assert lines[1].startswith(f"qtool: error: vllm could not run {tiny_llama}")


def test_serve_check_refuses_what_it_cannot_check(tiny_llama, tmp_path, no_engines):
    assert_one_line_error(run_qtool("serve-check", tmp_path / "nope", "--engine", "vllm", env=no_engines),
                          "does not exist")
    assert_one_line_error(run_qtool("serve-check", tiny_llama, "--engine", "hf"), "invalid choice")
    assert_one_line_error(run_qtool("serve-check", tiny_llama, "--engine", "vllm", "--max-regret", "-1"),
                          "--max-regret must be at least 0")
    assert_one_line_error(run_qtool("serve-check", tiny_llama, "--engine", "vllm", "--new-tokens", "5000"),
                          "--new-tokens must be from 1 to 2047")
    (tmp_path / "p.txt").write_text("What is 2+2?\n")
    assert_one_line_error(run_qtool("serve-check", tiny_llama, "--engine", "vllm", "--prompts", tmp_path / "p.txt",
                                    "--json", tmp_path / "p.txt", env=no_engines), "--json")
    assert (tmp_path / "p.txt").read_text() == "What is 2+2?\n"
    assert_one_line_error(run_qtool("serve-check", tiny_llama, "--engine", "vllm", "--noise-seeds", "0"),
                          "--noise-seeds must be at least 1")
    assert_one_line_error(run_qtool("serve-check", tiny_llama, "--engine", "llamacpp", "--dtype", "float32",
                                    env=no_engines), "--dtype chooses vLLM's dtype")
    (tmp_path / "a-file").write_text("x")  # refused before the engine starts (no_engines: it could not)
    assert_one_line_error(run_qtool("serve-check", tiny_llama, "--engine", "vllm", "--json",
                                    tmp_path / "a-file" / "r.json", env=no_engines), "--json", "cannot be created")


@pytest.mark.parametrize("content, error", [
    (None, "cannot be read: No such file"),
    ("folder", "is a folder"),
    (b"\xff\xfe caf\xe9\n", "is not UTF-8 text"),
    ("\n# only a comment\n   \n", "holds no prompt"),
])
def test_serve_check_refuses_a_bad_prompts_file_before_the_engine_starts(content, error, tiny_llama, tmp_path,
                                                                          no_engines):
    prompts = tmp_path / "prompts.txt"
    if content == "folder":
        prompts.mkdir()
    elif isinstance(content, bytes):
        prompts.write_bytes(content)
    elif content is not None:
        prompts.write_text(content)
    # no_engines: were the file read after the engine's check, the error would be "not set up"
    assert_one_line_error(run_qtool("serve-check", tiny_llama, "--engine", "vllm", "--prompts", prompts,
                                    env=no_engines), "--prompts", error)


def test_a_prompt_too_long_for_the_context_is_refused_before_anything_loads(tiny_llama, tmp_path, broken_vllm):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2+2?\n" + "word " * 3000 + "\n")
    # broken_vllm: the engine counts as set up, so only the tokenizer's count can stop the run before
    # the engine (and its failure) or the reference model; without --quiet, no progress line comes first
    line = assert_one_line_error(run_qtool("serve-check", tiny_llama, "--engine", "vllm", "--prompts", prompts,
                                           env=broken_vllm), "prompt 2 is ", "tokens as a chat turn",
                                 "prompts of at most 2016 tokens fit in serve-check's 2048-token context")
    assert "vllm" not in line


def test_prompts_are_lines_and_must_leave_room_for_the_reply(tmp_path):
    from qtool.serve_check import MAX_CONTEXT, context_for, read_prompts

    (tmp_path / "p.txt").write_text("\ufeff# checked before deploying\r\nWhat is 2+2?\n\n  Name a colour.  \n"
                                    "Translate: a\u2028b\n")
    assert read_prompts(tmp_path / "p.txt") == ["What is 2+2?", "Name a colour.", "Translate: a\u2028b"]
    assert context_for([[1] * 10, [1] * 40], 32) == 40 + 32 + 16
    assert context_for([[1] * (MAX_CONTEXT - 32)], 32) == MAX_CONTEXT
    with pytest.raises(SpecError, match=f"prompt 2 is {MAX_CONTEXT} tokens .* at most {MAX_CONTEXT - 32} tokens fit"):
        context_for([[1] * 10, [1] * MAX_CONTEXT], 32)


def test_the_references_own_noise_bounds_what_an_engine_can_match(tiny_llama):
    """serve-check's yardstick: where transformers' reply changes under noise on its embeddings."""
    from qtool import api, engines
    from qtool.engines import EngineJob
    from qtool.serve_check import PromptCheck, unstable_at

    loaded = api.load(tiny_llama, "cpu")
    job = EngineJob(model=str(tiny_llama), prompts=[[1, 5, 9, 2], [1, 7, 7]], new_tokens=12, max_model_len=32)
    replies = engines.get("hf").run(job, loaded=loaded).tokens
    assert unstable_at(loaded, job, replies, set()) == [None, None]  # fp32-sized noise moves no unquantized reply
    loud = unstable_at(loaded, job, replies, set(), relative=1.0)
    assert any(at is not None for at in loud) and all(at is None or 0 <= at < 12 for at in loud)
    more = unstable_at(loaded, job, replies, set(), relative=1.0, seeds=6)  # seeds 0-2 again, and 3 more draws

    def never(at):
        return float("inf") if at is None else at
    assert all(never(m) <= never(at) for m, at in zip(more, loud, strict=True))  # the earliest over more draws
    assert PromptCheck("p", [1, 2, 3], [1, 2, 4], 2, reference_unstable_at=2).within_reference_noise
    assert not PromptCheck("p", [1, 2, 3], [1, 2, 4], 2, reference_unstable_at=None).within_reference_noise
    assert not PromptCheck("p", [1, 2, 3], [1, 5, 4], 1, reference_unstable_at=2).within_reference_noise


def test_a_failed_check_across_dtypes_names_the_like_for_like_flag():
    from qtool.serve_check import PromptCheck, ServeCheck

    side = {"engine": "vllm", "version": "0", "device": "cpu", "kernel": "k", "quantization": "compressed-tensors"}
    check = ServeCheck("out", "out", side | {"dtype": "bfloat16"}, side | {"engine": "hf", "dtype": "float32"},
                       [PromptCheck("p", [1, 2], [3, 2], 0, regret=[1.5, 0.0])], 1.0, False)
    lines = check.summary().splitlines()
    assert "0 of 1 prompts" in lines[2] and lines[3].startswith("  FAIL")
    assert "--dtype float32 compares like with like" in lines[4]
    assert check.as_dict()["prompts"][0]["within_reference_noise"] is False


def test_export_refuses_a_bad_request_before_any_work(tiny_llama, tmp_path):
    assert_one_line_error(run_qtool("export", tmp_path, "--format", "gguf"), "not a checkpoint folder")
    proc = run_qtool("export", tiny_llama, "--type", "Q9_9")
    assert_one_line_error(proc, "unknown GGUF type Q9_9")
    listed = proc.stderr.split("types: ")[1].strip().split(", ")
    assert "Q8_0" in listed and len(listed) == len(set(listed))  # each type named once
    (tmp_path / "taken.gguf").write_text("user data")
    assert_one_line_error(run_qtool("export", tiny_llama, "--type", "F16", "-o", tmp_path / "taken.gguf"), "--force")
    assert (tmp_path / "taken.gguf").read_text() == "user data"
    assert_one_line_error(run_qtool("export", tiny_llama, "-o", tmp_path / "model.bin"), "ends in .gguf")


def test_plan_engines_need_something_to_measure():
    with pytest.raises(SpecError, match="measure speed or perplexity"):
        parse_section(EvalPlan, {"engines": ["vllm"], "perplexity": False}, "plan", error=SpecError)
    with pytest.raises(SpecError, match="twice"):
        parse_section(EvalPlan, {"engines": ["hf", "hf"]}, "plan", error=SpecError)
    with pytest.raises(SpecError, match="engines"):
        parse_section(EvalPlan, {"engines": ["tgi"]}, "plan", error=SpecError)


def test_divergence_is_counted_up_to_the_reply_end():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2
    assert until_eos([5, 6, 2, 9, 9], {2}) == [5, 6, 2]
    assert until_eos([5, 6], {2}) == [5, 6]


def test_last_error_finds_the_exception_line():
    text = "INFO loading\nTraceback (most recent call last):\n  File x\nValueError: fp32 is not supported\nshutdown\n"
    assert last_error(text) == "ValueError: fp32 is not supported"
    assert last_error("") == "it exited without output"
    pydantic = ("pydantic_core._pydantic_core.ValidationError: 1 validation error for VllmConfig\n"
                "  Value error, Unsupported quantization config: bits=4, sym=False [type=value_error, input=x]\n")
    assert last_error(pydantic).endswith("VllmConfig: Unsupported quantization config: bits=4, sym=False")


def _record(cell, ppl, hf, vllm=None, error=None):
    def speed(batch, tok_s):
        spread = {"median": tok_s, "min": tok_s, "max": tok_s}
        return {"batch": batch, "prompt_tokens": 128, "new_tokens": 32, "repeats": 1, "decode_tokens_per_s": spread,
                "prefill_tokens_per_s": spread, "time_to_first_token_s": spread, "peak_memory_generate_mib": 1.0,
                "peak_memory_kind": "rss"}
    record = {"cell": cell, "method": cell.split("-")[0], "status": "ok", "perplexity": {"ppl": ppl},
              "memory": {"in_memory_bytes": 100 * 2**20 if cell == "base" else 40 * 2**20, "parameters": 10},
              "quantization": None if cell == "base" else {"weights_bytes": 40 * 2**20},
              "speed": [speed(1, hf)]}
    if vllm or error:
        run = {"engine": "vllm", "version": "0.32.0", "device": "cpu", "dtype": "bfloat16", "mode": "eager",
               "threads": 1, "kernel": "CPUWNA16LinearKernel", "peak_memory_mib": 3000.0,
               "speed": [speed(1, vllm)]} if vllm else {"engine": "vllm", "error": error}
        record["engines"] = {"vllm": run}
    return record


def test_report_ranks_speed_in_the_deployment_engine():
    results = {"base": _record("base", 10.0, hf=12.0, vllm=16.0),
               "gptq-b4": _record("gptq-b4", 10.5, hf=2.0, vllm=27.0),
               "hqq-b4": _record("hqq-b4", 10.4, hf=5.0, error="vllm could not run it: unknown quantization")}
    rows = rows_from_results(results)
    assert deployment_engine(rows) == "vllm"
    cols = columns(rows)
    titles = [t for t, _ in cols]
    assert {"decode tok/s hf", "decode tok/s vllm", "peak MiB vllm", "vllm ran"} <= set(titles)
    by_cell = {r.cell: dict(zip(titles, table_cells(r, rows[0], cols), strict=True)) for r in rows}
    assert by_cell["gptq-b4"]["decode tok/s vllm"] == "27.0" and by_cell["gptq-b4"]["decode tok/s hf"] == "2.0"
    assert by_cell["hqq-b4"]["vllm ran"] == "not loaded (see notes)"
    recs = {r.constraint: r for r in recommendations(rows, ReportSettings(size_budgets_mib=[50]))}
    fastest = recs["fastest decode at batch 1 with weights ≤ 50 MiB, in vllm"]
    assert fastest.cell == "gptq-b4"  # in transformers hqq would have won (5.0 vs 2.0 tok/s)
    assert recs["fastest batch-1 decode against the base, in vllm"].why.startswith("1.69× the base")


def test_report_without_engines_keeps_its_columns():
    rows = rows_from_results({"base": _record("base", 10.0, hf=12.0), "a-b4": _record("a-b4", 10.5, hf=2.0)})
    assert deployment_engine(rows) == "hf"
    assert "decode tok/s" in [t for t, _ in columns(rows)]


def test_a_ggufs_tokenizer_comes_without_converting_its_weights(smollm2, tmp_path, monkeypatch):
    """serve-check counts prompt tokens before anything loads: an unconverted GGUF gives its tokenizer
    from the file (the one its conversion saves), and its cache folder is not made."""
    from qtool.models import builtin_gguf_path, tokenizer_of
    from qtool.serve_check import prompt_ids

    link = tmp_path / "model.gguf"
    link.symlink_to(builtin_gguf_path("smollm2-135m"))
    monkeypatch.setenv("QTOOL_CACHE", str(tmp_path / "cache"))
    direct = tokenizer_of(str(link))
    assert not (tmp_path / "cache" / "gguf").exists()
    for prompt in ("What is the capital of France?", "Écris un haïku 🌊"):
        assert prompt_ids(direct, prompt) == prompt_ids(smollm2.load_tokenizer(), prompt)


def test_a_file_that_is_no_gguf_is_one_line_for_llamacpp(tmp_path):
    from qtool.serve_check import reference_of

    (tmp_path / "notes.gguf").write_text("not a model\n")
    with pytest.raises(CheckpointError, match="is not a readable GGUF file"):
        reference_of(tmp_path / "notes.gguf")
