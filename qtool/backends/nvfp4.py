"""NVFP4 weights (NVIDIA's Blackwell format), in compressed-tensors' nvfp4-pack-quantized format.

E2M1 codes (0, ±0.5 … ±6), two per byte, in groups of 16 input columns, each group with an FP8
E4M3 scale, plus one FP32 global scale per tensor that brings the group scales into E4M3's range
(generate_gparam); weight-only (the `NVFP4A16` preset). The shared machinery is
qtool.backends._compressed_tensors; on CPU qtool evaluates by emulation.
"""

from __future__ import annotations

from qtool.backends import register
from qtool.backends._compressed_tensors import Fp4Backend, ct_capabilities


@register
class Nvfp4Backend(Fp4Backend):
    name = "nvfp4"
    summary = "NVFP4 weights: E2M1, group 16, FP8 E4M3 scales + FP32 global scale: compressed-tensors"
    capabilities = ct_capabilities(4, 16, "compressed-tensors nvfp4-pack-quantized (E2M1 packed, group 16); "
                                   "vLLM serves it on Blackwell GPUs (not run here)")
    default_group_size = 16
    weight_kind = "nvfp4"
