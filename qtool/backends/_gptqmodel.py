"""What the gptq and awq backends share: running GPTQModel quietly, with qtool's own progress.

GPTQModel (the maintained successor of auto-gptq, which also carries AutoAWQ's algorithm) draws
its own multi-line terminal UI and prints a table per module. qtool sends that output to
`quantize.log` next to the run and shows one progress bar over the quantized modules, whose
postfix is the last module's reconstruction loss; the per-module losses go into qtool.json.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from qtool.backends.base import Backend, Quantized
from qtool.calibration import CalibrationSet
from qtool.models import ModelSource
from qtool.rotation import check_rotatable, rotated_copy
from qtool.runtime import compute_dtype, library_output_to


def prepare_environment() -> None:
    """Settings GPTQModel reads at import time."""
    # On a 2-core machine its default asks for more CPU workers than the pool has and fails.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(os.cpu_count() or 1, 4))))
    os.environ.setdefault("GPTQMODEL_DISABLE_GIL_WARNING", "1")


def import_quietly() -> None:
    """Import GPTQModel (banner, torchao and kernel notices) without printing to the terminal.

    A failing import is left for the caller to repeat: Python does not cache the failure, so
    the second import raises the same error, which then reaches the user.
    """
    prepare_environment()
    with contextlib.suppress(Exception), library_output_to(Path(os.devnull)):
        import gptqmodel  # noqa: F401


@contextlib.contextmanager
def module_progress(total: int, desc: str, stream: Any, losses: list[dict[str, Any]]) -> Iterator[None]:
    """One bar over the quantized modules, fed by GPTQModel's per-module log rows."""
    from gptqmodel.looper.loop_processor import LoopProcessor

    bar = tqdm(total=total, desc=desc, unit="module", file=stream, dynamic_ncols=True)
    original = LoopProcessor.log_new_row

    def record_row(processor: Any, stat: dict[str, Any]) -> None:
        loss = _as_float(stat.get("loss"))
        losses.append({"layer": stat.get("layer"), "module": stat.get("module"), "loss": loss})
        bar.update(1)
        bar.set_postfix_str(f"layer {stat.get('layer')} {stat.get('module')} loss {loss:.3g}" if loss is not None else "")

    LoopProcessor.log_new_row = record_row  # type: ignore[method-assign]
    try:
        yield
    finally:
        LoopProcessor.log_new_row = original  # type: ignore[method-assign]
        bar.close()


def _as_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def keep_library_logs_in(folder: Path) -> None:
    """Send GPTQModel's per-processor log files (a `logs/` folder in the current directory, which it
    never removes and which a Ctrl-C leaves holding a log) into `folder`, which qtool owns.

    GPTQModel 7.7 has no setting for it: its module global `_PROJECT_LOG_DIR` is what it reads.
    qtool's own copy of the per-module table is `quantize.log` in OUT."""
    from gptqmodel.looper import loop_processor

    loop_processor._PROJECT_LOG_DIR = folder / "logs"


def quantize_with_gptqmodel(
    source: ModelSource, make_config: Callable[[str], Any], calibration: CalibrationSet, device: str, desc: str,
    modules: int, rotate: bool = False, seed: int = 0, rotation_kind: str = "orthogonal",
) -> Quantized:
    """Load `source` into GPTQModel, calibrate layer by layer, and return the quantized wrapper.

    `make_config(offload_dir)` builds the GPTQModel config; it runs inside the redirection, as it
    logs too. `offload_dir` is a folder qtool owns and removes however the run ends (GPTQModel's own
    default, a /tmp/gptqmodel_* TemporaryDirectory, survives Ctrl-C: qtool leaves at once then).
    With `rotate`, GPTQModel loads a copy of `source` rotated by the `rotation_kind` matrix that
    `seed` draws (qtool.rotation) instead.

    Returns a Quantized: the wrapper (which keeps the library log path in `qtool_log` for the
    backend's save()), the per-module losses, and with `rotate` the `rotation` record.
    """
    prepare_environment()
    rotated_folder = None
    if rotate:
        source, rotated_folder, rotation = rotated_copy(source, seed, compute_dtype(device), rotation_kind)
    offload_dir = tempfile.mkdtemp(prefix="qtool-gptqmodel-offload-")
    handle, name = tempfile.mkstemp(prefix="qtool-gptqmodel-", suffix=".log")
    os.close(handle)
    log_path = Path(name)
    losses: list[dict[str, Any]] = []
    try:
        with library_output_to(log_path) as terminal:
            from gptqmodel import DEVICE_THREAD_POOL, GPTQModel

            keep_library_logs_in(Path(offload_dir))
            try:
                model = GPTQModel.load(source.location, make_config(offload_dir), dtype=compute_dtype(device),
                                       device=device, trust_remote_code=False)
                with module_progress(modules, desc, terminal, losses):
                    model.quantize(calibration.as_gptqmodel_rows(), batch_size=1)
            except BaseException:
                # A worker thread still finalising a layer would re-create the offload folder
                # (os.makedirs) after it is removed below: let the in-flight layer finish first.
                DEVICE_THREAD_POOL.wait()
                raise
    except BaseException:
        log_path.unlink(missing_ok=True)  # the log moves into OUT only with a finished checkpoint
        shutil.rmtree(offload_dir, ignore_errors=True)
        if rotated_folder is not None:
            rotated_folder.cleanup()
        raise
    model.qtool_log = log_path
    model.qtool_offload_dir = offload_dir
    if rotated_folder is None:
        return Quantized(model, losses)
    model.qtool_rotated_folder = rotated_folder
    return Quantized(model, losses, {"rotation": rotation})


def save_gptqmodel(model: Any, out: Path) -> None:
    log = Path(model.qtool_log)
    try:
        with library_output_to(log):
            model.save(str(out))
        if log.exists():
            log.replace(out / "quantize.log")
    finally:
        log.unlink(missing_ok=True)
        shutil.rmtree(getattr(model, "qtool_offload_dir", ""), ignore_errors=True)
        rotated = getattr(model, "qtool_rotated_folder", None)
        if rotated is not None:  # the rotated fp copy GPTQModel loaded from (qtool.rotation)
            rotated.cleanup()


def loaded_kernels(model: torch.nn.Module) -> list[str]:
    """Class names of the quantized linear layers a loaded model runs (the kernel in use)."""
    return sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})


def quiet_load(load: Callable[[], Any]) -> Any:
    """Run a GPTQModel-backed load with its banner and kernel chatter kept off the terminal."""
    with library_output_to(Path(os.devnull)):
        return load()


def reload_and_name_kernels(backend: Any, out: Path, device: str) -> dict[str, Any]:
    """Reload OUT the way users will (plain transformers) and name the layer classes it picked."""
    model = backend.load(out, device)
    return {"loader": "transformers.AutoModelForCausalLM.from_pretrained", "kernel_classes": loaded_kernels(model)}


def check_damp_percent(method: str, damp_percent: float) -> None:
    """GPTQ's Hessian damping is a fraction of the mean diagonal (gptq, and the gptq=true options)."""
    from qtool.errors import SpecError

    if not 0 < damp_percent < 1:
        raise SpecError(f"{method} option damp_percent must be in (0, 1), got {damp_percent}")


PAPER_DAMP = 0.01  # the GPTQ paper's Hessian damping


def rounding_damp_field() -> Any:
    """The `damp_percent` option of a method whose GPTQ rounding is itself an option (`gptq=true`:
    awq and the compressed-tensors formats), defaulting to the GPTQ paper's damping."""
    from dataclasses import field

    return field(default=PAPER_DAMP, metadata={"help": "with gptq=true: GPTQ's Hessian damping, fraction of its mean diagonal"})


def check_rounding_damp(method: str, damp_percent: float, gptq: bool) -> None:
    """`damp_percent` next to an optional `gptq`: refused without gptq=true, and range-checked. Raises SpecError."""
    from qtool.errors import SpecError

    if damp_percent != PAPER_DAMP and not gptq:
        raise SpecError(f"{method} option damp_percent only applies with gptq=true (GPTQ's damping)")
    check_damp_percent(method, damp_percent)


def packed_bits_per_weight(bits: int, group_size: int) -> float:
    """GPTQ/AWQ layouts: `bits` per weight, plus per group a fp16 scale and a `bits`-wide packed zero."""
    return float(bits) if group_size == -1 else bits + (16 + bits) / group_size


@contextlib.contextmanager
def accepting_fp32(layer_class: type) -> Iterator[None]:
    """Let a GPTQModel torch layer class take fp32. Its declared dtypes say fp16/bf16 only, but its
    torch code computes in the input's dtype (transformers' loader, which does not check the list,
    already runs it in fp32 for 2/3/8-bit GPTQ on CPU)."""
    declared = layer_class.SUPPORTS_DTYPES
    layer_class.SUPPORTS_DTYPES = [*declared, torch.float32]
    try:
        yield
    finally:
        layer_class.SUPPORTS_DTYPES = declared


def dynamic_overrides(spec: Any) -> dict[str, dict[str, int]] | None:
    """GPTQModel's per-module `dynamic` config for a mixed-precision spec: one exact-name rule
    ("+:^name$") per module whose bits differ from spec.bits; None for one width everywhere."""
    rules = {f"+:^{re.escape(name)}$": {"bits": bits}
             for name, bits in (spec.layer_bits or {}).items() if bits != spec.bits}
    return rules or None


#: the widths transformers' GPTQConfig accepts; GPTQModel's torch kernel (TorchLinear) runs 2-8
TRANSFORMERS_GPTQ_BITS = (2, 3, 4, 8)


def needs_gptqmodel_loader(folder: Path) -> bool:
    """Whether a GPTQModel checkpoint must be loaded by GPTQModel's own loader, not transformers'.

    True when its default width is one transformers' GPTQConfig refuses (5 or 6 bits: "Only
    support quantization to [2,3,4,8] bits"), or its `dynamic` overrides change some module's bits
    or group size: transformers (through optimum 2.3) builds every layer with the default width
    and fails on those (size mismatch). GPTQModel's loader reads both.
    """
    config = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}
    if config.get("bits") not in TRANSFORMERS_GPTQ_BITS:
        return True
    dynamic = config.get("dynamic") or {}
    return any(isinstance(rule, dict) and ("bits" in rule or "group_size" in rule) for rule in dynamic.values())


# Group sizes torch's int4 CPU matmul (`_weight_int4pack_mm_cpu`) takes. GPTQModel's `auto` choice
# on some CPUs is its fused kernel over that matmul, which fails at the first forward on any other
# group: per-channel SmolLM2 (-1, rows of 576) stopped with "expect qGroupSize to be 32, 64, 128 or 256".
FUSED_GROUP_SIZES = (32, 64, 128, 256)


def fused_kernel_fits(config: dict[str, Any]) -> bool:
    """False for a 4-bit checkpoint (its config.json `quantization_config`) whose group size torch's
    fused int4 CPU matmul does not take; True otherwise (other widths keep GPTQModel's own choice)."""
    group = int(config.get("group_size") or config.get("q_group_size") or -1)
    return int(config.get("bits") or config.get("w_bit") or 0) != 4 or group in FUSED_GROUP_SIZES


def quiet_recompiles() -> None:
    """GPTQModel's TorchLinear compiles its dequantization per layer shape and width; past dynamo's
    recompile limit (128) it runs eagerly, which dynamo announces in multi-line warnings on stderr
    (per-channel or 8-bit SmolLM2: 13-16 lines on every eval, even with --quiet)."""
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)


class GptqModelBackend(Backend):
    """The base of the backends that write GPTQModel checkpoints (gptq, awq, autoround): quiet
    import, save, quiet load, kernel choice at load, reload check, size.

    Loading goes through transformers, which asks GPTQModel to pick a kernel for the layers. Its
    `auto` choice depends on the CPU: with AVX-512 bf16 it is the inference-only
    `TorchCpuAvx512Linear` (a backward pass raises NotImplementedError), otherwise
    `TorchAtenLinear`. Training therefore asks for GPTQModel's `auto_trainable` choice.
    """

    #: transformers' config class for this checkpoint format; only its `backend` is used at load.
    loading_config = "GPTQConfig"
    #: whether the layout stores an int32 g_idx per input column (GPTQ's does, AWQ's does not)
    stores_g_idx: ClassVar[bool] = True
    mixed_bits = (2, 3, 4, 8)
    # GPTQ/AWQ compensate their rounding error on the calibration inputs: costs are measured with
    # their own error, on the layers' outputs (on SmolLM2-135M gptq this plan beat the default
    # weight-space Fisher with round-to-nearest errors at 3.5 and 4.5 bits: docs/mixed-precision.md)
    mixed_defaults = ("output", "method")
    #: GPTQModel's torch kernel for every width and group size: mixed and per-channel checkpoints on CPU
    mixed_kernel: ClassVar[str] = "gptq_torch"
    stored_tensors_per_layer = 4  # qweight, qzeros, scales, g_idx (awq: 3)

    #: GPTQModel's torch layer for this format: its SUPPORTS_GROUP_SIZE lists the group sizes a
    #: checkpoint's layers can be built with (GPTQModel raises on others after the calibration pass)
    torch_layer: ClassVar[tuple[str, str]] = ("gptqmodel.nn_modules.qlinear.torch", "TorchLinear")

    def unavailable_reason(self, device: str = "cpu") -> str | None:
        import_quietly()
        return super().unavailable_reason(device)

    def check_spec(self, spec: Any) -> None:
        """The group size must be one GPTQModel's layers take; raise SpecError. Without GPTQModel
        installed nothing is checked here (the backend's availability check says what is missing)."""
        import importlib

        from qtool.errors import SpecError

        try:
            import_quietly()
            module, name = self.torch_layer
            allowed = getattr(importlib.import_module(module), name).SUPPORTS_GROUP_SIZE
        except ImportError:
            return
        if spec.group_size not in allowed:
            raise SpecError(f"{self.name} layers take group sizes {', '.join(map(str, allowed))} (GPTQModel's "
                            f"{name}); got {spec.group_size}")

    def save(self, model: Any, out: Path) -> None:
        save_gptqmodel(model, out)

    def load(self, path: Path, device: str) -> Any:
        return self.load_with_kernel(path, device, "auto")

    def load_for_training(self, path: Path, device: str) -> Any:
        return self.load_with_kernel(path, device, "auto_trainable")

    def load_with_kernel(self, path: Path, device: str, kernel: str) -> Any:
        """Load OUT with GPTQModel's kernel choice `kernel`.

        `kernel` is a GPTQModel backend name that transformers' config class accepts: "auto",
        "auto_trainable", or one kernel ("gptq_torch_aten", "gptq_torch_cpu_avx512", "torch_awq",
        ...). Raises ValueError for a name the config class rejects, and GPTQModel's error for a
        kernel this machine cannot run.
        """
        import transformers

        quiet_recompiles()  # GPTQModel's torch kernel serves every non-4-bit width too (8-bit: ~13 lines per eval)
        if needs_gptqmodel_loader(Path(path)):
            return quiet_load(lambda: self.load_with_gptqmodel(Path(path), device, kernel))
        quantization = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
        if device == "cpu" and kernel in ("auto", "auto_trainable") and not fused_kernel_fits(quantization):
            kernel = self.mixed_kernel
        kwargs: dict[str, Any] = {}
        if kernel != "auto":
            config_class = getattr(transformers, self.loading_config)
            kwargs["quantization_config"] = config_class(bits=quantization["bits"], backend=kernel)
        source = ModelSource(str(path), "folder", str(path))
        with warnings.catch_warnings():  # "loading attributes (backend) will be overwritten": what we asked
            warnings.simplefilter("ignore")
            return quiet_load(lambda: source.load_model(device, compute_dtype(device), **kwargs))

    def load_with_gptqmodel(self, path: Path, device: str, kernel: str) -> Any:
        """A mixed-precision or 5/6-bit checkpoint through GPTQModel's loader (needs_gptqmodel_loader).

        On CPU GPTQModel's `auto` choice follows the checkpoint's default bits and picks a 4-bit-only
        kernel (TorchFusedLinear in fp32) that then fails on the 2/3/8-bit layers, so "auto" and
        "auto_trainable" become `mixed_kernel`, the torch kernel for every width.
        """
        from gptqmodel import GPTQModel

        if device == "cpu" and kernel in ("auto", "auto_trainable"):
            kernel = self.mixed_kernel
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear

        with accepting_fp32(TorchLinear):
            return GPTQModel.load(str(path), device=device, dtype=compute_dtype(device), backend=kernel).model

    def reload_check(self, out: Path, device: str) -> dict[str, Any]:
        check = reload_and_name_kernels(self, out, device)
        if needs_gptqmodel_loader(out):
            check["loader"] = ("gptqmodel.GPTQModel.load (per-module bits or 5/6 bits: transformers 5 + optimum"
                               " ignore `dynamic` and take 2/3/4/8 bits)")
        return check

    def layer_bytes(self, spec: Any, out_features: int, in_features: int) -> int:
        """int32-packed codes and zero points, fp16 scales per group, and GPTQ's int32 g_idx."""
        groups = 1 if spec.group_size == -1 else in_features // spec.group_size
        return (in_features * out_features * spec.bits // 8 + groups * out_features * spec.bits // 8
                + groups * out_features * 2 + (4 * in_features if self.stores_g_idx else 0))

    def check_model(self, spec: Any, config: Any) -> None:
        if getattr(spec.options, "rotate", False):
            check_rotatable(config, spec.options.rotation)

    def effective_bits(self, spec: Any) -> float:
        return packed_bits_per_weight(spec.bits, spec.group_size)
