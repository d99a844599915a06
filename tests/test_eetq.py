import pytest
import torch

from qtool.backends.eetq import Int8WeightOnlyLinear


@pytest.mark.parametrize("bias", [False, True])
def test_int8_layer_is_the_per_row_absmax_grid(bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=bias)
    layer = Int8WeightOnlyLinear.from_linear(linear)
    w = linear.weight.detach()
    scale = w.abs().amax(dim=1) / 127
    assert layer.weight.dtype == torch.int8
    assert layer.weight.abs().amax(dim=1).eq(127).all()  # each row's largest weight hits the grid's end
    assert torch.allclose(layer.weight_scale, scale)
    assert ((layer.dequantized_weight() - w).abs() <= scale[:, None] / 2 + 1e-7).all()
    x = torch.randn(3, 5, 96)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, layer.dequantized_weight(), linear.bias if bias else None)
        assert torch.allclose(layer(x), expected, atol=1e-6)
        assert (layer(x) - linear(x)).abs().max() < 0.02


def test_int8_weights_take_a_quarter_of_fp32():
    layer = Int8WeightOnlyLinear.from_linear(torch.nn.Linear(576, 1536, bias=False))
    stored = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    assert stored < 576 * 1536 * 4 / 3.9
