import pytest
import torch

import qtool
from qtool.backends.rtn import rtn_dequantized


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_each_group_uses_at_most_2_to_the_bits_levels(bits, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(16, 128)
    deq = rtn_dequantized(w, bits, 32, symmetric)
    for group in deq.reshape(16, 4, 32).reshape(-1, 32):
        assert group.unique().numel() <= 2**bits


def test_error_is_within_half_a_step_and_shrinks_with_bits():
    torch.manual_seed(0)
    w = torch.randn(32, 256)
    errors = {}
    for bits in (2, 4, 8):
        deq = rtn_dequantized(w, bits, 64, symmetric=False)
        groups = w.reshape(32, 4, 64)
        step = (groups.amax(-1) - groups.amin(-1)) / (2**bits - 1)
        err = (deq - w).reshape(32, 4, 64).abs().amax(-1)
        assert torch.all(err <= step / 2 + 1e-6)
        errors[bits] = (deq - w).pow(2).mean().item()
    assert errors[8] < errors[4] < errors[2]


def test_per_channel_group():
    w = torch.randn(8, 96)
    deq = rtn_dequantized(w, 4, -1, symmetric=True)
    assert all(row.unique().numel() <= 16 for row in deq)


def test_rtn_checkpoint_reloads_with_the_quantized_weights(tiny_llama, tmp_path):
    out = tmp_path / "rtn"
    qtool.quantize(str(tiny_llama), out, "rtn", bits=3, group_size=32, device="cpu")
    loaded = qtool.load(out, device="cpu")
    original = qtool.load(str(tiny_llama), device="cpu")
    w0 = original.model.model.layers[0].mlp.down_proj.weight
    w1 = loaded.model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(w1, rtn_dequantized(w0, 3, 32, symmetric=False))
    assert w1.reshape(-1, 32)[0].unique().numel() <= 8


def test_every_option_of_the_method_is_also_a_flag(tiny_llama, tmp_path):
    """--sym true is --opt sym=true: flags come from the backend's Options dataclass."""
    import json

    from tests.conftest import assert_one_line_error, qtool_in_process

    out = tmp_path / "out"
    proc = qtool_in_process("quantize", "--method", "rtn", "--sym", "true", "--group-size", "32", "--quiet",
                            "--device", "cpu", tiny_llama, out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "qtool.json").read_text())["spec"]["options"] == {"sym": True}
    assert_one_line_error(qtool_in_process("quantize", "--method", "rtn", "--codebooks", "2", tiny_llama, tmp_path / "o2"),
                          "--codebooks is not a quantize flag and rtn has no option 'codebooks'; its options: --sym")
