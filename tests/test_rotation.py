"""Residual-stream rotation (qtool.rotation) and gptq's `rotate` option.

The rotation must not change what the model computes (checked on the tiny Llama with non-trivial
norm gains, so that the gain folding is exercised), must leave an ordinary checkpoint, and gptq
with rotate=true must quantize, save and reload like any gptq run.
"""

import json

import pytest
import torch

import qtool
from qtool.errors import SpecError
from qtool.models import resolve_model
from qtool.rotation import (
    check_rotatable,
    random_hadamard,
    random_orthogonal,
    rotate_residual_stream,
    rotate_with_seed,
    rotated_copy,
)
from tests.conftest import assert_one_line_error, run_qtool

FAST_CALIB = ["--calib", "builtin", "--nsamples", "4", "--seqlen", "64"]
IDS = torch.randint(0, 49152, (1, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def tiny_model_with_gains(tiny_llama):
    """The tiny Llama with random RMSNorm gains (a fresh model's are all ones, which hides a missing fold)."""
    model = resolve_model(str(tiny_llama)).load_model("cpu", torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
    return model


def test_random_orthogonal_is_orthogonal_and_seeded():
    q = random_orthogonal(48, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(48, dtype=torch.float64))
    assert torch.equal(q, random_orthogonal(48, seed=3))
    assert not torch.allclose(q, random_orthogonal(48, seed=4))


@pytest.mark.parametrize("size", [64, 576])  # 576 = 36 x 16: SmolLM2-135M's hidden size
def test_random_hadamard_is_orthogonal_with_equal_magnitudes_and_seeded(size):
    h = random_hadamard(size, seed=3)
    torch.testing.assert_close(h @ h.T, torch.eye(size, dtype=torch.float64))
    torch.testing.assert_close(h.abs(), torch.full_like(h, size ** -0.5))
    assert torch.equal(h, random_hadamard(size, seed=3))
    assert not torch.equal(h, random_hadamard(size, seed=4))


def test_hadamard_rotation_of_a_width_without_a_known_order_is_refused():
    from transformers import LlamaConfig

    check_rotatable(LlamaConfig(hidden_size=576, num_attention_heads=9), "hadamard")
    with pytest.raises(SpecError, match="rotation=hadamard needs .* this model's is 268"):
        check_rotatable(LlamaConfig(hidden_size=268, num_attention_heads=2), "hadamard")  # 268 = 67 x 4
    check_rotatable(LlamaConfig(hidden_size=268, num_attention_heads=2), "orthogonal")


@pytest.mark.parametrize("kind", ["orthogonal", "hadamard"])
def test_rotation_keeps_the_function_and_unties_the_head(tiny_model_with_gains, kind):
    model = tiny_model_with_gains
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied before
    with torch.no_grad():
        before = model(IDS).logits
    q_proj_before = model.model.layers[0].self_attn.q_proj.weight.clone()

    rotate_with_seed(model, 0, kind)

    with torch.no_grad():
        after = model(IDS).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q_proj_before)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.tie_word_embeddings is False
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert all(torch.all(p == 1) for p in norms)


@pytest.mark.parametrize(
    ("model_type", "tied"),
    [("llama", False), ("mistral", True), ("qwen2", True), ("qwen3", False)],  # qwen2: q/k/v biases; qwen3: q/k norms
)
def test_every_listed_architecture_keeps_its_function(model_type, tied):
    from transformers import AutoConfig, AutoModelForCausalLM

    from qtool.rotation import ROTATABLE_MODEL_TYPES

    assert model_type in ROTATABLE_MODEL_TYPES
    config = AutoConfig.for_model(
        model_type, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
        ids = IDS % 512
        before = model(ids).logits
        rotate_residual_stream(model, random_orthogonal(64, seed=0))
        torch.testing.assert_close(model(ids).logits, before, atol=1e-4, rtol=1e-4)


def test_rotated_copy_is_a_plain_checkpoint_with_the_same_outputs(tiny_llama):
    from transformers import AutoModelForCausalLM

    source = resolve_model(str(tiny_llama))
    rotated, folder, record = rotated_copy(source, seed=0, dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(rotated.location, dtype=torch.float32, device_map="cpu")
    original = source.load_model("cpu", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, original(IDS).logits, atol=1e-4, rtol=1e-4)
    assert not torch.equal(reloaded.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert record["seed"] == 0 and record["untied_lm_head"] is True
    assert record["relative_logit_change_fp32"] < 1e-4
    folder.cleanup()


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config

    with pytest.raises(SpecError, match="this model is 'gpt2'"):
        check_rotatable(GPT2Config())


def test_gptq_rotate_round_trip(tiny_llama, tmp_path):
    out = tmp_path / "rotated"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = run_qtool("quantize", "--method", "gptq", "--bits", "4", "--group-size", "32", "--opt", "rotate=true",
                     *FAST_CALIB, "--seed", "5", "--device", "cpu", tiny_llama, out, env={"TMPDIR": str(scratch)})
    assert proc.returncode == 0, proc.stderr
    assert not any(p.name.startswith("qtool-rotated-") for p in scratch.iterdir())  # the fp copy is gone

    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    assert config["tie_word_embeddings"] is False
    record = json.loads((out / "qtool.json").read_text())
    assert record["spec"]["options"]["rotate"] is True
    assert record["rotation"]["seed"] == 5 and record["rotation"]["untied_lm_head"] is True

    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu")
    assert plain.lm_head.weight.data_ptr() != plain.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = plain(IDS).logits
        ours = qtool.load(out, device="cpu").model(IDS).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(ours, logits)
    # Quantized in the rotated basis, yet it still computes (approximately) the original model.
    base = resolve_model(str(tiny_llama)).load_model("cpu", torch.float32)
    with torch.no_grad():
        base_logits = base(IDS).logits
    assert torch.nn.functional.cosine_similarity(logits.flatten(), base_logits.flatten(), dim=0) > 0.9


def test_gptq_rotation_kind_without_rotate_is_one_line(tiny_llama, tmp_path):
    out = tmp_path / "out"
    proc = run_qtool("quantize", "--method", "gptq", "--group-size", "32", "--opt", "rotation=hadamard", *FAST_CALIB,
                     tiny_llama, out)
    assert_one_line_error(proc, "rotation=hadamard chooses rotate=true's matrix: add rotate=true")
    assert not out.exists()


def test_gptq_rotate_on_an_unsupported_architecture_is_one_line(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    folder = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=512)).save_pretrained(folder)
    out = tmp_path / "out"
    proc = run_qtool("quantize", "--method", "gptq", "--group-size", "32", "--opt", "rotate=true", *FAST_CALIB,
                     folder, out)
    assert_one_line_error(proc, "rotate=true supports llama", "'gpt2'")
    assert not out.exists()
