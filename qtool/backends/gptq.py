"""GPTQ (Frantar et al., 2023): second-order, layer-by-layer weight quantization from calibration data.

Built on GPTQModel, the maintained successor of the archived auto-gptq. Chosen over
llm-compressor because llm-compressor 0.14 pins transformers <= 5.17 and torch <= 2.14, while
qtool runs transformers 5.23; GPTQModel 7.7 quantizes here in fp32 on the CPU (its bf16
default is ~6x slower on a CPU without bf16 units) and writes the standard GPTQ layout
(`quantization_config` in config.json, int32-packed qweight/qzeros/scales/g_idx) that
transformers (through optimum + GPTQModel) and vLLM/SGLang load.

GPTQModel quantizes one decoder layer at a time and offloads finished layers to disk, so only
one layer's activations are resident; see the README for models larger than memory.

`--opt rotate=true` hands GPTQModel a residual-stream-rotated copy of the model (qtool.rotation):
on SmolLM2-135M it took 4-bit g64 PPL from +11-13 % to +8-9 % over the base (README table).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from qtool.backends import register
from qtool.backends._gptqmodel import (
    GptqModelBackend,
    check_damp_percent,
    dynamic_overrides,
    quantize_with_gptqmodel,
)
from qtool.backends.base import Capabilities, Quantized, QuantSpec
from qtool.calibration import CalibrationSet
from qtool.errors import SpecError
from qtool.models import ModelSource, quantizable_linears
from qtool.rotation import ROTATION_KINDS, rotate_with_seed

#: codes per block of GPTQModel's planar (gptq_p) packing, which holds its 5- and 6-bit layers
PLANAR_BLOCK = 32


@dataclass
class GptqOptions:
    sym: bool = field(default=True, metadata={"help": "symmetric grid (no zero point); false adds a zero point per group"})
    desc_act: bool = field(default=False, metadata={"help": "act-order: quantize columns by decreasing Hessian diagonal (slower kernels when grouped)"})
    act_group_aware: bool = field(default=True, metadata={"help": "GPTQModel's group-aware act-order: its benefit, kernel-friendly layout (ignored with desc_act)"})
    true_sequential: bool = field(default=True, metadata={"help": "quantize q/k/v, then o, then up/gate, then down, each seeing the already-quantized ones"})
    damp_percent: float = field(default=0.05, metadata={"help": "Hessian damping, fraction of its mean diagonal (paper: 0.01)"})
    offload_to_disk: bool = field(default=True, metadata={"help": "move finished layers to disk while quantizing (for models larger than memory)"})
    mse: float = field(default=0.0, metadata={"help": "grid-search each group's range to minimise |error|^mse before GPTQ (GPTQ paper's --mse uses 2.4; 0: min/max)"})
    gptaq: bool = field(default=False, metadata={"help": "GPTAQ (asymmetric calibration: also corrects for the error of earlier quantized layers)"})
    rotate: bool = field(default=False, metadata={"help": "first rotate the residual stream by a seeded random matrix (--seed; kind: rotation), folded into the weights (QuaRot/SpinQuant R1): same architecture, lm_head untied; loads the model once in fp32"})
    rotation: str = field(default="orthogonal", metadata={"choices": ROTATION_KINDS, "help": "rotate=true's matrix: orthogonal (QR of a Gaussian, any width) or hadamard (randomized Hadamard, QuaRot; hidden size k·2^m with a known order k)"})


@register
class GptqBackend(GptqModelBackend):
    name = "gptq"
    summary = ("GPTQ via GPTQModel: calibrated 2/3/4/8-bit, standard GPTQ checkpoint (transformers, vLLM, SGLang);"
               " 5/6-bit load in GPTQModel only")
    capabilities = Capabilities(
        bits=(2, 3, 4, 5, 6, 8),
        needs_calibration=True,
        devices=("cpu", "cuda"),
        serializable=True,
        peft_trainable=True,
        packages={"gptqmodel": "gptq", "optimum": "gptq"},
        format=("GPTQ (int32-packed; quantization_config in config.json): transformers + optimum + gptqmodel, vLLM, SGLang,"
                " TGI; 5/6-bit and per-module bits: GPTQModel's loader (qtool.load) only"),
    )
    Options = GptqOptions
    # 5 and 6 bits: GPTQModel packs and runs them (TorchLinear) and loads them with its own loader
    # (transformers' GPTQConfig takes 2/3/4/8); vLLM's GPTQ kernels do not run them, and each width
    # costs a plan one more uniform gptq run, so a plan takes them only when --mixed-bits names them
    mixed_bits = (2, 3, 4, 5, 6, 8)
    mixed_default_bits = (2, 3, 4, 8)

    def check_spec(self, spec: QuantSpec) -> None:
        super().check_spec(spec)
        if spec.options.mse < 0:
            raise SpecError(f"gptq option mse must be >= 0 (0 turns the range search off), got {spec.options.mse}")
        check_damp_percent(self.name, spec.options.damp_percent)
        if spec.options.rotation != "orthogonal" and not spec.options.rotate:
            raise SpecError(f"gptq option rotation={spec.options.rotation} chooses rotate=true's matrix: add rotate=true")

    def check_layers(self, spec: QuantSpec, linears: dict[str, nn.Linear]) -> None:
        """Also: 5- and 6-bit layers are packed in GPTQModel's planar layout (format gptq_p), whole
        blocks of 32 codes, so both widths of every layer must be multiples of 32 (GPTQModel 7.7's
        qlinear refuses others when it builds the layer, after the calibration pass)."""
        super().check_layers(spec, linears)
        wide = sorted({5, 6} & set(self.mixed_widths(spec.target) if spec.target else {spec.bits}))
        bad = sorted({w for m in linears.values() for w in (m.in_features, m.out_features) if w % PLANAR_BLOCK})
        if wide and bad:
            widths, found = "/".join(map(str, wide)), ", ".join(map(str, bad))
            raise SpecError(f"gptq {widths}-bit layers (GPTQModel's planar packing) need layer widths divisible by "
                            f"{PLANAR_BLOCK}; this model has {found}: use 2/3/4/8 bits")

    def quantize(
        self, source: ModelSource, spec: QuantSpec, device: str, calibration: CalibrationSet | None = None
    ) -> Quantized:
        from gptqmodel import QuantizeConfig
        from gptqmodel.quantization.config import GPTAQConfig

        o = spec.options

        def config(offload_dir: str):
            return QuantizeConfig(
                bits=spec.bits,
                group_size=spec.group_size,
                sym=o.sym,
                desc_act=o.desc_act,
                # group-aware act-order reorders within groups: per-channel (group size -1) has none
                act_group_aware=o.act_group_aware and not o.desc_act and spec.group_size > 0,
                true_sequential=o.true_sequential,
                damp_percent=o.damp_percent,
                offload_to_disk=o.offload_to_disk,
                offload_to_disk_path=offload_dir,
                mse=o.mse,
                gptaq=GPTAQConfig() if o.gptaq else None,
                dynamic=dynamic_overrides(spec),
            )

        modules = len(quantizable_linears(source.config()))
        return quantize_with_gptqmodel(source, config, calibration, device, "gptq", modules, rotate=o.rotate, seed=spec.seed,
                                       rotation_kind=o.rotation)

    def added_parameters(self, spec: QuantSpec, config) -> tuple[int, int]:
        if spec.options.rotate and getattr(config, "tie_word_embeddings", False):
            return config.vocab_size * config.hidden_size, 1  # the untied output head
        return 0, 0

    def sensitivity_transform(self, spec: QuantSpec) -> str:
        if not spec.options.rotate:
            return ""
        kind = "" if spec.options.rotation == "orthogonal" else f"{spec.options.rotation}, "
        return f"residual stream rotated ({kind}seed {spec.seed}), as rotate=true quantizes it"

    def sensitivity_model(self, model: nn.Module, spec: QuantSpec) -> None:
        if spec.options.rotate:
            rotate_with_seed(model, spec.seed, spec.options.rotation)

    def kernel(self, device: str) -> str:
        return gptq_kernel(device)


def gptq_kernel(device: str) -> str:
    """What runs a GPTQ-layout checkpoint (gptq's and autoround's) on `device`."""
    if device == "cpu":
        return ("gptqmodel torch kernels on CPU, picked at load by CPU features (4-bit: TorchCpuAvx512Linear"
                " with AVX-512 bf16, else TorchAtenLinear; other bits: TorchLinear); training loads a trainable one")
    return "fastest GPTQModel CUDA kernel for the format (Marlin, Machete, ExLlama v2, Triton), picked at load"
