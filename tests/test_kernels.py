"""Kernel choice depends on the job, not on one CPU.

GPTQModel picks the layer class of a GPTQ/AWQ checkpoint by CPU features: on AVX-512 bf16 CPUs
its `auto` choice is the inference-only `TorchCpuAvx512Linear`, elsewhere `TorchAtenLinear`.
These tests force each CPU path the library exposes (the AVX-512 one only where the CPU has it),
check that they compute the same function, and that loading for training gets a layer with a
backward pass on every CPU.
"""

import pytest
import torch

import qtool
from qtool import backends

pytest.importorskip("gptqmodel", reason="gptq/awq need GPTQModel: scripts/setup-venv.sh installs it")

IDS = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))


def has_avx512_bf16() -> bool:
    from gptqmodel.utils.cpu_features import has_avx512_bf16 as library_check

    return library_check()


@pytest.fixture(scope="module")
def tiny_checkpoints(tiny_llama, tmp_path_factory):
    """4-bit g32 gptq and awq checkpoints of the tiny Llama (a few seconds each)."""
    root = tmp_path_factory.mktemp("kernels")
    for method in ("gptq", "awq"):
        qtool.quantize(str(tiny_llama), root / method, method, bits=4, group_size=32, calib="builtin",
                       nsamples=4, seqlen=64, device="cpu")
    return root


def layer_classes(model):
    return {type(m) for m in model.modules() if hasattr(m, "qweight")}


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize(
    ("method", "kernel", "expected"),
    [
        ("gptq", "gptq_torch_aten", "TorchAtenLinear"),  # what `auto` picks without AVX-512 bf16
        ("gptq", "gptq_torch", "TorchLinear"),
        ("gptq", "gptq_torch_cpu_avx512", "TorchCpuAvx512Linear"),  # `auto` on AVX-512 bf16
        ("awq", "torch_awq", "AwqTorchLinear"),
    ],
)
def test_every_cpu_kernel_computes_what_auto_computes(method, kernel, expected, tiny_checkpoints):
    if kernel == "gptq_torch_cpu_avx512" and not has_avx512_bf16():
        pytest.skip("GPTQModel's AVX-512 kernel needs a CPU with AVX-512 bf16; this one has none")
    backend = backends.get(method)
    folder = tiny_checkpoints / method
    forced = backend.load_with_kernel(folder, "cpu", kernel)
    assert {c.__name__ for c in layer_classes(forced)} == {expected}
    torch.testing.assert_close(logits(forced), logits(backend.load(folder, "cpu")), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_loading_for_training_gets_a_trainable_kernel_on_every_cpu(method, tiny_checkpoints):
    loaded = qtool.load(tiny_checkpoints / method, device="cpu", trainable=True)
    classes = layer_classes(loaded.model)
    assert classes and all(c.SUPPORTS_TRAINING for c in classes), classes
    loaded.model.train()  # the inference-only AVX-512 layers raise NotImplementedError here

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model(IDS, labels=IDS).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_an_unknown_kernel_name_is_refused(tiny_checkpoints):
    with pytest.raises(ValueError, match="no_such_kernel"):
        backends.get("awq").load_with_kernel(tiny_checkpoints / "awq", "cpu", "no_such_kernel")
