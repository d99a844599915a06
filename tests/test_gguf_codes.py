"""Exports' CPU-side logic, without llama.cpp: reading a checkpoint's 4-bit codes and writing
them as GGUF blocks, or as compressed-tensors (vLLM's layout).

Oracles are the libraries themselves: GPTQModel's kernels compute the checkpoint's weights (a layer
applied to the identity matrix), the gguf package (llama.cpp's reference Python) dequantizes the
blocks, and qtool's rtn backend makes the dense grids.
"""

import json
import re

import numpy as np
import pytest
import torch

import qtool
from qtool.errors import SpecError
from qtool.export.codes import Codes, Grid, grid_codes, grid_of, layer_codes
from qtool.export.gguf import _blocks, default_type, exact_type
from tests.conftest import run_qtool

gguf = pytest.importorskip("gguf")
FAST_CALIB = ["--calib", "builtin", "--nsamples", "4", "--seqlen", "64"]
# a mixed plan's cheap costs (the default measures gptq's own error: one more gptq run per width)
CHEAP_COSTS = ["--sensitivity", "fisher", "--perturbation", "rtn"]


# gptq symmetric (zero points 8: Q4_0) and awq (asymmetric, its own packing order: Q4_1); asymmetric
# gptq reads through the same code as symmetric and is exported in make test-engines.
@pytest.fixture(scope="module", params=[("gptq", "true"), ("awq", None)], ids=["gptq-sym", "awq"])
def quantized_tiny(request, tiny_llama, tmp_path_factory):
    pytest.importorskip("gptqmodel", reason="gptq/awq need GPTQModel: scripts/setup-venv.sh installs it")
    method, sym = request.param
    out = tmp_path_factory.mktemp(f"{method}-{sym}") / "ckpt"
    flags = ["--sym", sym] if sym else []
    proc = run_qtool("quantize", "--method", method, "--bits", "4", "--group-size", "32", *FAST_CALIB, *flags,
                     "--device", "cpu", tiny_llama, out)
    assert proc.returncode == 0, proc.stderr
    return out


def test_codes_reproduce_what_the_kernel_computes(quantized_tiny):
    from safetensors.numpy import load_file

    grid = grid_of(quantized_tiny)
    tensors = load_file(quantized_tiny / "model.safetensors")
    model = qtool.load(quantized_tiny, device="cpu").model
    modules = dict(model.named_modules())
    prefixes = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")})
    assert len(prefixes) == 14
    for prefix in prefixes:
        codes = layer_codes(grid, tensors, prefix)
        module = modules[prefix]
        eye = torch.eye(codes.codes.shape[1])
        with torch.no_grad():
            weight = module(eye).float().T.numpy()  # the layer's weight as its kernel computes it
        np.testing.assert_allclose(codes.dequantize(), weight, rtol=0, atol=2e-3 * np.abs(weight).max())
        assert codes.codes.max() <= 15 and codes.scales.shape == (weight.shape[0], weight.shape[1] // 32)


def test_the_grid_names_its_lossless_gguf_type(quantized_tiny):
    grid = grid_of(quantized_tiny)
    config = json.loads((quantized_tiny / "config.json").read_text())["quantization_config"]
    expected = "Q4_0" if config.get("sym") and grid.method == "gptq" else "Q4_1"
    assert exact_type(grid)[0] == expected == default_type(quantized_tiny)


@pytest.mark.parametrize("group", [64, 256], ids=["g64", "per-channel"])  # per channel: one group per row
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_blocks_dequantize_in_gguf_to_the_codes_weights(kind, group):
    rng = np.random.default_rng(0)
    out, cols, levels = 48, 256, 2 ** int(kind[1])
    zeros = (np.full((out, cols // group), levels / 2) if kind.endswith("_0")
             else rng.integers(0, levels, (out, cols // group)) * 1.0)
    codes = Codes(rng.integers(0, levels, (out, cols)).astype(np.uint8),
                  rng.uniform(1e-3, 5e-2, (out, cols // group)).astype(np.float16).astype(np.float32),
                  zeros.astype(np.float32), group)
    blocks = _blocks(codes, kind)
    assert blocks.shape == (out, cols // 32 * gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, kind)][1])
    restored = gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, kind)).reshape(out, cols)
    expected = codes.dequantize()
    # Q4_0/Q5_0/Q8_0's d is the fp16 scale itself (exact); Q4_1/Q5_1 also round m = -scale * zero to fp16
    atol = 0 if kind.endswith("_0") else 2**-11 * np.abs(codes.scales * codes.zeros).max()
    np.testing.assert_allclose(restored, expected, rtol=1e-6, atol=atol)


def test_symmetric_types_refuse_a_grid_with_other_zero_points():
    codes = Codes(np.zeros((2, 32), np.uint8), np.ones((2, 1), np.float32), np.full((2, 1), 7.0, np.float32), 32)
    with pytest.raises(SpecError, match="Q4_1"):
        _blocks(codes, "Q4_0")
    with pytest.raises(SpecError, match="zero point at 16 .* use Q5_1"):
        _blocks(codes, "Q5_0")
    with pytest.raises(SpecError, match="zero point at 128 .* no 8-bit type with a minimum"):
        _blocks(codes, "Q8_0")


@pytest.mark.parametrize("group", [64, -1], ids=["g64", "per-channel"])
@pytest.mark.parametrize("bits", [4, 5, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_grids_are_recovered_from_dense_weights(symmetric, bits, group):
    from qtool.backends.rtn import rtn_dequantized

    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    # a group whose ends fall on .5 ties (as in weights that were on a grid already, like the built-in
    # model's Q4_1): rounding leaves one code of the min-max grid unused
    weight[0, :64] = torch.linspace(-6.5, 8.5, 64)
    dense = rtn_dequantized(weight, bits, group, symmetric).numpy()
    codes = grid_codes(dense, Grid("rtn", bits, group, symmetric, "dense"))
    # the recovered grid is rtn's own: its step per group, as rtn computed it from the original weight
    width = group if group > 0 else 256
    groups = weight.reshape(64, 256 // width, width)
    qmax, levels = 2 ** (bits - 1) - 1, 2**bits - 1
    step = (groups.abs().amax(-1) / qmax if symmetric else (groups.amax(-1) - groups.amin(-1)) / levels).numpy()
    np.testing.assert_allclose(codes.scales, step, rtol=1e-5)
    np.testing.assert_allclose(codes.dequantize(), dense, rtol=0, atol=1e-6)
    assert codes.bits == bits and codes.codes.max() < 2**bits
    assert grid_codes(weight.numpy(), Grid("rtn", bits, group, symmetric, "dense")) is None  # not on a grid


def test_per_channel_grids_map_onto_blocks_that_repeat_the_rows_scale():
    """One scale per row fills every 32-weight block of it; a row whose width is not a multiple of
    32 cannot be written as blocks and is refused in one line naming --type."""
    from qtool.export.gguf import _fills_blocks

    assert exact_type(Grid("gptq", 4, -1, True, "gptq"))[0] == "Q4_0"
    assert exact_type(Grid("rtn", 5, -1, False, "dense"))[0] == "Q5_1"
    codes = Codes(np.zeros((2, 48), np.uint8), np.ones((2, 1), np.float32), np.full((2, 1), 8.0, np.float32), 48)
    with pytest.raises(SpecError, match="rows of 48 weights .* give --type"):
        _fills_blocks(codes, "model.layers.0.mlp.down_proj")


@pytest.mark.parametrize(("grid", "why"), [
    (None, "not quantized"), (Grid("gptq", 3, 64, True, "gptq"), "3-bit"),
    (Grid("gptq", 4, 48, True, "gptq"), "multiple of GGUF's 32"), (Grid("hqq", 4, 64, False, "hqq"), "no integer codes"),
    (Grid("gptq", 6, 64, False, "gptq_p"), "llama.cpp's Q6_K re-quantizes"),
    (Grid("rtn", 8, 64, False, "dense"), "Q8_0 is symmetric (quantize with --sym true"),
    (Grid("gptq", 4, 64, False, "gptq", (("model.layers.0.mlp.down_proj$", 8),)), "bit-widths 4/8 (mixed precision)"),
])
def test_no_exact_type_says_why(grid, why):
    kind, reason = exact_type(grid)
    assert kind is None and why in reason


def test_kernel_weights_agree_with_the_codes(quantized_tiny):
    """The format-agnostic route (weights read back through the backend's kernel, used for methods
    without codes) and the codes route give the same weights."""
    from safetensors.numpy import load_file

    from qtool.export.gguf import kernel_weights

    grid = grid_of(quantized_tiny)
    tensors = load_file(quantized_tiny / "model.safetensors")
    dense = kernel_weights(quantized_tiny)
    prefix = "model.layers.1.mlp.down_proj"
    expected = layer_codes(grid, tensors, prefix).dequantize()
    np.testing.assert_allclose(dense[f"{prefix}.weight"], expected, rtol=0, atol=2e-3 * np.abs(expected).max())
    assert "model.embed_tokens.weight" in dense and not any(k.endswith(".qweight") for k in dense)


def test_compressed_tensors_export_carries_the_codes_over(quantized_tiny, tmp_path):
    """gptq/awq codes re-written as compressed-tensors pack-quantized: plain transformers decompresses
    them to the weights GPTQModel's kernel computes from the source checkpoint."""
    from transformers import AutoModelForCausalLM

    from qtool.export.compressed import export_compressed_tensors

    out = tmp_path / "ct"
    result = export_compressed_tensors(quantized_tiny, out)
    assert result.mapped_tensors == 14 and result.max_mapping_error < 1e-6
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["format"] == "pack-quantized" and weights["num_bits"] == 4 and weights["group_size"] == 32
    assert weights["symmetric"] == (grid_of(quantized_tiny).method == "gptq")  # the gptq fixture is sym, awq is not
    source = qtool.load(quantized_tiny, device="cpu").model
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = torch.arange(1, 40).unsqueeze(0)
    with torch.no_grad():
        exported(x)  # the first forward decompresses
        for prefix in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
            module = source.get_submodule(prefix)
            eye = torch.eye(module.in_features)
            kernel = module(eye).float().T
            got = exported.get_submodule(prefix).weight.float()
            torch.testing.assert_close(got, kernel, rtol=0, atol=2e-3 * kernel.abs().max().item())
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".ct.partial-*"))


@pytest.mark.parametrize(("method", "args"), [("hqq", ["--bits", "4", "--group-size", "32"]), (None, [])])
def test_compressed_tensors_export_refuses_what_has_no_codes(method, args, tiny_llama, tmp_path):
    from tests.conftest import assert_one_line_error, qtool_in_process

    source = tiny_llama
    if method:
        source = tmp_path / method
        assert run_qtool("quantize", "--method", method, *args, tiny_llama, source).returncode == 0
    proc = qtool_in_process("export", source, "--format", "compressed-tensors", "-o", tmp_path / "out")
    assert_one_line_error(proc, "hqq" if method else "unquantized", "--method fp8, w8a8, mxfp4 or nvfp4")
    assert not (tmp_path / "out").exists()


def test_compressed_tensors_export_never_overwrites_the_source_or_a_users_folder(tiny_llama, tmp_path):
    from tests.conftest import assert_one_line_error, qtool_in_process

    source = tmp_path / "rtn"
    qtool.quantize(str(tiny_llama), source, "rtn", bits=4, group_size=32, device="cpu")
    for out in (source, source / "sub"):
        proc = qtool_in_process("export", source, "--format", "compressed-tensors", "-o", out, "--force")
        assert_one_line_error(proc, "would destroy the input")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    proc = qtool_in_process("export", source, "--format", "compressed-tensors", "-o", mine, "--force")
    assert_one_line_error(proc, "qtool did not write")
    assert (mine / "notes.txt").read_text() == "keep me" and (source / "qtool.json").is_file()
    assert qtool_in_process("export", source, "--format", "compressed-tensors", "-o", tmp_path / "ct").returncode == 0
    assert (tmp_path / "ct" / "export.json").is_file()
    again = qtool_in_process("export", source, "--format", "compressed-tensors", "-o", tmp_path / "ct", "--force")
    assert again.returncode == 0, again.stderr  # an export qtool wrote is replaced


# 3-bit codes straddle int32 words: they are not read. 5- and 6-bit codes are read from GPTQModel's
# planar packing (gptq_p): 5-bit maps onto Q5_0 exactly, 6-bit has no block type of its own. A mixed
# plan's layers each have their own width (GPTQModel `dynamic`): 4/5-bit ones map onto Q4_0 / Q5_0,
# symmetric 8-bit ones onto Q8_0; an asymmetric 4/8-bit one has its codes read but needs --type (no
# 8-bit block type with a zero point exists).
@pytest.mark.parametrize(("flags", "layout", "readable", "lossless"), [
    (["--bits", "3"], "gptq", False, "--type (e.g. Q3_K_M)"),
    (["--bits", "5"], "gptq_p", True, "Q5_0"),
    (["--bits", "6"], "gptq_p", True, "--type (e.g. Q6_K)"),
    (["--bits", "8"], "gptq", True, "Q8_0"),
    (["--bits", "8", "--sym", "false"], "gptq", True, "8-bit with zero points: ggml's Q8_0 is symmetric"),
    (["--target-bits", "5.5", "--mixed-bits", "4,8", *CHEAP_COSTS], "gptq", True, "Q4_0"),  # Q4_0 and Q8_0 blocks
    (["--target-bits", "5.5", "--mixed-bits", "4,8", "--sym", "false", *CHEAP_COSTS], "gptq", True,
     "bit-widths 4/8 (mixed precision)"),
    (["--target-bits", "4.8", "--mixed-bits", "4,5", *CHEAP_COSTS], "gptq_p", True, "Q4_0"),
    (["--bits", "4", "--group-size", "-1"], "gptq", True, "Q4_0"),  # one scale per row, repeated per block
], ids=["3-bit", "5-bit", "6-bit", "8-bit", "8-bit-zero-points", "mixed-4-8", "mixed-4-8-zero-points", "mixed-4-5",
        "per-channel"])
def test_exports_start_from_the_weights_the_kernels_compute(flags, layout, readable, lossless, tiny_llama, tmp_path):
    """The dense folder every GGUF export starts from holds each projection's weight as the loaded
    checkpoint computes it (before, 3- and 5-bit codes were unpacked as if 32/bits of them filled a
    word, and the export stopped with a wrong "act-order g_idx" error); the lossless type is the
    codes' own block type, or refused in one line naming what to ask for instead."""
    pytest.importorskip("gptqmodel", reason="gptq needs GPTQModel: scripts/setup-venv.sh installs it")
    from safetensors.numpy import load_file

    from qtool.export.gguf import dense_folder

    folder = tmp_path / "ckpt"
    proc = run_qtool("quantize", "--method", "gptq", "--group-size", "32", *FAST_CALIB, *flags, "--device", "cpu",
                     tiny_llama, folder)
    assert proc.returncode == 0, proc.stderr
    grid = grid_of(folder)
    assert grid.layout == layout and grid.readable == readable
    if lossless.startswith("Q"):
        assert default_type(folder) == lossless
    else:
        with pytest.raises(SpecError, match=re.escape(lossless)):
            default_type(folder)
    codes = dense_folder(folder, tmp_path / "dense", grid)
    assert bool(codes) == lossless.startswith("Q")  # the layers' codes, kept for the blocks
    assert not codes or {layer.bits for layer in codes.values()} == set(grid.widths)
    dense = load_file(tmp_path / "dense" / "model.safetensors")
    model = qtool.load(folder, device="cpu").model
    projections = [(n, m) for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    assert len(projections) == 4
    for name, module in projections:
        eye = torch.eye(dense[f"{name}.weight"].shape[1])
        with torch.no_grad():
            weight = (module(eye) - module(torch.zeros_like(eye[:1]))).float().T.numpy()
        # GPTQModel picks its kernel by CPU: on AVX-512 per-channel layers go to its fused kernel,
        # which computes in bf16 (up to 2**-8 relative off). A misread code or zero point is a whole
        # grid step off (~1/15 of a 4-bit row's range), far outside this tolerance.
        np.testing.assert_allclose(dense[f"{name}.weight"], weight, rtol=0, atol=2**-7 * np.abs(weight).max())


def test_a_folder_at_the_gguf_path_is_refused_before_any_work(tiny_llama, tmp_path):
    """Not "exists; pass --force" (which then failed after the whole export on the temporary file)."""
    from qtool.export.gguf import export_gguf

    targets = [tmp_path / "model.gguf", tmp_path / "exports"]  # a folder named otherwise: not "ends in .gguf"
    for target in targets:
        target.mkdir()
        for force in (False, True):
            with pytest.raises(SpecError, match="is a folder; give -o the path of the .gguf file"):
                export_gguf(tiny_llama, target, force=force)
    assert sorted(tmp_path.iterdir()) == sorted(targets) and all(t.is_dir() for t in targets)


def test_a_folder_without_a_tokenizer_is_refused_before_the_converter_runs(tiny_llama, tmp_path):
    """llama.cpp's converter said "Either model_file or model_proto must be specified"."""
    import shutil

    from qtool.errors import CheckpointError
    from qtool.export.gguf import export_gguf

    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(tiny_llama / name, folder / name)
    with pytest.raises(CheckpointError, match="has no tokenizer .* copy the source model's tokenizer files"):
        export_gguf(folder, tmp_path / "x.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-tokenizer"]


def test_llamacpp_names_the_export_to_make_for_a_checkpoint_without_a_lossless_gguf(quantized_tiny, tiny_llama,
                                                                                     tmp_path):
    """`qtool eval/serve-check --engine llamacpp` check this before loading; their hint used to be
    export's "give --type", a flag they do not have."""
    from qtool import engines

    llamacpp = engines.get("llamacpp")
    llamacpp.check_checkpoint(quantized_tiny)  # Q4_0 / Q4_1 from its codes
    llamacpp.check_checkpoint(tiny_llama)  # unquantized: F16
    hqq = tmp_path / "hqq"
    assert run_qtool("quantize", "--method", "hqq", "--bits", "4", "--group-size", "32", tiny_llama, hqq).returncode == 0
    with pytest.raises(SpecError, match=rf"no lossless GGUF .* `qtool export {hqq} --type Q8_0`, and give its .gguf"):
        llamacpp.check_checkpoint(hqq)


def test_a_mixed_rtn_plan_maps_the_layers_on_its_grid_and_counts_the_others(tiny_llama, tmp_path):
    """rtn's dense checkpoint names one width (here 4, most layers'); a mixed 4/8 plan's 8-bit layers
    are not on its 4-bit grid, stay F16 in the GGUF, and the export notes how many (it said nothing
    before)."""
    from qtool.export.gguf import dense_folder, projection_count

    folder = tmp_path / "rtn-mixed"
    proc = run_qtool("quantize", "--method", "rtn", "--group-size", "32", "--target-bits", "6",
                     "--mixed-bits", "4,8", *FAST_CALIB, tiny_llama, folder)
    assert proc.returncode == 0, proc.stderr
    codes = dense_folder(folder, tmp_path / "dense", grid_of(folder))
    assert 0 < len(codes) < projection_count(tmp_path / "dense") == 14
    assert {layer.bits for layer in codes.values()} == {4}
