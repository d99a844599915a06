"""`qtool export OUT --format compressed-tensors`: a gptq/awq/autoround/rtn checkpoint re-written
in compressed-tensors' pack-quantized layout (W4A16 / W8A16 with groups), the layout vLLM and
llm-compressor's outputs use, without re-quantizing.

The checkpoint's integer codes, scales and zero points (qtool.export.codes) become compressed-
tensors' signed codes q = code - 2**(bits-1) and zero points zp = zero - 2**(bits-1), so
scale * (q - zp) is the same weight; compressed-tensors packs them (ModelCompressor). Every
layer is decompressed again and compared with the source's weights before the folder is kept.
fp8/w8a8/mxfp4/nvfp4 outputs are compressed-tensors already.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from qtool.checkpoint import atomic_output_dir
from qtool.errors import CheckpointError, SpecError
from qtool.export.codes import Codes, grid_of
from qtool.export.gguf import ExportResult, dense_folder, model_folder
from qtool.runtime import package_versions

LAYOUTS = ("gptq", "gptq_v2", "awq", "dense")


def export_compressed_tensors(folder: str | Path, out: str | Path | None = None, force: bool = False) -> ExportResult:
    """Write the checkpoint `folder` as a compressed-tensors folder (see the module docstring).

    out: the folder to write (default: FOLDER-ct beside it), written as a temporary sibling and
    renamed at the end (qtool.checkpoint.atomic_output_dir: it may not be or contain the source, and
    --force replaces only a folder qtool wrote). It holds export.json (this result and the package
    versions). Raises SpecError (no integer grid to carry over), OutputExistsError (see above),
    CheckpointError (not a checkpoint, or a layer that does not survive the round trip).
    """
    start = time.perf_counter()
    name = str(folder)
    folder = model_folder(name)
    grid = grid_of(folder)
    if grid is not None and grid.method == "compressed-tensors":
        raise SpecError(f"{folder} is compressed-tensors already (vLLM loads it as it is)")
    if grid is None or grid.layout not in (*LAYOUTS, "gptq_p"):
        what = "unquantized" if grid is None else f"{grid.method} (no integer codes on a per-group grid)"
        raise SpecError(f"{folder} is {what}: only gptq, awq, autoround and rtn checkpoints are re-written in "
                        "compressed-tensors; quantize with --method fp8, w8a8, mxfp4 or nvfp4 for its other formats")
    if grid.rules:
        raise SpecError(f"{folder}: {grid.method} with per-module bit-widths (mixed precision): this export re-writes "
                        "checkpoints of one width")
    if grid.bits not in (4, 8) or grid.group_size <= 0:
        raise SpecError(f"{folder}: compressed-tensors' packed integer layout holds 4- and 8-bit weights with groups; "
                        f"this checkpoint is {grid.bits}-bit, group {grid.group_size}")
    default_out = Path(name).expanduser() if Path(name).expanduser().is_dir() else Path(Path(name).name)
    out = Path(out).expanduser() if out else default_out.with_name(f"{default_out.name}-ct")
    result = ExportResult(str(out), "pack-quantized", str(folder), grid.method)
    with atomic_output_dir(out, force, inputs=[folder]) as partial, \
            tempfile.TemporaryDirectory(prefix=".qtool-ct-", dir=partial.parent) as tmp:
        codes = dense_folder(folder, Path(tmp) / "dense", grid)
        model = _dense_model(Path(tmp) / "dense")
        layers = _attach_codes(model, codes, grid.bits, grid.group_size, grid.sym)
        from qtool.backends._compressed_tensors import save_compressed

        save_compressed(model, partial)
        for item in (Path(tmp) / "dense").iterdir():
            if item.is_file() and not item.name.endswith(".safetensors") and item.name != "config.json":
                shutil.copy2(item, partial / item.name)
        result.mapped_tensors = len(layers)
        result.max_mapping_error = _check(partial, codes)
        result.notes.append(f"{grid.method} codes carried over as W{grid.bits}A16 group {grid.group_size} "
                            f"{'symmetric' if grid.sym else 'with zero points'} (format pack-quantized)")
        (partial / "export.json").write_text(json.dumps({**result.as_dict(), "versions": package_versions()}, indent=2))
    result.seconds = round(time.perf_counter() - start, 1)
    result.size_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return result


def _dense_model(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _attach_codes(model, codes: dict[str, Codes], bits: int, group_size: int, sym: bool) -> list[str]:
    """Give every quantized Linear the W{bits}A16 group scheme and the checkpoint's scales and zero points."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs

    from qtool.backends._compressed_tensors import attach, quantization_config

    symmetric = sym and all(np.all(c.zeros == 2 ** (bits - 1)) for c in codes.values())
    args = QuantizationArgs(num_bits=bits, type="int", strategy="group", group_size=group_size, symmetric=symmetric,
                            dynamic=False)
    config = quantization_config(args, None, "none")
    config.ignore = ["lm_head"] + [n for n, m in model.named_modules()
                                   if isinstance(m, torch.nn.Linear) and f"{n}.weight" not in codes and n != "lm_head"]
    modules = dict(attach(model, config))
    if set(modules) != {name.removesuffix(".weight") for name in codes}:
        raise CheckpointError("the checkpoint's quantized layers do not match its model's Linear layers")
    half = 2 ** (bits - 1)
    with torch.no_grad():
        for name, module in modules.items():
            layer = codes[f"{name}.weight"]
            module.weight_scale.data = torch.from_numpy(layer.scales).to(module.weight_scale.dtype)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data = torch.from_numpy(layer.zeros - half).to(module.weight_zero_point.dtype)
            module.weight.data = torch.from_numpy(layer.dequantize())
    return list(modules)


def _check(folder: Path, codes: dict[str, Codes]) -> float:
    """Decompress every layer of the written folder and compare with the source's weights; the
    largest |difference|. Raises CheckpointError above fp16 rounding of the scales."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if hasattr(model, "ct_decompress_hook"):
        model.hf_quantizer.compressor.decompress_model(model)
    worst = 0.0
    for name, layer in codes.items():
        got = model.get_parameter(name).detach().float().numpy()
        want = layer.dequantize()
        error = float(np.abs(got - want).max())
        if error > 1e-3 * max(float(np.abs(want).max()), 1e-6):
            raise CheckpointError(f"{name}: compressed-tensors gives weights up to {error:.3g} away from the checkpoint's")
        worst = max(worst, error)
    return worst
