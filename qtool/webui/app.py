"""The page: one tab per job a user does with qtool, laid out with Gradio Blocks.

Long actions (quantize, compare, fine-tune, merge, export) start a background job (`jobs`) and a
timer reads its state back, so a reloaded page, or a second browser, re-attaches to the newest
job of each kind. Chat runs in the server (`chat`). Every action is also an API endpoint
(`gradio_client`: docs/webui.md lists them), and every error is shown as the CLI's own one line.
Gradio serves files only from the working folder and the folders given with --allow.
"""

from __future__ import annotations

import functools
import html
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine

import gradio as gr  # noqa: E402

from qtool.webui import chat, forms, jobs  # noqa: E402

POLL_S = 1.0
KINDS = {"quantize": "Quantize", "compare": "Compare", "qlora": "Fine-tune", "merge": "Merge", "export": "Export"}


def build(root: Path, allowed: list[Path] | None = None, device: str = "cpu") -> gr.Blocks:
    """The Blocks app for working folder `root` (jobs, outputs and relative paths live there)."""
    from qtool.resources import bundled_dir

    root = Path(root).resolve()
    serve_roots = [root, *[Path(p).resolve() for p in allowed or []]]
    readable = [*serve_roots, bundled_dir("recipes").resolve()]  # the bundled recipes' data is qtool's own

    def error_line(exc: BaseException) -> str:
        from qtool.errors import describe_library_error

        message = describe_library_error(exc) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"qtool: error: {message}"

    def guarded(n_outputs: int) -> Callable:
        """Turn a user error into the CLI's one line in the tab's error box (the last output); the
        other `n_outputs` outputs are left as they are."""
        def wrap(fn: Callable) -> Callable:
            @functools.wraps(fn)
            def inner(*args: Any) -> Any:
                try:
                    result = fn(*args)
                except Exception as exc:  # the page's boundary, as the CLI's main() is the terminal's
                    return (*[gr.update() for _ in range(n_outputs)], _error_md(error_line(exc)))
                return (*(result if isinstance(result, tuple) else (result,)), "")
            return inner
        return wrap

    def check_readable(path: Path, what: str) -> None:
        """The page shows file contents only from the working folder, --allow folders and qtool's own."""
        resolved = path.resolve()
        if not any(resolved == r or r in resolved.parents for r in readable):
            raise PermissionError(f"{what} {path} is outside the folders this page may read ({root}"
                                  + "".join(f", {p}" for p in serve_roots[1:]) + "; start it with --allow DIR)")

    with gr.Blocks(title="qtool", analytics_enabled=False) as demo:
        gr.Markdown("# qtool\nQuantize, compare, fine-tune and chat. Every action runs what the `qtool` "
                    f"command would; jobs and relative paths live in `{root}`.")
        panels: dict[str, dict[str, Any]] = {}

        def job_panel(kind: str) -> dict[str, Any]:
            with gr.Group():
                with gr.Row():
                    job = gr.Dropdown(label=f"{KINDS[kind]} job", choices=jobs.list_jobs(root, kind), value=None,
                                      interactive=True, allow_custom_value=True, scale=4, elem_id=f"{kind}-job")
                    cancel = gr.Button("Stop (Ctrl-C)", scale=1, variant="stop")
                bar = gr.HTML(_bar(None), elem_id=f"{kind}-progress")
                state = gr.Markdown("", elem_id=f"{kind}-state")
                with gr.Accordion("log and status JSON", open=False):
                    log = gr.Textbox(label="log (last lines)", lines=10, max_lines=10, autoscroll=True)
                    info = gr.JSON(label="status")
            panel = {"job": job, "bar": bar, "state": state, "log": log, "info": info}
            panels[kind] = panel
            cancel.click(lambda j: "stopping: Ctrl-C sent" if j and jobs.cancel(root, j) else "that job is not running",
                         job, state, api_name=f"{kind}_cancel")
            job.focus(lambda: gr.update(choices=jobs.list_jobs(root, kind)), None, job, api_visibility="private")
            return panel

        def panel_outputs(p: dict[str, Any]) -> list[Any]:
            return [p["bar"], p["state"], p["log"], p["info"]]

        def panel_values(job_id: str | None) -> tuple[Any, ...]:
            if not job_id:
                return _bar(None), "", "", None
            try:
                st = jobs.status(root, job_id)
            except FileNotFoundError as exc:
                return _bar(None), _error_md(f"qtool: error: {exc}"), "", None
            words = {"running": "running", "done": "done", "failed": "failed", "interrupted": "stopped",
                     "lost": "lost (the process ended without an exit code)"}
            command = _escape(" ".join(["qtool", *st.argv]).replace("`", "'"))
            text = f"`{command}`: **{words[st.state]}** after {st.seconds:.0f} s"
            if st.error:
                text += "\n\n" + _error_md(st.error)
            elif st.state in ("failed", "lost"):
                text += "\n\n" + _error_md(f"qtool: error: the job ended with exit code {st.exit_code}; see its log")
            return _bar(st.progress, st.state), text, st.log_tail, st.__dict__

        def follow(panel: dict[str, Any], refresh: Callable, extra: tuple = ()) -> None:
            """Re-read the panel's job (and `extra` outputs) every POLL_S seconds and when another job is picked."""
            timer = gr.Timer(POLL_S)
            for trigger in (timer.tick, panel["job"].change):
                trigger(refresh, panel["job"], [*panel_outputs(panel), *extra], show_progress="hidden",
                        api_visibility="private")

        def start_job(kind: str, argv: list[str], title: str, out: str | None, files: dict[str, str] | None = None) -> tuple:
            job_id = jobs.start(root, kind, argv, title, out, files)
            return (job_id, *panel_values(job_id))

        # ---- Methods ---------------------------------------------------------------------------
        with gr.Tab("Methods", id="methods"):
            gr.Markdown("Which quantization methods work on this machine, and for those that do not, why and how to fix it "
                        "(what `qtool methods` prints).")
            methods = gr.Dataframe(headers=["method", "state", "bits", "calibration", "what it is / why not and the fix"],
                                   value=lambda: forms.methods_table(device), interactive=False, wrap=True,
                                   elem_id="methods-table")
            gr.Button("Refresh").click(lambda: forms.methods_table(device), None, methods, api_name="methods")

        # ---- Quantize --------------------------------------------------------------------------
        with gr.Tab("Quantize", id="quantize"):
            with gr.Row():
                q_model = gr.Textbox(label="model", value="smollm2-135m", elem_id="q-model",
                                     info="built-in alias (qtool models), Hugging Face folder, .gguf file or Hub id")
                q_out = gr.Textbox(label="output folder (OUT)", value="out/webui-rtn4", elem_id="q-out",
                                   info="must not exist unless 'replace' is ticked")
            with gr.Row():
                q_method = gr.Dropdown(forms.method_names(), value="rtn", label="method", elem_id="q-method")
                q_bits = gr.Number(label="bits", value=4, precision=None, elem_id="q-bits")
                q_group = gr.Number(label="group size (-1: per channel)", value=64, precision=None)
                q_target = gr.Textbox(label="target bits (mixed precision)", placeholder="empty: uniform bits")
                q_widths = gr.Textbox(label="widths a layer may take", placeholder="empty: the method's (gptq 2,3,4,8)",
                                      info="with target bits: e.g. 3,4,5,6,8")
            q_options = gr.Dataframe(headers=forms.OPTION_HEADERS, value=forms.option_rows("rtn"), type="array",
                                     label="options of this method (edit 'value')", interactive=True, wrap=True,
                                     static_columns=[0, 2, 3, 4])
            with gr.Row():
                q_calib = gr.Textbox(label="calibration text (calibrated methods)", value="",
                                     info="a .txt/.jsonl/.json file, 'builtin', or empty for the default")
                q_nsamples = gr.Textbox(label="calibration samples", placeholder="default 128")
                q_seqlen = gr.Textbox(label="tokens per sample", placeholder="default 2048 (capped to the context)")
                q_force = gr.Checkbox(label="replace OUT if it exists", value=False)
            q_start = gr.Button("Quantize", variant="primary", elem_id="q-start")
            q_error = gr.Markdown("", elem_id="q-error")
            q_panel = job_panel("quantize")
            q_card = gr.Markdown("", elem_id="q-card")
            q_record = gr.JSON(label="qtool.json", visible=True)
            q_method.change(forms.option_rows, q_method, q_options, api_name="options")

            @guarded(len(panel_outputs(q_panel)) + 1)
            def quantize(model, out, method, bits, group, target, widths, options, calib, nsamples, seqlen, force):
                argv = forms.quantize_argv(model, out, method, bits, group, options, calib, nsamples, seqlen,
                                           target, force, widths)
                return start_job("quantize", argv, f"quantize {model} with {method} into {out}", str(out).strip())

            q_start.click(quantize, [q_model, q_out, q_method, q_bits, q_group, q_target, q_widths, q_options, q_calib,
                                     q_nsamples, q_seqlen, q_force],
                          [q_panel["job"], *panel_outputs(q_panel), q_error], api_name="quantize")

            def quantize_refresh(job_id):
                values = panel_values(job_id)
                card, record = "", None
                if job_id and values[3] and values[3]["state"] == "done" and values[3]["out"]:
                    card, record = forms.quantize_card(root, values[3]["out"])
                return (*values, card, record)

            follow(q_panel, quantize_refresh, (q_card, q_record))

        # ---- Compare ---------------------------------------------------------------------------
        with gr.Tab("Compare", id="compare"):
            gr.Markdown("Load a compare recipe (bundled name or YAML path), edit its cells if you like, and run it. "
                        "Running again with the same report folder resumes: finished cells are kept.")
            with gr.Row():
                c_recipe = gr.Dropdown(forms.recipe_names("compare"), value=None, allow_custom_value=True,
                                       label="compare recipe", elem_id="c-recipe")
                c_out = gr.Textbox(label="report folder (--out)", value="", elem_id="c-out")
                c_text = gr.Textbox(label="evaluation text (empty: the recipe's)", value="",
                                    info="a .txt/.jsonl/.json file, 'builtin', or wikitext2 (online)")
            c_cells = gr.Dataframe(headers=forms.CELL_HEADERS, value=[], type="array", interactive=True,
                                   label="cells (method, bits, group size, options as k=v, k=v); base is always run")
            c_start = gr.Button("Run / resume", variant="primary", elem_id="c-start")
            c_error = gr.Markdown("", elem_id="c-error")
            c_panel = job_panel("compare")
            c_results = gr.Dataframe(headers=forms.RESULT_HEADERS, value=[], interactive=False,
                                     label="cells finished so far", elem_id="c-results")
            gr.Markdown("### Report")
            with gr.Row():
                c_folder = gr.Textbox(label="report folder", value="reports/smollm2-cpu", elem_id="c-folder", scale=4)
                c_open = gr.Button("Open report", elem_id="c-open", scale=1)
            c_open_error = gr.Markdown("", elem_id="c-open-error")
            c_plots = gr.Gallery(label="plots (quality vs size is the Pareto view)", columns=3, height=420,
                                 object_fit="contain", elem_id="c-plots")
            c_report = gr.Markdown("", elem_id="c-report")

            @guarded(2)
            def load_cells(recipe):
                rows = forms.recipe_cells(recipe)
                from qtool.recipes import find_recipe

                return rows, f"reports/webui-{find_recipe(recipe).stem}"

            c_recipe.change(load_cells, c_recipe, [c_cells, c_out, c_error], api_name="compare_cells")

            @guarded(len(panel_outputs(c_panel)) + 1)
            def compare(recipe, out, rows, text):
                argv, files = forms.compare_argv(recipe, out, rows, text)
                return start_job("compare", argv, f"compare {recipe} into {out}", str(out).strip(), files)

            c_start.click(compare, [c_recipe, c_out, c_cells, c_text], [c_panel["job"], *panel_outputs(c_panel), c_error],
                          api_name="compare")

            def compare_refresh(job_id):
                values = panel_values(job_id)
                st = values[3]
                if not st or not st["out"]:
                    return (*values, [])
                recipe = st["argv"][-1] if "--" in st["argv"] else None
                rows = forms.cell_results(root, st["out"], recipe, running=st["state"] == "running")
                if st["state"] == "running" and rows:  # cells finished, not the last progress bar printed
                    finished = sum(r[1] not in ("pending", "running") for r in rows)
                    values = (_bar(finished / len(rows)), *values[1:])
                return (*values, rows)

            follow(c_panel, compare_refresh, (c_results,))

            @guarded(2)
            def open_report(folder):
                check_readable(root / str(folder or "").strip(), "report folder")
                return forms.report_view(root, folder)

            c_open.click(lambda: ("", None), None, [c_report, c_plots], api_visibility="private").then(
                open_report, c_folder, [c_report, c_plots, c_open_error], api_name="report")

        # ---- Fine-tune -------------------------------------------------------------------------
        with gr.Tab("Fine-tune", id="qlora"):
            gr.Markdown("QLoRA on a quantized base: load a recipe, change what you need, start (or resume) the run.")
            f_recipe = gr.Dropdown(forms.recipe_names("qlora"), value=None, allow_custom_value=True,
                                   label="qlora recipe", elem_id="f-recipe")
            f_section = gr.State({})
            with gr.Row():
                f_model = gr.Textbox(label="base model")
                f_method = gr.Textbox(label="quantize the base with (empty: an existing qtool folder as base)")
                f_bits = gr.Textbox(label="bits")
                f_group = gr.Textbox(label="group size")
            with gr.Row():
                f_dataset = gr.Textbox(label="dataset file", scale=3)
                f_format = gr.Dropdown(["alpaca", "sharegpt", "text"], value="alpaca", label="format")
            f_preview = gr.Dataframe(value=[], interactive=False, label="dataset: first rows", wrap=True)
            with gr.Row():
                f_r = gr.Number(label="LoRA r", value=16)
                f_alpha = gr.Number(label="LoRA alpha", value=32)
                f_lr = gr.Number(label="learning rate", value=2e-4)
                f_epochs = gr.Number(label="epochs", value=3)
                f_steps = gr.Textbox(label="max steps (overrides epochs)", placeholder="empty: by epochs")
                f_batch = gr.Number(label="batch size", value=4)
            with gr.Row():
                f_out = gr.Textbox(label="run folder (--out)", value="runs/webui", elem_id="f-out", scale=4)
                f_force = gr.Checkbox(label="replace the run folder (train from scratch)", value=False)
            with gr.Row():
                f_start = gr.Button("Start", variant="primary")
                f_resume = gr.Button("Resume the picked job (from its last checkpoint; max steps above applies)")
            f_error = gr.Markdown("")
            f_panel = job_panel("qlora")
            f_loss = gr.LinePlot(x="step", y="loss", color="split", title="loss", label="loss", height=260)
            f_adapter = gr.Markdown("")
            form_fields = [f_model, f_method, f_bits, f_group, f_dataset, f_format, f_r, f_alpha, f_lr, f_epochs,
                           f_steps, f_batch]

            @guarded(len(form_fields) + 1)
            def load_recipe(recipe):
                values = forms.qlora_form(recipe)
                return (*[values[k] for k in forms.QLORA_FIELDS], values["_section"])

            f_recipe.change(load_recipe, f_recipe, [*form_fields, f_section, f_error], api_name="qlora_form")

            @guarded(1)
            def preview(path):
                import pandas as pd

                if not str(path or "").strip():
                    return pd.DataFrame()
                check_readable(root / str(path).strip(), "dataset")
                return pd.DataFrame(forms.dataset_preview(str(root / str(path).strip())))

            f_dataset.change(preview, f_dataset, [f_preview, f_error], api_name="dataset_preview")

            f_outputs = [f_panel["job"], *panel_outputs(f_panel), f_error]

            @guarded(len(f_outputs) - 1)
            def qlora(section, out, force, *values):
                fields = dict(zip(forms.QLORA_FIELDS, values, strict=True))
                text = forms.qlora_recipe_text(fields, section)
                argv = ["qlora", *forms.flag("--out", out), *(["--force"] if force else []), "--",
                        forms.JobFile("recipe.yaml")]
                return start_job("qlora", argv, f"qlora {fields['model']} into {out}", str(out).strip(),
                                 {"recipe.yaml": text})

            @guarded(len(f_outputs) - 1)
            def qlora_resume(job_id, max_steps):
                """Run the picked job's own command again with --resume (the form may differ from it
                after a reload); a max steps value replaces the recipe's."""
                if not job_id:
                    raise ValueError("pick the fine-tuning job to resume in the job list")
                old = jobs.status(root, job_id)
                cut = old.argv.index("--")
                flags = [a for a in old.argv[1:cut] if a not in ("--force", "--resume") and not a.startswith("--max-steps")]
                argv = ["qlora", *flags, "--resume", *forms.flag("--max-steps", max_steps), *old.argv[cut:]]
                return start_job("qlora", argv, f"resume {old.title}", old.out)

            f_start.click(qlora, [f_section, f_out, f_force, *form_fields], f_outputs, api_name="qlora")
            f_resume.click(qlora_resume, [f_panel["job"], f_steps], f_outputs, api_name="qlora_resume")

            def qlora_refresh(job_id):
                import pandas as pd

                values = panel_values(job_id)
                out = values[3]["out"] if values[3] else None
                points = pd.DataFrame(forms.loss_points(root, out) if out else [], columns=["step", "loss", "split"])
                adapter = ""
                if values[3] and values[3]["state"] == "done":
                    if (Path(out) / "model").is_dir():  # finetuning_type freeze/full: a whole model, no adapter
                        adapter = f"model: `{Path(out) / 'model'}` (chat with it in the Chat tab as the model)"
                    else:
                        adapter = f"adapter: `{Path(out) / 'adapter'}` (chat with it in the Chat tab: base `{Path(out) / 'base'}`)"
                return (*values, points, adapter)

            follow(f_panel, qlora_refresh, (f_loss, f_adapter))

        # ---- Chat ------------------------------------------------------------------------------
        with gr.Tab("Chat", id="chat"):
            with gr.Row():
                h_model = gr.Textbox(label="model", value="smollm2-135m", elem_id="h-model", scale=3)
                h_adapters = gr.Textbox(label="adapters (NAME=PATH, one a line or comma-separated)", value="",
                                        lines=2, scale=3)
                h_tokens = gr.Number(label="max new tokens", value=64, precision=0, scale=1)
                h_load = gr.Button("Load", elem_id="h-load", scale=1)
            h_status = gr.Markdown("", elem_id="h-status")
            h_load_error = gr.Markdown("", elem_id="h-load-error")
            h_adapter = gr.Radio([chat.BASE], value=chat.BASE, label="answer with", elem_id="h-adapter")
            h_bot = gr.Chatbot(label="chat", height=360, elem_id="h-bot")
            with gr.Row():
                h_message = gr.Textbox(label="message", scale=5, elem_id="h-message")
                h_send = gr.Button("Send", variant="primary", scale=1, elem_id="h-send")
            h_error = gr.Markdown("", elem_id="h-error")

            @guarded(2)
            def chat_load(model, adapters, tokens):
                line, choices = chat.load(model, adapters, tokens)
                return line, gr.update(choices=choices, value=choices[0])

            h_load.click(chat_load, [h_model, h_adapters, h_tokens], [h_status, h_adapter, h_load_error],
                         api_name="chat_load")

            def chat_send(message, history, adapter):
                history = list(history or [])
                try:
                    for reply in chat.answer(message, history, adapter):
                        yield ([*history, {"role": "user", "content": message}, {"role": "assistant", "content": reply}],
                               "", "")
                except Exception as exc:
                    yield history, message, _error_md(error_line(exc))

            h_send.click(chat_send, [h_message, h_bot, h_adapter], [h_bot, h_message, h_error], api_name="chat")
            h_message.submit(chat_send, [h_message, h_bot, h_adapter], [h_bot, h_message, h_error])

        # ---- Merge / export --------------------------------------------------------------------
        with gr.Tab("Merge / export", id="merge"):
            gr.Markdown("Merge a LoRA adapter on the full-precision original, then re-quantize (merging into 4-bit "
                        "layers destroys an adapter). Export writes GGUF (llama.cpp) or compressed-tensors (vLLM).")
            with gr.Row():
                m_base = gr.Textbox(label="base (what the adapter was trained on)")
                m_adapter = gr.Textbox(label="adapter (PEFT folder or qlora run folder)")
                m_out = gr.Textbox(label="output folder", value="out/webui-merged")
            with gr.Row():
                m_requant = gr.Dropdown(["", *forms.method_names()], value="", label="re-quantize with")
                m_bits = gr.Textbox(label="bits", placeholder="the method's default")
                m_group = gr.Textbox(label="group size", placeholder="the method's default")
                m_force = gr.Checkbox(label="replace output if it exists")
            m_start = gr.Button("Merge", variant="primary")
            m_error = gr.Markdown("")
            m_panel = job_panel("merge")

            @guarded(len(panel_outputs(m_panel)) + 1)
            def merge(base, adapter, out, requant, bits, group, force):
                argv = forms.merge_argv(base, adapter, out, requant, bits, group, force)
                return start_job("merge", argv, f"merge {adapter} on {base} into {out}", str(out).strip())

            m_start.click(merge, [m_base, m_adapter, m_out, m_requant, m_bits, m_group, m_force],
                          [m_panel["job"], *panel_outputs(m_panel), m_error], api_name="merge")
            gr.Markdown("### Export")
            with gr.Row():
                e_folder = gr.Textbox(label="qtool output folder")
                e_format = gr.Dropdown(["gguf", "compressed-tensors"], value="compressed-tensors", label="format")
                e_type = gr.Textbox(label="GGUF type (e.g. Q4_0; empty: lossless)")
                e_output = gr.Textbox(label="write to (empty: beside the folder)")
                e_force = gr.Checkbox(label="replace if it exists")
            e_start = gr.Button("Export", variant="primary")
            e_error = gr.Markdown("")
            e_panel = job_panel("export")

            @guarded(len(panel_outputs(e_panel)) + 1)
            def export(folder, fmt, type_, output, force):
                argv = forms.export_argv(folder, fmt, type_, output, force)
                return start_job("export", argv, f"export {folder} as {fmt}", str(output).strip() or None)

            e_start.click(export, [e_folder, e_format, e_type, e_output, e_force],
                          [e_panel["job"], *panel_outputs(e_panel), e_error], api_name="export")
            follow(m_panel, panel_values)
            follow(e_panel, panel_values)

        # ---- re-attach and the status API ------------------------------------------------------
        def reattach():
            listed = [jobs.list_jobs(root, kind) for kind in panels]
            return tuple(gr.update(choices=ids, value=ids[0] if ids else None) for ids in listed)

        demo.load(reattach, None, [p["job"] for p in panels.values()], api_visibility="private")

        def job(job_id: str) -> dict:
            """A job's state: id, kind, title, state (running/done/failed/interrupted/lost), exit_code,
            progress (0..1), error (the CLI's one line), log_tail, out, seconds, argv."""
            try:
                return jobs.status(root, job_id).__dict__
            except FileNotFoundError as exc:
                raise gr.Error(f"qtool: error: {exc}", print_exception=False) from None

        def job_list() -> dict:
            """Job ids of every kind, newest first."""
            return {k: jobs.list_jobs(root, k) for k in KINDS}

        gr.api(job, api_name="job")
        gr.api(job_list, api_name="jobs")
    return demo


def launch(root: Path, host: str = "127.0.0.1", port: int = 7860, allowed: list[Path] | None = None,
           block: bool = True) -> gr.Blocks:
    """Serve the page on host:port (127.0.0.1 unless told otherwise). Gradio serves files only
    from `root` and `allowed`. With block=False returns at once (tests)."""
    demo = build(root, allowed)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts: works offline
    demo.queue(default_concurrency_limit=4).launch(
        server_name=host, server_port=port, allowed_paths=[str(root), *map(str, allowed or [])],
        prevent_thread_lock=not block, quiet=True, show_error=False, theme=theme, inbrowser=False,
        footer_links=["api"], ssr_mode=False)
    return demo


def _bar(progress: float | None, state: str = "running") -> str:
    if progress is None:
        return "<div class='qtool-bar' data-state='none'></div>"
    color = {"done": "#2e7d32", "failed": "#c62828", "lost": "#c62828", "interrupted": "#ef6c00"}.get(state, "#1565c0")
    return (f"<div class='qtool-bar' data-state='{state}' data-progress='{progress:.2f}' "
            "style='background:#e0e0e0;border-radius:4px;height:14px'>"
            f"<div style='width:{100 * progress:.0f}%;background:{color};height:14px;border-radius:4px'></div></div>"
            f"<small>{100 * progress:.0f} %</small>")


def _error_md(line: str) -> str:
    return f"<div class='qtool-error' style='color:#c62828'><code>{_escape(line)}</code></div>"


def _escape(text: str) -> str:
    return html.escape(text, quote=False)
