"""qtool webui: the form logic, every action through gradio_client, and the page in headless Chromium.

The server runs in this process on a free port with a temporary working folder; its jobs are real
`qtool` processes on the tiny Llama (the chat tab also answers with the real SmolLM2-135M).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytest.importorskip("gradio", reason="the webui extra is not installed: pip install 'qtool[webui]'")

from qtool.webui import forms, jobs  # noqa: E402

from .conftest import REPO, assert_one_line_error, run_qtool  # noqa: E402

REPORT = REPO / "reports" / "smollm2-cpu"  # a committed compare report
IDENTITY = REPO / "recipes" / "data" / "identity.jsonl"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama):
    from gradio_client import Client

    from qtool.webui import app

    root = tmp_path_factory.mktemp("webui-root")
    port = _free_port()
    demo = app.launch(root, port=port, allowed=[REPO / "reports"], block=False)
    url = f"http://127.0.0.1:{port}/"
    yield SimpleNamespace(url=url, root=root, tiny=tiny_llama, client=Client(url, verbose=False))
    demo.close()


def _wait(server, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = server.client.predict(job_id, api_name="/job")
        if st["state"] != "running" or time.monotonic() > deadline:
            return st
        time.sleep(0.5)


def _quantize(server, model, out, method="rtn", bits=4, group=32, options=None, target="", force=False):
    options = options if options is not None else server.client.predict(method, api_name="/options")
    result = server.client.predict(model, out, method, bits, group, target, "", options, "", "", "", force,
                                   api_name="/quantize")
    assert result[-1] == "", result[-1]  # no error before the job started
    return result[0]


# ---- forms: no server --------------------------------------------------------------------------

def test_quantize_form_passes_only_what_was_set_and_keeps_what_the_cli_must_refuse():
    rows = forms.option_rows("gptq")
    assert [r[0] for r in rows][:2] == ["sym", "desc_act"] and all(r[1] == r[2] for r in rows)
    rows[0][1] = "false"
    argv = forms.quantize_argv("m", "o", "gptq", 4.0, 64.0, rows, "builtin", "16", "", "3.5", False)
    assert argv == ["quantize", "--method=gptq", "--bits=4", "--group-size=64", "--target-bits=3.5",
                    "--opt=sym=false", "--calib=builtin", "--nsamples=16", "--", "m", "o"]
    assert forms.quantize_argv("m", "o", "gptq", None, 64, None, "", "", "", "4.5", False, "3,4,5")[2:5] == [
        "--group-size=64", "--target-bits=4.5", "--mixed-bits=3,4,5"]
    assert forms.quantize_argv("m", "o", "rtn", 4.5)[2] == "--bits=4.5"  # not rounded: the CLI refuses it
    assert forms.quantize_argv("--force", "-o", "rtn")[-3:] == ["--", "--force", "-o"]  # values, never flags
    assert forms.option_rows("no-such-method") == []


def test_compare_form_runs_the_recipe_or_an_edited_copy(tmp_path):
    rows = forms.recipe_cells("compare-smollm2")
    assert rows[0] == ["eetq", "8", "", "", "", "", "", ""] and ["gptq", "4", "64", "sym=false", "", "", "", ""] in rows
    assert forms.compare_argv("compare-smollm2", "r", rows) == (["compare", "--out=r", "--", "compare-smollm2"], {})
    argv, files = forms.compare_argv("compare-smollm2", "r", [["rtn", "4", "32", "sym=true"]])
    assert argv == ["compare", "--out=r", "--", "recipe.yaml"] and isinstance(argv[-1], forms.JobFile)
    edited = yaml.safe_load(files["recipe.yaml"])["compare"]
    assert edited["cells"] == [{"method": "rtn", "bits": 4, "group_size": 32, "options": {"sym": True}}]
    assert edited["model"] == "smollm2-135m" and edited["name"] == "smollm2-cpu"
    _, files = forms.compare_argv("compare-smollm2", "r", [["gptq", "", "64", "", "4.5", "3, 4,5", "output", ""]])
    assert yaml.safe_load(files["recipe.yaml"])["compare"]["cells"] == [
        {"method": "gptq", "group_size": 64, "target_bits": 4.5, "mixed_bits": [3, 4, 5], "sensitivity": "output"}]
    _, files = forms.compare_argv("compare-smollm2", "r", rows, eval_text="builtin")  # another evaluation text
    edited = yaml.safe_load(files["recipe.yaml"])["compare"]
    assert edited["eval"]["text"] == "builtin" and edited["eval"]["ctx"] == 512 and len(edited["cells"]) == len(rows)


def test_qlora_form_round_trips_through_the_recipe_schema(tmp_path):
    from qtool.finetune.recipe import load_qlora_recipe

    fields = forms.qlora_form("qlora-identity-hqq4")
    assert fields["method"] == "hqq" and Path(fields["dataset"]) == IDENTITY.resolve()
    fields.update(model="other-model", bits="3", max_steps="5", learning_rate=0.002)
    path = tmp_path / "r.yaml"
    path.write_text(forms.qlora_recipe_text({k: fields[k] for k in forms.QLORA_FIELDS}, fields["_section"]))
    recipe = load_qlora_recipe(str(path))
    assert (recipe.model, recipe.quantization.bits, recipe.train.max_steps) == ("other-model", 3, 5)
    assert recipe.train.learning_rate == 0.002 and recipe.dataset.cutoff_len == 256  # kept from the recipe
    assert forms.dataset_preview(str(IDENTITY), 2)[0]["instruction"] == "Who are you?"
    with pytest.raises(FileNotFoundError, match="is not a file"):
        forms.dataset_preview(str(tmp_path / "none.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2 is not JSON"):
        forms.dataset_preview(str(tmp_path / "bad.jsonl"))


def test_webui_command_refuses_bad_input_in_one_line(tmp_path):
    from .conftest import env_without

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(run_qtool("webui", "--port", port), f"cannot serve on 127.0.0.1:{port}", "--port")
    assert_one_line_error(run_qtool("webui", "--root", tmp_path / "none"), "--root", "is not a folder")
    assert_one_line_error(run_qtool("webui", "--allow", tmp_path / "none"), "--allow", "is not a folder")
    assert_one_line_error(run_qtool("webui", "--port", "70000"), "--port takes 1..65535")
    assert_one_line_error(run_qtool("webui", "--port", _free_port(), env=env_without("gradio", tmp_path)),
                          "qtool webui needs Gradio", "pip install 'qtool[webui]'")


def test_a_job_killed_without_an_exit_code_is_lost_not_running(tmp_path):
    import signal

    job = jobs.start(tmp_path, "quantize", ["methods"], "killed", None)
    pid = json.loads((jobs.jobs_root(tmp_path) / job / "job.json").read_text())["pid"]
    os.killpg(pid, signal.SIGKILL)
    st = jobs.wait(tmp_path, job, timeout=30)
    assert st.state == "lost" and st.exit_code is None
    with pytest.raises(FileNotFoundError, match="no job 'nope'"):
        jobs.status(tmp_path, "nope")


# ---- actions through gradio_client ----------------------------------------------------------------

def test_methods_and_options_come_from_the_registry(server):
    table = server.client.predict(api_name="/methods")["data"]
    assert {r[0] for r in table} >= {"rtn", "hqq", "gptq", "eetq"}
    assert all(r[1] in ("ready", "not ready") and r[4] for r in table)
    no_gpu = [r for r in forms.methods_table("cuda") if r[1] == "not ready"]  # no GPU here: why, and the fix
    assert no_gpu and all(r[4] for r in no_gpu)
    hqq = server.client.predict("hqq", api_name="/options")["data"]
    from qtool.backends import get
    from qtool.backends.base import option_help

    assert [r[0] for r in hqq] == [o["name"] for o in option_help(get("hqq").Options)]


def test_quantize_job_writes_a_checkpoint_and_bad_input_is_the_clis_one_line(server):
    job = _quantize(server, str(server.tiny), "out/rtn4")
    st = _wait(server, job)
    assert st["state"] == "done" and st["progress"] == 1.0, st["log_tail"]
    assert (server.root / "out" / "rtn4" / "qtool.json").is_file()
    card, record = forms.quantize_card(server.root, "out/rtn4")
    assert "MiB" in card and record["spec"]["bits"] == 4

    for bits, out, needle in ((9, "out/bad", "cannot quantize to 9 bits"), (4, "out/rtn4", "already exists")):
        st = _wait(server, _quantize(server, str(server.tiny), out, bits=bits))
        cli = assert_one_line_error(run_qtool("quantize", "--method", "rtn", "--bits", bits, "--group-size", 32,
                                              server.tiny, server.root / out), needle)
        assert st["state"] == "failed" and st["error"] == cli.replace(str(server.root / out), out)
    assert not (server.root / "out" / "bad").exists()  # nothing half-written
    assert not [p for p in (server.root / "out").iterdir() if p.name not in ("rtn4",)]


def test_form_values_never_reach_a_shell_or_become_flags(server):
    st = _wait(server, _quantize(server, "x; touch pwned", "out/$(touch pwned2)"))
    assert st["state"] == "failed" and st["error"].startswith("qtool: error:")
    assert not list(server.root.rglob("pwned*"))
    st = _wait(server, _quantize(server, "--force", "out/x"))  # a model named like a flag is a model name
    assert st["state"] == "failed" and "model --force is not a local folder" in st["error"], st["error"]
    st = _wait(server, _quantize(server, str(server.tiny), "{job}/x"))  # no placeholder in form text
    assert st["state"] == "done" and (server.root / "{job}" / "x" / "qtool.json").is_file()
    with pytest.raises(Exception, match="no job '../..'"):
        server.client.predict("../..", api_name="/job")


def _qlora_values(server, max_steps: str) -> list:
    # model, quantize with, bits, group, dataset, format, r, alpha, learning rate, epochs, max steps, batch
    return [str(server.tiny), "rtn", "4", "32", str(IDENTITY), "alpaca", 8, 16, 1e-3, 1, max_steps, 2]


def test_jobs_outlive_the_page_a_new_client_reattaches_stop_is_ctrl_c_and_resume_continues(server):
    from gradio_client import Client

    job = server.client.predict("runs/long", False, *_qlora_values(server, "400"), api_name="/qlora")[0]
    checkpoints = server.root / "runs" / "long" / "checkpoints"
    deadline = time.monotonic() + 180
    while not list(checkpoints.glob("checkpoint-*")) and time.monotonic() < deadline:
        time.sleep(0.5)
    fresh = Client(server.url, verbose=False)  # another page: it lists the running job
    assert job in fresh.predict(api_name="/jobs")["qlora"]
    assert fresh.predict(job, api_name="/job")["state"] == "running"
    assert fresh.predict(job, api_name="/qlora_cancel") == "stopping: Ctrl-C sent"
    st = _wait(server, job)
    assert st["state"] == "interrupted" and "--resume" in st["log_tail"], st["log_tail"]
    last = max(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    resumed = fresh.predict(job, str(last + 2), api_name="/qlora_resume")[0]  # the job's own command
    st = _wait(server, resumed)
    assert st["state"] == "done", st["log_tail"]
    record = json.loads((server.root / "runs" / "long" / "qtool.json").read_text())
    assert record["resumed_from"] == f"checkpoint-{last}" and record["steps"] == last + 2


def test_compare_with_edited_cells_then_its_report_in_the_page(server, wikitext_test):
    recipe = server.root / "tiny-compare.yaml"
    recipe.write_text(f"compare:\n  name: tiny\n  model: {server.tiny}\n  device: cpu\n  eval:\n"
                      f"    text: {wikitext_test}\n    ctx: 64\n    max_tokens: 256\n"
                      "  cells:\n    - {method: rtn, bits: [4, 3], group_size: 32}\n")
    cells, out, error = server.client.predict(str(recipe), api_name="/compare_cells")
    assert error == "" and cells["data"] == [["rtn", "4", "32", *[""] * 5], ["rtn", "3", "32", *[""] * 5]]
    result = server.client.predict(str(recipe), "reports/tiny",
                                   {"headers": forms.CELL_HEADERS, "data": [["rtn", "2", "32", *[""] * 5]]},
                                   api_name="/compare")
    st = _wait(server, result[0])
    assert st["state"] == "done", st["log_tail"]
    rows = forms.cell_results(server.root, "reports/tiny", st["argv"][1])
    assert [r[0] for r in rows] == ["base", "rtn-b2-g32"] and all(r[1] == "ok" for r in rows)
    pending = forms.cell_results(server.root, "reports/tiny", str(recipe), running=True)  # the unedited recipe
    assert [r[:2] for r in pending[2:]] == [["rtn-b4-g32", "running"], ["rtn-b3-g32", "pending"]]
    text, plots, error = server.client.predict(str(server.root / "reports/tiny"), api_name="/report")
    assert error == "" and "## Results" in text and "rtn-b2-g32" in text and plots
    _, _, error = server.client.predict("/etc", api_name="/report")
    assert "outside the folders this page may read" in error


def test_fine_tune_then_chat_with_the_adapter_then_merge(server):
    fields = server.client.predict("qlora-identity-hqq4", api_name="/qlora_form")
    assert fields[0] == "smollm2-135m" and fields[-1] == ""
    preview, error = server.client.predict(str(IDENTITY), api_name="/dataset_preview")
    assert error == "" and preview["data"][0][0] == "Who are you?"
    _, error = server.client.predict("/etc/passwd", api_name="/dataset_preview")
    assert "dataset /etc/passwd is outside the folders this page may read" in error
    result = server.client.predict("runs/id", False, *_qlora_values(server, "4"), api_name="/qlora")
    st = _wait(server, result[0])
    assert st["state"] == "done", st["log_tail"]
    assert forms.loss_points(server.root, "runs/id") and (server.root / "runs/id/adapter/adapter_config.json").is_file()

    status, switch, error = server.client.predict(str(server.root / "runs/id/base"),
                                                  f"me={server.root / 'runs/id'}", 8, api_name="/chat_load")
    assert error == "" and "adapters: me" in status
    for model, tokens, needle in ((server.tiny, -5, "positive whole number"), (server.tiny, 4096, "does not fit"),
                                  ("/nonexistent/model", 8, "does not exist")):
        *_, error = server.client.predict(str(model), "", tokens, api_name="/chat_load")
        assert needle in error, error
    history, message, error = server.client.predict("Who are you?", [], "me", api_name="/chat")  # still loaded
    assert error == "" and message == "" and [m["role"] for m in history] == ["user", "assistant"]
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="not in the list of choices"):  # the switch offers only what is loaded
        server.client.predict("Hi", [], "nobody", api_name="/chat")

    merged = server.client.predict(str(server.root / "runs/id/base"), str(server.root / "runs/id"), "out/merged",
                                   "rtn", "4", "32", False, api_name="/merge")
    st = _wait(server, merged[0])
    assert st["state"] == "done" and (server.root / "out/merged/qtool.json").is_file(), st["log_tail"]
    exported = server.client.predict("out/merged", "compressed-tensors", "", "", False, api_name="/export")
    st = _wait(server, exported[0])
    assert st["state"] == "done" and (server.root / "out/merged-ct/config.json").is_file(), st["log_tail"]


# ---- the page in a browser ----------------------------------------------------------------------

def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        if os.environ.get("QTOOL_REQUIRE_CHROMIUM"):
            pytest.fail("QTOOL_REQUIRE_CHROMIUM is set but no chromium is on PATH")
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    return path


def _not_blank(png: Path) -> None:
    from PIL import Image, ImageStat

    image = Image.open(png).convert("L")
    assert image.size[0] >= 800 and ImageStat.Stat(image).stddev[0] > 10, f"{png} looks blank"


def _fill(page, elem_id: str, text: str) -> None:
    """Type into a Gradio textbox and wait until the page holds the value (a tab renders its
    components when first shown, which can reset a value typed too early)."""
    from playwright.sync_api import expect

    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    for _ in range(5):
        box.fill(text)
        page.wait_for_timeout(300)
        if box.input_value() == text:
            break
    expect(box).to_have_value(text)


def test_the_page_in_headless_chromium(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    shots = Path(os.environ.get("QTOOL_WEBUI_SHOTS") or tmp_path / "shots")  # set it to keep the screenshots
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(server.url)
        expect = sync_api.expect
        expect(page.locator("#methods-table")).to_contain_text("rtn", timeout=30_000)
        page.screenshot(path=shots / "methods.png", full_page=True)

        page.get_by_role("tab", name="Quantize").click()
        _fill(page, "q-model", str(server.tiny))
        _fill(page, "q-out", "out/from-browser")
        page.locator("#q-start").click()
        expect(page.locator("#q-card")).to_contain_text("out/from-browser", timeout=120_000)
        expect(page.locator("#q-card")).to_contain_text("MiB")
        page.screenshot(path=shots / "quantize.png", full_page=True)
        page.locator("#q-start").click()  # the same OUT again: the CLI's one line, in the page
        expect(page.locator("#quantize-state")).to_contain_text("qtool: error: output out/from-browser already exists",
                                                                timeout=120_000)
        page.reload()  # the page re-attaches to the newest job
        page.get_by_role("tab", name="Quantize").click()
        expect(page.locator("#quantize-state")).to_contain_text("already exists", timeout=30_000)

        page.get_by_role("tab", name="Chat").click()
        page.locator("#h-load").click()  # the built-in SmolLM2-135M
        expect(page.locator("#h-status")).to_contain_text("loaded smollm2-135m", timeout=180_000)
        _fill(page, "h-message", "What is the capital of France?")
        page.locator("#h-send").click()
        expect(page.locator("#h-bot")).to_contain_text("Paris", timeout=120_000)
        page.screenshot(path=shots / "chat.png", full_page=True)

        page.get_by_role("tab", name="Compare").click()
        _fill(page, "c-folder", str(REPORT))
        page.locator("#c-open").click()
        expect(page.locator("#c-report")).to_contain_text("Recommendations", timeout=30_000)
        page.locator("#c-plots").scroll_into_view_if_needed()  # the gallery loads its images lazily
        page.wait_for_function("() => [...document.querySelectorAll('#c-plots img')]"
                               ".filter(i => i.complete && i.naturalWidth > 0).length >= 3", timeout=30_000)
        page.screenshot(path=shots / "compare.png", full_page=True)

        for tab in ("Fine-tune", "Merge / export"):
            page.get_by_role("tab", name=tab).click()
            page.screenshot(path=shots / f"{tab.split()[0].lower()}.png", full_page=True)
        browser.close()
    for png in shots.iterdir():
        _not_blank(png)
    assert (server.root / "out/from-browser/qtool.json").is_file()
