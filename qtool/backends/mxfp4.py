"""MXFP4 weights (OCP Microscaling Formats v1.0), in compressed-tensors' mxfp4-pack-quantized format.

E2M1 codes (0, ±0.5 … ±6), two per byte, in groups of 32 input columns, each group with a
power-of-two E8M0 scale; weight-only (activations stay in the compute dtype: the `MXFP4A16`
preset). Scales: the group's absmax (or the MSE observer), rounded by compressed-tensors. The
shared machinery is qtool.backends._compressed_tensors; on CPU qtool evaluates by emulation.
"""

from __future__ import annotations

from qtool.backends import register
from qtool.backends._compressed_tensors import Fp4Backend, ct_capabilities


@register
class Mxfp4Backend(Fp4Backend):
    name = "mxfp4"
    summary = "MXFP4 weights: E2M1, group 32, power-of-two E8M0 scales (OCP MX): compressed-tensors"
    capabilities = ct_capabilities(4, 32, "compressed-tensors mxfp4-pack-quantized (E2M1 packed, group 32); "
                                   "vLLM serves it on Blackwell GPUs (not run here)")
    default_group_size = 32
    weight_kind = "mxfp4"
