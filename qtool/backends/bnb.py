"""bitsandbytes: NF4/FP4 (optionally double-quantized) and LLM.int8, quantized while loading.

Uses transformers' BitsAndBytesConfig, so OUT is the standard bitsandbytes-serialized HF
checkpoint: `AutoModelForCausalLM.from_pretrained(OUT)` reloads it wherever bitsandbytes is
installed. bitsandbytes >= 0.45 ships CPU kernels, so this runs here without CUDA. On CPU,
LLM.int8 casts fp32 activations to fp16 inside each matmul (bitsandbytes' own behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from qtool.backends import register
from qtool.backends.base import Backend, Capabilities, QuantSpec
from qtool.errors import SpecError
from qtool.models import ModelSource
from qtool.runtime import compute_dtype

BLOCK_SIZE_4BIT = 64  # fixed by bitsandbytes' 4-bit kernels


@dataclass
class BnbOptions:
    quant_type: str = field(default="nf4", metadata={"choices": ("nf4", "fp4"), "help": "4-bit data type"})
    double_quant: bool = field(default=True, metadata={"help": "quantize the 4-bit block scales too (saves ~0.37 bit/weight)"})
    int8_threshold: float = field(default=6.0, metadata={"help": "LLM.int8 outlier threshold (8-bit only)"})


@register
class BnbBackend(Backend):
    name = "bnb"
    summary = "bitsandbytes NF4/FP4 (4-bit, blocks of 64) and LLM.int8 (8-bit, per row), on the fly"
    capabilities = Capabilities(
        bits=(4, 8),
        needs_calibration=False,
        devices=("cpu", "cuda"),
        serializable=True,
        peft_trainable=True,
        packages={"bitsandbytes": "bnb"},
        group_sizes=(BLOCK_SIZE_4BIT, -1),
        format="bitsandbytes-serialized HF checkpoint (transformers + bitsandbytes; vLLM loads bnb 4-bit)",
    )
    Options = BnbOptions

    def make_spec(self, bits=None, group_size=None, options=None, seed=0, calibration=None, target=None) -> QuantSpec:
        if group_size is None and bits == 8:
            group_size = -1  # LLM.int8 scales each row
        # before the generic check, whose list of group sizes (64, -1) is both widths' together; a
        # mixed-precision target is refused first by the generic check (bnb has no per-layer widths)
        wrong = None if target else _group_size_error(self.default_bits if bits is None else bits, group_size)
        if wrong:
            raise SpecError(wrong)
        return super().make_spec(bits, group_size, options, seed, calibration, target)

    def check_spec(self, spec: QuantSpec) -> None:
        wrong = _group_size_error(spec.bits, spec.group_size)
        if wrong:
            raise SpecError(wrong)

    def bnb_config(self, spec: QuantSpec, device: str):
        from transformers import BitsAndBytesConfig

        if spec.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=spec.options.int8_threshold)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=spec.options.quant_type,
            bnb_4bit_use_double_quant=spec.options.double_quant,
            bnb_4bit_compute_dtype=compute_dtype(device),
        )

    def quantize(self, source: ModelSource, spec: QuantSpec, device: str, calibration=None) -> nn.Module:
        return source.load_model(device, compute_dtype(device), quantization_config=self.bnb_config(spec, device))

    def kernel(self, device: str) -> str:
        return f"bitsandbytes {'CPU' if device == 'cpu' else 'CUDA'} kernels"

    def effective_bits(self, spec: QuantSpec) -> float:
        if spec.bits == 8:
            return 8.0  # plus one fp32 scale per row, negligible
        if spec.options.double_quant:  # 8-bit block scales, one fp32 scale per 256 blocks
            return 4 + 8 / BLOCK_SIZE_4BIT + 32 / (BLOCK_SIZE_4BIT * 256)
        return 4 + 32 / BLOCK_SIZE_4BIT


def _group_size_error(bits: int, group_size: int | None) -> str | None:
    """Why bnb cannot take `group_size` at `bits` (None: it can, or the width is not bnb's)."""
    if bits == 4 and group_size not in (None, BLOCK_SIZE_4BIT):
        return f"bnb 4-bit uses fixed blocks of {BLOCK_SIZE_4BIT}; --group-size {group_size} is not possible"
    if bits == 8 and group_size not in (None, -1):
        return f"bnb 8-bit (LLM.int8) scales per row: use --group-size -1, not {group_size}"
    return None
