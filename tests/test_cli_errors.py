"""Every bad input a user can give: one line on stderr, non-zero exit, no traceback, OUT untouched."""

import shutil
import signal
import subprocess
import sys
import time

import pytest

import qtool
from tests.conftest import REPO, assert_one_line_error, run_qtool


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
        (["--method", "bnb", "--group-size", "32"], "does not support group size 32"),
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
    assert_one_line_error(proc, "config.json is unreadable")


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


def test_ctrl_c_during_quantize_leaves_nothing(tmp_path):
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
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []
