"""Shared fixtures: the real embedded model, a tiny random Llama for mechanics, WikiText paths."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# make test runs the suite in two pytest-xdist workers. Each computes on one thread, and so do the CLI
# processes it starts (OMP_NUM_THREADS is inherited): two workers with two threads each on two cores
# wait on each other's spinning OpenMP threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parent.parent
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"


@pytest.fixture(scope="session")
def smollm2():
    """The built-in SmolLM2-135M as a ModelSource (GGUF converted once into qtool's cache)."""
    from qtool.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2) -> Path:
    """A 2-layer random Llama (hidden 64) with SmolLM2's tokenizer: fast quantize/save/reload checks."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = AutoModelForCausalLM.from_config(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    smollm2.load_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def wikitext_test() -> Path:
    path = WIKITEXT / "test.txt"
    if not path.exists():
        pytest.skip(f"WikiText-2 is read from {WIKITEXT} (the workplace's shared data); not present here")
    return path


def run_qtool(*args: str, env: dict[str, str] | None = None, timeout: int = 600,
              cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh process, as a user would (in `cwd`, the repository by default)."""
    return subprocess.run(
        [sys.executable, "-m", "qtool.cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO,
        env={**os.environ, "TQDM_DISABLE": "1", **(env or {})},
    )


def qtool_in_process(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI's main() in this process (no interpreter start: fast for tables of bad input).

    Returns what run_qtool returns. An exception escaping main() fails the test: the CLI must turn
    every error into a line and an exit code. Use run_qtool where a fresh process matters.
    """
    import contextlib
    import io

    from qtool.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["qtool", *map(str, args)], code, out.getvalue(), err.getvalue())


def env_without(module: str, folder: Path) -> dict[str, str]:
    """Environment whose PYTHONPATH shadows `module` with one that fails to import: exactly what a
    user without the package (or with a broken install) meets."""
    (folder / f"{module}.py").write_text(f"raise ModuleNotFoundError(\"No module named '{module}'\")\n")
    return {"PYTHONPATH": f"{folder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A user error: non-zero exit, exactly one line on stderr, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def interrupt_qtool_when(args: list[str], ready: Callable[[], bool], timeout: float = 300,
                         stdout: list[str] | None = None, env: dict[str, str] | None = None,
                         cwd: Path | None = None) -> tuple[int, str]:
    """Start the CLI, press Ctrl-C once `ready()` holds; return (exit code, stderr). What the run
    wrote to stdout is appended to `stdout` when given; `env` adds to the child's environment;
    it runs in `cwd` (the repository by default).

    SIGINT's default is restored in the child: a shell's background job starts with it ignored.
    """
    proc = subprocess.Popen([sys.executable, "-m", "qtool.cli", *map(str, args)], cwd=cwd or REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "TQDM_DISABLE": "1", **(env or {})},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not ready() and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, stderr = proc.communicate(timeout=120)
    if stdout is not None:
        stdout.append(out)
    return proc.returncode, stderr
