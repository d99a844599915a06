"""Every bad input a user can give: one line on stderr, non-zero exit, no traceback, OUT untouched."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import qtool
from tests.conftest import REPO, assert_one_line_error, qtool_in_process, run_qtool


@pytest.fixture(scope="module", autouse=True)
def _warm_model_cache(smollm2):
    """On a cold cache the first use of smollm2-135m logs its one-time GGUF conversion;
    warm it so that each test sees what a user sees on every later run: only the error."""


@pytest.fixture(scope="module")
def small_checkpoint(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "hqq"
    qtool.quantize(str(tiny_llama), out, "hqq", bits=4, group_size=32, device="cpu")
    return out


def quantize(*args, out):
    return run_qtool("quantize", *args, out)


def test_unknown_method(tmp_path):
    proc = quantize("--method", "int3-magic", "smollm2-135m", out=tmp_path / "o")
    assert_one_line_error(proc, "unknown method 'int3-magic'", "hqq")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--method", "hqq", "--bits", "5"], "cannot quantize to 5 bits"),
        (["--method", "bnb", "--bits", "2"], "cannot quantize to 2 bits"),
        (["--method", "hqq", "--group-size", "128"], "does not divide the layer width 576"),
        (["--method", "rtn", "--group-size", "0"], "group size must be positive"),
        (["--method", "gptq", "--group-size", "-2"], "group size must be positive or -1 (per channel), got -2"),
        (["--method", "bnb", "--group-size", "32"], "bnb 4-bit uses fixed blocks of 64; --group-size 32"),
        (["--method", "bnb", "--group-size", "-1"], "bnb 4-bit uses fixed blocks of 64; --group-size -1"),
        (["--method", "bnb", "--opt", "quant_type=int4"], "one of nf4, fp4"),
        (["--method", "hqq", "--opt", "nonsense"], "KEY=VALUE"),
        (["--method", "hqq", "--device", "cuda"], "no CUDA device"),
        (["--method", "hqq", "--device", "tpu"], "unknown device"),
    ],
)
def test_bad_specs_fail_before_any_work(args, needle, tmp_path):
    proc = quantize(*args, "smollm2-135m", out=tmp_path / "o")
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "o").exists()


def test_missing_model(tmp_path):
    proc = quantize("--method", "hqq", "./models/does-not-exist", out=tmp_path / "o")
    assert_one_line_error(proc, "does not exist")


def test_hub_id_when_offline(tmp_path):
    proc = run_qtool("quantize", "--method", "rtn", "HuggingFaceTB/SmolLM2-135M", tmp_path / "o",
                     env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, "Hub is unreachable")


def test_existing_output_is_refused_and_untouched(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = quantize("--method", "rtn", "smollm2-135m", out=out)
    assert_one_line_error(proc, "already exists", "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_already_quantized_input_is_refused(small_checkpoint, tiny_llama, tmp_path):
    proc = quantize("--method", "rtn", small_checkpoint, out=tmp_path / "o")
    assert_one_line_error(proc, "already quantized (hqq)")
    dense = tmp_path / "rtn"  # rtn writes dense weights with no quantization_config
    qtool.quantize(str(tiny_llama), dense, "rtn", bits=4, group_size=32, device="cpu")
    proc = quantize("--method", "hqq", dense, out=tmp_path / "o")
    assert_one_line_error(proc, "already quantized (rtn)")


def test_corrupt_config_in_a_source_folder(tiny_llama, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_llama, broken)
    (broken / "config.json").write_text('{"model_type": "llama", ')
    proc = quantize("--method", "rtn", broken, out=tmp_path / "o")
    assert_one_line_error(proc, "config.json is not usable")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "drop-config", "bad-record"])
def test_corrupt_checkpoint(damage, small_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(small_checkpoint, broken)
    weights = broken / "model.safetensors"
    if damage == "truncate":
        with weights.open("r+b") as fh:
            fh.truncate(weights.stat().st_size // 2)
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 7)
    elif damage == "drop-config":
        (broken / "config.json").unlink()
    else:
        (broken / "qtool.json").write_text("{not json")
    proc = run_qtool("eval", broken, "--ppl", "builtin", "--ctx", "64", "--max-tokens", "128")
    assert_one_line_error(proc, "broken")


@pytest.mark.parametrize(("content", "needle"), [(None, "neither a file nor a known name"), ("", "is empty"), (b"\xff\xfe\x81", "not UTF-8")])
def test_unreadable_or_empty_dataset(content, needle, tiny_llama, tmp_path):
    data = tmp_path / "data.txt"
    if isinstance(content, str):
        data.write_text(content)
    elif isinstance(content, bytes):
        data.write_bytes(content)
    proc = run_qtool("eval", tiny_llama, "--ppl", data, "--ctx", "64")
    assert_one_line_error(proc, needle)


def test_text_shorter_than_one_window(tiny_llama, tmp_path):
    data = tmp_path / "short.txt"
    data.write_text("Too short.")
    proc = run_qtool("eval", tiny_llama, "--ppl", data, "--ctx", "512")
    assert_one_line_error(proc, "fewer than one window")


def test_usage_errors_are_one_line_too():
    proc = run_qtool("quantize", "--method", "hqq")
    assert_one_line_error(proc, "required")
    assert proc.returncode == 2


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_during_quantize_leaves_nothing(signum, status, tmp_path):
    """Ctrl-C, and SIGTERM (kill, timeout, a scheduler), remove OUT's temporary sibling."""
    out = tmp_path / "o"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qtool.cli", "quantize", "--method", "hqq", "--quiet", "smollm2-135m", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A shell starts background jobs with SIGINT ignored, and Python keeps it ignored; restore
        # the default so that the child handles Ctrl-C as in a terminal, however the suite runs.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob(".o.qtool-tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob(".o.qtool-tmp-*")), "quantize never started writing"
    time.sleep(1.0)  # inside the quantizer now
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == status, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert stdout == ""  # nothing of the quantizer's reaches a script reading stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("delay", [0.6, 1.2, 2.0])
def test_ctrl_c_during_start_up_is_one_line_too(delay, tiny_llama, tmp_path):
    """Start-up imports torch and transformers (~2.5 s here): Ctrl-C then must not print a traceback,
    nor become the error a library makes of it (transformers' lazy imports said "Could not import
    module 'LlamaConfig'"). The first ~70 ms (the interpreter starting) are Python's own."""
    out = tmp_path / "o"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qtool.cli", "quantize", "--method", "rtn", "--quiet", str(tiny_llama), str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:  # it finished first (a fast machine): then nothing to check
        return
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["qtool: interrupted; nothing was written"], stderr
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_torch_imports_waits_for_the_import_then_interrupts():
    """Ctrl-C inside torch's C++ start-up used to abort the process (pybind11 turns the
    KeyboardInterrupt into std::terminate: SIGABRT). qtool's handler holds it until the import is
    over. Ctrl-C is sent every 20 ms for as long as `import torch` runs."""
    script = (
        "import os, signal, sys, threading, time\n"
        "from qtool import cli\n"
        "assert 'torch' not in sys.modules\n"
        "cli._watch_ctrl_c()\n"
        "def press():\n"
        "    while 'torch' not in sys.modules:\n"
        "        time.sleep(0.001)\n"
        "    while sys.modules['torch'].__spec__._initializing:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        time.sleep(0.02)\n"
        "threading.Thread(target=press, daemon=True).start()\n"
        "try:\n"
        "    import torch\n"
        "    time.sleep(10)\n"
        "    print('never interrupted')\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted; torch imported whole:', not torch.__spec__._initializing)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "interrupted; torch imported whole: True", proc.stdout + proc.stderr[-2000:]


# ---- never destroy or hide data (issue 17, kind 2) -----------------------------------------------
def rtn(*paths, force=True):
    return qtool_in_process("quantize", "--method", "rtn", "--bits", "4", "--group-size", "32", "--quiet",
                            *(["--force"] if force else []), *paths)


def test_output_may_not_be_or_contain_or_lie_inside_the_input(tiny_llama, tmp_path):
    model = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_llama, model)
    before = sorted(p.name for p in model.iterdir())
    link = tmp_path / "link"
    link.symlink_to(model)
    for out, needle in [(model, "is the input"), (model.parent, "contains the input"), (model / "q", "lies inside the input")]:
        assert_one_line_error(rtn(model, out), needle, "pick another path")
    assert_one_line_error(rtn(link, model), "is the input")  # links are resolved
    assert_one_line_error(rtn(model, link), "is the input")  # writing through the link would hit the model
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "link2").symlink_to(elsewhere)
    assert_one_line_error(rtn(model, tmp_path / "link2"), "symbolic link")
    assert sorted(p.name for p in model.iterdir()) == before


def test_force_replaces_only_a_folder_qtool_wrote(tiny_llama, tmp_path):
    file_out = tmp_path / "notes.txt"
    file_out.write_text("mine")
    assert_one_line_error(rtn(tiny_llama, file_out), "is a file")
    assert file_out.read_text() == "mine"
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_text("meow")
    assert_one_line_error(rtn(tiny_llama, foreign), "did not write")
    assert (foreign / "cat.jpg").read_text() == "meow"
    out = tmp_path / "q"
    assert rtn(tiny_llama, out).returncode == 0
    first = (out / "qtool.json").read_text()
    assert rtn(tiny_llama, out).returncode == 0  # a qtool output is replaced with --force
    assert (out / "qtool.json").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "photos", "q"]  # nothing hidden


def test_an_output_that_appears_during_the_run_is_never_replaced(tmp_path):
    from qtool.checkpoint import atomic_output_dir
    from qtool.errors import OutputExistsError

    out = tmp_path / "o"
    with pytest.raises(OutputExistsError, match="appeared while this run was working"):
        with atomic_output_dir(out, force=True) as work:
            (work / "weights").write_text("ours")
            out.mkdir()
            (out / "weights").write_text("theirs")
    assert (out / "weights").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_a_failed_run_removes_the_parent_folders_it_created_and_only_those(tmp_path):
    from qtool.checkpoint import atomic_output_dir

    (tmp_path / "mine").mkdir()
    for parent in (tmp_path / "new" / "deeper", tmp_path / "mine"):
        with pytest.raises(KeyboardInterrupt):
            with atomic_output_dir(parent / "o", force=False) as work:
                (work / "weights").write_text("half")
                raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["mine"]  # "new/deeper" went; the user's "mine" stays
    with pytest.raises(KeyboardInterrupt):  # a parent that holds something else by then is kept
        with atomic_output_dir(tmp_path / "new" / "o", force=False):
            (tmp_path / "new" / "notes.txt").write_text("the user's")
            raise KeyboardInterrupt
    assert (tmp_path / "new" / "notes.txt").read_text() == "the user's"


def test_two_runs_to_one_output_at_once_one_wins(tiny_llama, tmp_path):
    out = tmp_path / "o"
    args = [sys.executable, "-m", "qtool.cli", "quantize", "--method", "rtn", "--bits", "4", "--group-size", "32",
            "--quiet", str(tiny_llama), str(out)]
    runs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 1], results
    loser = next(err for code, err in results if code)
    assert "Traceback" not in loser and ("already exists" in loser or "appeared while" in loser), loser
    assert [p.name for p in tmp_path.iterdir()] == ["o"] and (out / "qtool.json").is_file()


def test_killed_runs_temporary_folders_are_removed_by_the_next_run(tiny_llama, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".o.qtool-tmp-{int(dead.stdout)}-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    legacy = tmp_path / ".o.qtool-tmp-89abcdef"  # an older qtool's name: no process id, so only reported
    legacy.mkdir()
    proc = qtool_in_process("quantize", "--method", "rtn", "--bits", "4", "--group-size", "32", tiny_llama, tmp_path / "o")
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists() and "left by a run that was killed" in proc.stderr
    assert legacy.exists() and "older qtool" in proc.stderr


# ---- library errors at known boundaries (kind 3), numbers checked before work (kind 5) ----------
def damaged_copy(tiny_llama, tmp_path, **config_changes):
    import json

    folder = tmp_path / "damaged"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


def test_invalid_config_values_and_shapes_that_disagree(tiny_llama, tmp_path):
    folder = damaged_copy(tiny_llama, tmp_path, hidden_size="wide")
    assert_one_line_error(rtn(folder, tmp_path / "o"), "config.json is not usable", "hidden_size")
    folder = damaged_copy(tiny_llama, tmp_path / "b", intermediate_size=256)
    assert_one_line_error(rtn(folder, tmp_path / "o"), "has shape [64, 128] in the checkpoint but [64, 256]")
    assert_one_line_error(qtool_in_process("eval", folder, "--ppl", "builtin", "--ctx", "64"), "has shape")
    assert not (tmp_path / "o").exists()


def test_a_folder_that_needs_remote_code_is_refused(tiny_llama, tmp_path):
    folder = damaged_copy(tiny_llama, tmp_path, model_type="my_llama", auto_map={"AutoConfig": "modeling.MyConfig"})
    (folder / "modeling.py").write_text("raise SystemExit('remote code ran')\n")
    proc = run_qtool("eval", folder, "--ppl", "builtin", "--ctx", "64")  # a real process: no prompt, no code run
    assert_one_line_error(proc, "never runs code from a model")
    assert "remote code ran" not in proc.stdout + proc.stderr


def test_pickled_weights_load_only_through_weights_only(tiny_llama, tmp_path):
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_llama, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")  # an older checkpoint: pickled tensors only
    proc = qtool_in_process("eval", folder, "--ppl", "builtin", "--ctx", "64", "--max-tokens", "128")
    assert proc.returncode == 0 and "weights_only" in proc.stderr, proc.stderr
    torch.save({"model.embed_tokens.weight": Payload()}, folder / "pytorch_model.bin")
    proc = qtool_in_process("eval", folder, "--ppl", "builtin", "--ctx", "64")
    line = assert_one_line_error(proc, "weights_only loader refuses")
    assert "weights_only=False" not in line


class Payload:
    """Something a weights-only unpickler must refuse."""


def test_full_disk_while_writing_the_checkpoint(tiny_llama, tmp_path):
    import resource

    out = tmp_path / "o"
    limit = 4 * 2**20  # a file-size limit: writes past 4 MiB fail as on a full disk (EFBIG)
    proc = subprocess.run(
        [sys.executable, "-m", "qtool.cli", "quantize", "--method", "rtn", "--bits", "4", "--group-size", "32",
         "--quiet", str(tiny_llama), str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert_one_line_error(proc, "File too large")
    assert list(tmp_path.iterdir()) == []


def test_disk_errors_are_named(tmp_path):
    import errno

    from qtool.errors import describe_library_error

    assert describe_library_error(OSError(errno.ENOSPC, "No space left on device", "/x/model.safetensors")) == \
        "no space left on the device: /x/model.safetensors"
    assert describe_library_error(OSError(errno.EROFS, "Read-only file system", "/ro")) == "the file system is read-only: /ro"
    from safetensors import SafetensorError

    assert "no space left" in describe_library_error(SafetensorError("Error while serializing: IoError(No space left on device (os error 28))"))
    assert describe_library_error(ValueError("a bug")) is None


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--ppl", "builtin", "--max-tokens", "-5"], "--max-tokens: Input should be greater than 0"),
        (["--ppl", "builtin", "--ctx", "9000"], "ctx 9000 is longer than smollm2-135m's context of 8192"),
        (["--ppl", "builtin", "--ctx", "1"], "--ctx: Input should be greater than or equal to 2"),
        (["--ppl", "builtin", "--stride", "0"], "--stride"),
        (["--ppl", "builtin", "--ctx", "64", "--stride", "128"], "stride 128 is longer than ctx 64"),
        (["--speed", "--prompt-len", "0"], "--prompt-len"),
        (["--speed", "--new-tokens", "1"], "--new-tokens"),
        (["--speed", "--repeats", "0"], "--repeats"),
        (["--speed", "--batch", "0"], "--batch"),
        (["--ppl", "builtin", "--lm-eval", "--lm-eval-limit", "0"], "--lm-eval-limit"),
        (["--ppl", "builtin", "--json", "."], "is a folder"),
    ],
)
def test_eval_numbers_are_checked_before_loading(args, needle):
    assert_one_line_error(qtool_in_process("eval", "smollm2-135m", *args), needle)


@pytest.mark.parametrize(
    ("command", "needle"),
    [
        (["generate", "smollm2-135m", "Hi", "--max-new-tokens", "0"], "--max-new-tokens takes a positive"),
        (["generate", "smollm2-135m", "Hi", "--max-new-tokens", "-3"], "--max-new-tokens takes a positive"),
        (["generate", "smollm2-135m", "  "], "the prompt is empty"),
        (["chat", "smollm2-135m", "--max-new-tokens", "0"], "--max-new-tokens takes a positive"),
        (["quantize", "--method", "rtn", "--seed", "-1", "smollm2-135m", "o"], "--seed takes an integer from 0"),
    ],
)
def test_generation_and_seed_numbers(command, needle):
    assert_one_line_error(qtool_in_process(*command), needle)


def test_eval_json_is_written_whole(tiny_llama, tmp_path):
    import json

    out = tmp_path / "r" / "eval.json"
    proc = qtool_in_process("eval", tiny_llama, "--ppl", "builtin", "--ctx", "64", "--max-tokens", "128",
                            "--json", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["perplexity"]["ctx"] == 64
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]


def test_an_unexpected_error_is_one_line_with_the_traceback_saved(tmp_path, monkeypatch):
    import qtool.cli as cli

    def broken(args):
        raise ZeroDivisionError("a bug in qtool")

    import tempfile

    monkeypatch.setitem(cli.COMMANDS, "models", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("QTOOL_DEBUG", raising=False)
    proc = qtool_in_process("models")
    line = assert_one_line_error(proc, "internal error: ZeroDivisionError: a bug in qtool", "QTOOL_DEBUG=1")
    assert proc.returncode == 70
    log = next(tmp_path.glob("qtool-crash-*.log"))
    assert log.name in line and "ZeroDivisionError" in log.read_text()


@pytest.mark.parametrize("method", ["hqq", "rtn"])  # hqq's own bars; rtn's tqdm, imported while parsing the flags
def test_quiet_quantize_prints_nothing_but_the_result(tiny_llama, tmp_path, method):
    proc = run_qtool("quantize", "--method", method, "--bits", "4", "--group-size", "32", "--quiet", tiny_llama,
                     tmp_path / "o", env={"TQDM_DISABLE": ""})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("wrote ")
    # the weights split into the quantized layers' tensors and the rest: hqq packs 4-bit codes with
    # fp scales and zero points, rtn stores its grid dequantized in fp32
    from qtool.models import quantizable_linears, resolve_model

    record = json.loads((tmp_path / "o" / "qtool.json").read_text())
    params = sum(m.weight.numel() for m in quantizable_linears(resolve_model(str(tiny_llama)).config()).values())
    per_weight = record["quantized_layers_bytes"] / params
    assert (per_weight == 4) if method == "rtn" else (0.5 < per_weight < 0.8), per_weight
    total, quantized, rest = map(float, re.search(r"([0-9.]+) MiB weights \(([0-9.]+) MiB in the 14 quantized layers, "
                                                   r"([0-9.]+) MiB in the unquantized rest: embedding", proc.stdout).groups())
    assert quantized == round(record["quantized_layers_bytes"] / 2**20, 1) and abs(quantized + rest - total) <= 0.11


def test_eval_json_and_compare_out_never_overwrite_an_input(small_checkpoint, tmp_path):
    record = (small_checkpoint / "qtool.json").read_text()
    proc = qtool_in_process("eval", small_checkpoint, "--ppl", "builtin", "--ctx", "64", "--json",
                            small_checkpoint / "qtool.json")
    assert_one_line_error(proc, "--json", "lies inside the input")
    assert (small_checkpoint / "qtool.json").read_text() == record


# ---- found by the 309-case sweep from a clean clone (issue 17) -----------------------------------
def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def test_sweep_cases_in_the_cli(tiny_llama, small_checkpoint, tmp_path):
    """Each a case that once ended in an internal error, a misleading line or litter."""
    import json

    o = tmp_path / "o"
    recipe = write(tmp_path / "bin.yaml", b"\xf2\x00\x9c binary")
    cases = [
        (["quantize", "--method", "rtn", "--seed", "99999999999999999999", tiny_llama, o], "--seed takes an integer from 0"),
        (["quantize", "--recipe", recipe, tiny_llama, o], "is not UTF-8 text"),
        (["quantize", "--recipe", write(tmp_path / "b.yaml", "quantize: {method: hqq, bits: true, group_size: 32}\n"),
          tiny_llama, o], "bits: expected a number, got true"),
        (["quantize", "--recipe", write(tmp_path / "s.yaml", "quantize: {method: rtn, seed: 99999999999999999999}\n"),
          tiny_llama, o], "seed: Input should be less than or equal to 4294967295"),
        (["quantize", "--method", "rtn", tiny_llama, "/proc/qtool-x"], "cannot be written: no file can be made in /proc"),
        (["quantize", "--method", "rtn", tiny_llama, write(tmp_path / "f.txt", "x") / "o"], "is a file, not a folder"),
        (["quantize", "--method", "rtn", tiny_llama, ""], "an empty value"),
        (["eval", tiny_llama, "--ppl", "builtin", "--ctx", "64", "--json", "/proc/qtool-x.json"], "cannot be written"),
        (["generate", tiny_llama, "hi", "--max-new-tokens", "100000"], "does not fit"),
        (["methods", "--device", "tpu"], "unknown device 'tpu'"),
        (["chat", tiny_llama, "--adapter", f"={tmp_path}"], "--adapter takes NAME=PATH or PATH"),
        (["compare", "compare-smollm2", "--out", tmp_path / "f.txt"], "is a file"),
    ]
    for args, needle in cases:
        assert_one_line_error(qtool_in_process(*args), needle)
    link = tmp_path / "dangling.yaml"
    link.symlink_to(tmp_path / "nowhere" / "r.yaml")
    assert_one_line_error(qtool_in_process("recipes", "copy", "quantize-smollm2-rtn4", link), "already exists (a symbolic link)")
    assert not (tmp_path / "nowhere").exists()

    small_vocab = damaged_copy(tiny_llama, tmp_path / "v", vocab_size=1000)
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(small_vocab)).save_pretrained(small_vocab)
    assert_one_line_error(qtool_in_process("eval", small_vocab, "--ppl", "builtin", "--ctx", "64"),
                          "its tokenizer has 49152 tokens but the model's embedding only 1000 rows")
    no_tokenizer = tmp_path / "nt"
    shutil.copytree(tiny_llama, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    assert_one_line_error(qtool_in_process("eval", no_tokenizer, "--ppl", "builtin", "--ctx", "64"), "has no tokenizer")
    for record, needle in [({"method": "rtn"}, "'spec' is missing"), ({"method": "rtn", "spec": {}, "source": 5}, "'source'")]:
        broken = tmp_path / f"r{len(needle)}"
        shutil.copytree(small_checkpoint, broken)
        (broken / "qtool.json").write_text(json.dumps(record))
        assert_one_line_error(qtool_in_process("eval", broken, "--ppl", "builtin", "--ctx", "64"), needle)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_adapter_folders_are_checked_before_loading(tiny_llama, tmp_path):
    adapter = tmp_path / "a"
    write(adapter / "adapter_config.json", "[1, 2, 3]")
    assert_one_line_error(qtool_in_process("chat", tiny_llama, "--adapter", f"a={adapter}"), "not a JSON object")
    write(adapter / "adapter_config.json", '{"peft_type": "LORA"}')
    assert_one_line_error(qtool_in_process("chat", tiny_llama, "--adapter", f"a={adapter}"), "has no weights")
    write(adapter / "adapter_model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    assert_one_line_error(qtool_in_process("chat", tiny_llama, "--adapter", f"a={adapter}"), "adapter_model.safetensors")


def test_text_that_is_not_utf8_is_replaced_and_said(tiny_llama):
    proc = subprocess.run([sys.executable, "-m", "qtool.cli", "generate", str(tiny_llama).encode(), b"\xff\xfe bad",
                           b"--max-new-tokens", b"4"], cwd=REPO, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert b"not UTF-8 text" in proc.stderr and b"Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "qtool.cli", "chat", str(tiny_llama), "--max-new-tokens", "4"],
                          cwd=REPO, input=b"\xff\xfe\xfd bad\n/quit\n", capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert b"not UTF-8 text" in proc.stderr and b"Traceback" not in proc.stderr


def test_report_only_skips_lines_that_are_not_results(tmp_path):
    fixed = (REPO / "tests" / "data" / "compare-results.jsonl").read_text().splitlines()
    out = tmp_path / "r"
    write(out / "results.jsonl", "\n".join([fixed[0], '{"cell": [1], "status": "ok"}', "7",
                                            '{"cell": "x", "status": "ok", "perplexity": 5}', "\udcff"
                                            .encode("utf-8", "surrogateescape").decode("latin-1")]) + "\n")
    proc = qtool_in_process("compare", "compare-smollm2", "--report-only", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "4 lines are not result records; skipped" in proc.stderr
    assert (out / "report.md").is_file()


def test_an_empty_argument_is_named_as_the_user_knows_it():
    assert_one_line_error(qtool_in_process("quantize", "--method", "rtn", "smollm2-135m", ""), "an empty value for MODEL/OUT")
    assert_one_line_error(qtool_in_process("quantize", "--method", "rtn", "--sym", "", "smollm2-135m", "o"),
                          "an empty value for --sym")
    assert_one_line_error(qtool_in_process("serve-check", "o", "--engine", "vllm", "--json", ""),
                          "an empty value for --json")
    assert_one_line_error(qtool_in_process("serve-check", "o", "--engine", "vllm", "--prompts="),
                          "an empty value for --prompts")
    assert_one_line_error(qtool_in_process("serve-check", "", "--engine", "vllm"), "an empty value for OUT")


def test_results_with_no_record_and_a_record_with_a_bad_method_name_the_problem(tiny_llama, tmp_path):
    out = tmp_path / "r"
    write(out / "results.jsonl", '{"cell": [1], "status": "ok"}\n\x00\x01binary\n')
    assert_one_line_error(qtool_in_process("compare", "compare-smollm2", "--report-only", "--out", out),
                          "has no result records in its results.jsonl")
    folder = tmp_path / "bad-method"
    shutil.copytree(tiny_llama, folder)
    write(folder / "qtool.json", json.dumps({"method": 5, "spec": {}}))
    assert_one_line_error(qtool_in_process("eval", folder, "--ppl", "builtin"), "its 'method' is 5, not a method name")


def test_qlora_dataset_and_output_messages(tiny_llama, tmp_path):
    def qlora(dataset, fmt="alpaca", out=None):
        path = write(tmp_path / "q.yaml", f"qlora:\n  model: {tiny_llama}\n  dataset: {{path: {dataset}, format: {fmt}}}\n"
                                          "  device: cpu\n")
        return qtool_in_process("qlora", path, "--out", out or tmp_path / "run", "--quiet")

    assert_one_line_error(qlora(write(tmp_path / "d.txt", "")), "reads .json or .jsonl rows")
    (tmp_path / "folder.jsonl").mkdir()
    assert_one_line_error(qlora(tmp_path / "folder.jsonl"), "is a folder")
    rows = write(tmp_path / "rows.jsonl", '{"instruction": "q", "output": 5}\n')
    assert_one_line_error(qlora(rows), "'output' must be a string, got int 5")
    assert_one_line_error(qlora(rows, out=write(tmp_path / "out.txt", "x")), "is a file")
    assert not (tmp_path / "run").exists()
