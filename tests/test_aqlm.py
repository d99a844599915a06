"""aqlm: qtool's additive quantizer, the aqlm checkpoint format, and resume after Ctrl-C.

Mechanics run on the tiny Llama with few calibration tokens; the algorithm's quality is checked
on a real SmolLM2 layer with its real input statistics. The whole-model run is a benchmark
(recipes/compare-smollm2-2bit.yaml, numbers in the README).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qtool import backends
from qtool.backends._additive import (
    AqSettings,
    beam_search,
    initialise,
    objective,
    pack_codes,
    quantize_layer,
    unpack_codes,
)
from qtool.backends.aqlm import single_thread_numba
from qtool.errors import SpecError
from tests.conftest import assert_one_line_error, interrupt_qtool_when, run_qtool

FAST = ["--opt", "rounds=1", "--opt", "beam=2", "--opt", "adam_steps=5", "--nsamples", "4", "--seqlen", "64",
        "--device", "cpu"]


def _quantize(model, out, *extra: str):
    return run_qtool("quantize", "--method", "aqlm", str(model), str(out), *FAST, *extra)


def _dense_from_aqlm_dequantization(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every aqlm.QuantizedLinear by a dense Linear whose weight the aqlm package decodes."""
    from aqlm import QuantizedLinear
    from aqlm.utils import _dequantize_weight, unpack_int_data

    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantizedLinear):
            codes = mod.codes.data
            if codes.shape[0] != mod.out_features:  # aqlm's CPU kernel transposes it in place on first use
                codes = codes.permute(1, 0, 2)
            dense = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            dense.weight.data = _dequantize_weight(unpack_int_data(codes, mod.nbits_per_codebook), mod.codebooks, mod.scales)
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, dense)
    return model


@pytest.mark.parametrize(("codebooks", "nbits"), [
    (2, 8),
    # 1x16 (the GPU default layout) runs the same code path with a 65,536-entry codebook: ~80 s on 2 cores
    pytest.param(1, 16, marks=pytest.mark.slow),
])
def test_aqlm_checkpoint_loads_in_plain_transformers_and_its_kernel_matches_the_codes(tiny_llama, tmp_path, codebooks, nbits):
    from transformers import AutoModelForCausalLM

    out = tmp_path / f"aqlm-{codebooks}x{nbits}"
    proc = _quantize(tiny_llama, out, "--codebooks", str(codebooks), "--nbits", str(nbits), "--quiet")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "aqlm", "in_group_size": 8, "out_group_size": 1, "num_codebooks": codebooks,
                      "nbits_per_codebook": nbits, "linear_weights_not_to_quantize": ["lm_head"]}
    record = json.loads((out / "qtool.json").read_text())
    assert record["effective_bits_per_weight"] == 2.0 and record["calibration"]["tokens"] == 256
    assert len(record["layer_losses"]) == 14 and all(0 <= r["loss"] < 1 for r in record["layer_losses"])
    state = load_file(str(out / "model.safetensors"))
    assert state["model.layers.0.mlp.down_proj.codes"].dtype == (torch.int8 if nbits == 8 else torch.int16)
    assert state["model.layers.0.mlp.down_proj.codebooks"].shape == (codebooks, 2**nbits, 1, 8)

    # aqlm's Numba kernel races with more threads; an env variable is too late once another test
    # (another file in this pytest-xdist worker) has imported Numba
    single_thread_numba()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model.model.layers[1].self_attn.q_proj).__name__ == "QuantizedLinear"
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        kernel = model(ids).logits
        decoded = _dense_from_aqlm_dequantization(model)(ids).logits
    assert torch.isfinite(kernel).all()
    torch.testing.assert_close(kernel, decoded, atol=1e-4, rtol=1e-4)


def test_additive_quantization_of_a_real_layer_beats_round_to_nearest(smollm2):
    """SmolLM2 layer 2 q_proj against its real input statistics: 2-bit AQ vs 2-bit RTN g64 at the same bits."""
    from qtool.api import load

    loaded = load(smollm2.location, device="cpu")
    ids = loaded.tokenizer("The river ran past the old mill. " * 40, return_tensors="pt").input_ids[:, :256]
    captured = {}
    layer = loaded.model.model.layers[2].self_attn.q_proj
    handle = layer.register_forward_hook(lambda m, a, o: captured.setdefault("x", a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        loaded.model(ids)
    handle.remove()
    x = captured["x"]
    h = x.T @ x / x.shape[0]
    h += 0.01 * h.diagonal().mean() * torch.eye(h.shape[0])
    w = layer.weight.detach()
    groups = w.reshape(-1, 64)
    lo, hi = groups.min(1, keepdim=True).values, groups.max(1, keepdim=True).values
    rtn = (((groups - lo) / ((hi - lo) / 3)).round().clamp(0, 3) * ((hi - lo) / 3) + lo).reshape(w.shape)
    rtn_error = float(objective(w, rtn, h) / objective(w, torch.zeros_like(w), h))
    _, aq_error = quantize_layer(w, h, AqSettings(rounds=1, beam=2, adam_steps=10), seed=0)
    assert aq_error < rtn_error / 3, (aq_error, rtn_error)


def test_code_search_never_increases_the_error():
    torch.manual_seed(0)
    w, x = torch.randn(48, 64), torch.randn(256, 64) @ torch.randn(64, 64)
    h = x.T @ x / 256
    settings = AqSettings(codebooks=2, nbits=4, in_group=8)
    layer = initialise(w, settings, torch.Generator().manual_seed(0))
    errors = [float(objective(w, layer.weight(), h))]
    for beam in (1, 4, 4):
        layer = beam_search(w, h, layer, beam)
        errors.append(float(objective(w, layer.weight(), h)))
    assert all(b <= a * (1 + 1e-5) for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.9 * errors[0]


def test_codes_pack_as_signed_ints_like_the_aqlm_package():
    from aqlm.utils import pack_int_data

    codes = torch.arange(256).reshape(8, 4, 8)
    packed = pack_codes(codes, 8)
    assert packed.dtype == torch.int8 and torch.equal(packed, pack_int_data(codes.clone(), 8))
    assert torch.equal(unpack_codes(packed, 8), codes)


def test_interrupted_run_resumes_to_the_same_checkpoint(tiny_llama, tmp_path):
    # slower settings than FAST so that Ctrl-C lands while block 1 is being quantized
    extra = ["--opt", "rounds=3", "--opt", "adam_steps=40", "--seed", "3"]
    reference = tmp_path / "reference"
    assert _quantize(tiny_llama, reference, *extra, "--quiet").returncode == 0

    out = tmp_path / "resumed"
    state = tmp_path / ".resumed.qtool-resume"
    code, stderr = interrupt_qtool_when(["quantize", "--method", "aqlm", tiny_llama, out, *FAST, *extra],
                                       lambda: (state / "block-000.safetensors").exists())
    assert code == 130, stderr
    assert "--resume" in stderr and not out.exists() and not (state / "block-001.safetensors").exists()
    assert_one_line_error(_quantize(tiny_llama, out, *extra), "interrupted aqlm run", "--resume")
    assert_one_line_error(_quantize(tiny_llama, out, *extra, "--resume", "--opt", "beam=3"), "other settings")

    proc = _quantize(tiny_llama, out, *extra, "--resume", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert not state.exists()
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(("args", "needle"), [
    (["--bits", "3"], "make 2 bits per weight, not --bits 3"),
    (["--in-group", "7", "--bits", "2", "--codebooks", "1", "--nbits", "14"], "in_group 7 does not divide the layer width 64"),
    (["--opt", "beam=0"], "rounds and beam must be >= 1"),
    (["--group-size", "64"], "does not support group size 64"),
])
def test_bad_aqlm_input_is_one_line(tiny_llama, tmp_path, args, needle):
    out = tmp_path / "o"
    assert_one_line_error(_quantize(tiny_llama, out, *args), needle)
    assert not out.exists()


def test_codebook_flags_and_resume_belong_to_aqlm(tiny_llama, tmp_path):
    hqq = ["quantize", "--method", "hqq", str(tiny_llama), str(tmp_path / "o")]
    assert_one_line_error(run_qtool(*hqq, "--codebooks", "2"), "hqq has no option 'codebooks'")
    assert_one_line_error(run_qtool(*hqq, "--resume"), "hqq runs do not resume")


def test_bits_follow_from_the_codebooks():
    aqlm = backends.get("aqlm")
    assert aqlm.make_spec(options={"codebooks": "1", "nbits": "16"}).bits == 2
    with pytest.raises(SpecError, match="1x8 codebooks over groups of 8 make 1 bits per weight"):
        aqlm.make_spec(bits=2, options={"codebooks": "1", "nbits": "8"})
