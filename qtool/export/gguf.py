"""`qtool export OUT --format gguf --type T`: a qtool checkpoint as a GGUF file for llama.cpp.

The path every type takes: the checkpoint's weights, dense (4-bit layers dequantized from their
codes, qtool.export.codes), go through llama.cpp's own converter (convert_hf_to_gguf.py from the
llamacpp engine's environment) into an F16 GGUF that carries the architecture, tokenizer and chat
template. Then:
- Q4_0 / Q4_1 (Q5_0 / Q5_1) from a 4-bit (5-bit) checkpoint whose groups are contiguous and a
  multiple of 32 input columns (gptq, awq, autoround, rtn; 5-bit: gptq's planar gptq_p, rtn), and
  Q8_0 from a symmetric 8-bit one: each GGUF block is written from the checkpoint's own integer
  codes, scale and zero point, not re-quantized. A symmetric grid with zero point 8 (16, 128) is
  Q4_0 (Q5_0, Q8_0; d = scale); any other is Q4_1 (Q5_1; d = scale, m = -scale * zero), exact up
  to fp16 rounding of d and m. ggml has no 8-bit weight type with a minimum, so an asymmetric
  8-bit grid has no exact type. Each mapped
  tensor is dequantized again (gguf.quants) and compared with the converter's
  F16 tensor before the file is kept; the rows the converter permutes (llama's q/k) are found the
  same way.
- F16, BF16, F32: the converter's output as it is.
- other llama.cpp types (Q8_0, Q4_K_M, ...): llama.cpp's quantizer (llama_model_quantize) on the
  F16 file. For an already-quantized checkpoint this quantizes twice, which costs quality: qtool
  says so.
The result is written next to its final name and renamed at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qtool.errors import CheckpointError, EngineError, OutputExistsError, SpecError
from qtool.export.codes import Codes, Grid, grid_codes, grid_of, layer_codes
from qtool.models import PROJECTIONS, projection_modules

log = logging.getLogger("qtool")

EXACT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")  # and Q8_0 from symmetric 8-bit codes (also a quantizer type)
#: the bit-widths whose codes GGUF blocks hold, with their families ("0": symmetric, "1": with a minimum)
CODE_FAMILIES = {4: "01", 5: "01", 8: "0"}
#: the layouts whose layers hold integer codes on a per-group grid (qtool.export.codes)
CODE_LAYOUTS = ("gptq", "gptq_v2", "gptq_p", "awq", "dense")
CONVERTER_TYPES = ("F16", "BF16", "F32")
# llama.cpp's quantizer types (llama_ftype names without the LLAMA_FTYPE_MOSTLY_ prefix)
#: the llama.cpp type of about the same bits per weight as a checkpoint of each width (the suggestion
#: when no type holds its codes unchanged)
NEAREST_TYPE = {2: "Q2_K", 3: "Q3_K_M", 6: "Q6_K", 8: "Q8_0"}
QUANTIZER_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q3_K_L",
                   "Q3_K_S", "Q2_K", "IQ4_NL", "IQ4_XS", "MXFP4_MOE")
GGUF_TYPES = tuple(dict.fromkeys(EXACT_TYPES + CONVERTER_TYPES + QUANTIZER_TYPES))  # Q5_0/Q5_1 are in two lists


@dataclass
class ExportResult:
    """What `export_gguf` wrote: path, GGUF type, how each tensor got there, and checks.

    mapped_tensors: tensors written from the checkpoint's codes; max_mapping_error: the largest
    |dequantized block - converter's F16 weight| over them; requantized: True when llama.cpp's
    quantizer re-quantized already-quantized weights; tensor_types: the file's tensor types with
    their counts ({"Q4_1": 128, "Q5_1": 82, "F32": 61, "F16": 1}).
    """

    path: str
    type: str
    source: str
    method: str
    mapped_tensors: int = 0
    max_mapping_error: float | None = None
    requantized: bool = False
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    size_bytes: int = 0
    tensor_types: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_folder(name: str) -> Path:
    """The checkpoint folder of a path or of a model name qtool resolves (a built-in model's
    converted folder). Raises CheckpointError / ModelNotFoundError (one line)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{name} is not a checkpoint folder (no config.json)")
        return folder
    if folder.suffix == ".gguf":
        raise SpecError(f"{name} is a GGUF already; export takes a checkpoint folder")
    from qtool.models import resolve_model

    return Path(resolve_model(name).location)


def block_type(bits: int, family: str) -> str:
    """The GGUF block type of `bits`-bit codes in a family ("0": symmetric, "1": with a minimum):
    block_type(5, "1") == "Q5_1". A type name's family is its last character."""
    return f"Q{bits}_{family}"


def exact_type(grid: Grid | None) -> tuple[str | None, str]:
    """(Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / None, why): the GGUF type the checkpoint's codes map onto
    without re-quantizing."""
    if grid is None:
        return None, "the checkpoint is not quantized (F16 keeps it as it is)"
    family = "0" if grid.sym else "1"
    if grid.rules and not all(family in CODE_FAMILIES.get(bits, "") for bits in grid.widths):
        return None, (f"{grid.method} with per-module bit-widths {'/'.join(map(str, grid.widths))} (mixed precision): "
                      "qtool writes blocks from codes for 4- and 5-bit layers (Q4_x, Q5_x; --mixed-bits 4,5) and "
                      "symmetric 8-bit ones (Q8_0)")
    if grid.bits == 8 and not grid.sym and grid.layout in CODE_LAYOUTS:
        return None, (f"{grid.method} 8-bit with zero points: ggml's Q8_0 is symmetric (quantize with --sym true "
                      "for an exact Q8_0); llama.cpp's Q8_0 re-quantizes the weights")
    if grid.bits not in CODE_FAMILIES and grid.layout in CODE_LAYOUTS:
        return None, (f"{grid.method} {grid.bits}-bit: qtool writes blocks from codes only for 4- and 5-bit "
                      f"(Q4_0/Q4_1, Q5_0/Q5_1) and symmetric 8-bit (Q8_0); llama.cpp's "
                      f"{NEAREST_TYPE.get(grid.bits, 'Q8_0')} re-quantizes the weights")
    if grid.layout not in CODE_LAYOUTS:
        return None, f"{grid.method} checkpoints store no integer codes on a per-group grid"
    if grid.group_size > 0 and grid.group_size % 32:
        return None, f"group size {grid.group_size} is not a multiple of GGUF's 32-weight blocks"
    if not grid.readable:
        return None, f"{grid.method} {grid.bits}-bit in layout {grid.layout}: qtool does not read its codes"
    # per-channel scales (group size -1): every 32-weight block of a row repeats the row's scale
    return block_type(grid.bits, family), "the checkpoint's codes map exactly"


def default_type(folder: Path) -> str:
    """The lossless GGUF type for a checkpoint: its exact 4-bit block type, F16 when unquantized.

    Raises SpecError when a quantized checkpoint has none (say a --type; it will be re-quantized)."""
    grid = grid_of(folder)
    kind, why = exact_type(grid)
    if kind:
        return kind
    if grid is None:
        return "F16"
    suggested = "Q8_0" if grid.rules else NEAREST_TYPE.get(grid.bits, "Q8_0")
    raise NoLosslessType(folder, why, suggested)


class NoLosslessType(SpecError):
    """No GGUF type holds a quantized checkpoint's weights unchanged: `why`, and the llama.cpp type
    `suggested` for an export that re-quantizes (what `qtool export --type` asks for)."""

    def __init__(self, folder: Path, why: str, suggested: str) -> None:
        self.folder, self.why, self.suggested = folder, why, suggested
        super().__init__(f"{folder}: no GGUF type holds its weights unchanged ({why}); give --type (e.g. {suggested}), "
                         "knowing that llama.cpp then quantizes already-quantized weights again")


def converter_paths() -> tuple[Path, Path]:
    """(python, convert_hf_to_gguf.py) of the llamacpp engine environment; EngineError when missing."""
    from qtool.engines import get

    engine = get("llamacpp")
    reason = engine.unavailable()
    script = engine.python().parents[1] / "convert" / "convert_hf_to_gguf.py"  # type: ignore[attr-defined]
    if reason or not script.is_file():
        raise EngineError(f"GGUF export runs llama.cpp's converter: {reason or f'{script} is missing'}")
    return engine.python(), script  # type: ignore[attr-defined]


EMBEDDING_TYPES = ("F16", "Q8_0")
EXPORT_FORMAT = 2  # part of cached exports' keys: bump when what export_gguf writes changes


def export_gguf(folder: str | Path, out: str | Path | None = None, gguf_type: str | None = None,
                force: bool = False, embedding_type: str = "F16") -> ExportResult:
    """Write the checkpoint `folder` as a GGUF file (see the module docstring).

    folder: a checkpoint folder or a model name qtool resolves (e.g. smollm2-135m). out: the .gguf
    path (default: FOLDER-TYPE.gguf beside the folder, NAME-TYPE.gguf here). embedding_type: with
    Q4_0/Q4_1 from codes, the token embedding (and an untied output head), which 4-bit methods leave
    unquantized, stays F16 (lossless) or becomes Q8_0 (gguf's quantizer, byte-identical to
    llama.cpp's: half the bytes of the largest matmul in a small model). Raises SpecError (unknown
    type, no lossless type), OutputExistsError (out exists and not force), CheckpointError (not a
    checkpoint), EngineError (the converter or quantizer is missing or fails).
    """
    start = time.perf_counter()
    name = str(folder)
    folder = model_folder(name)
    gguf_type = (gguf_type or default_type(folder)).upper()
    if gguf_type not in GGUF_TYPES:
        raise SpecError(f"unknown GGUF type {gguf_type}; types: {', '.join(GGUF_TYPES)}")
    embedding_type = embedding_type.upper()
    if embedding_type not in EMBEDDING_TYPES:
        raise SpecError(f"unknown embedding type {embedding_type}; types: {', '.join(EMBEDDING_TYPES)}")
    default_out = Path(name).expanduser() if Path(name).expanduser().is_dir() else Path(Path(name).name)
    out = Path(out).expanduser() if out else default_out.with_name(f"{default_out.name}-{gguf_type}.gguf")
    if out.is_dir():
        raise SpecError(f"{out} is a folder; give -o the path of the .gguf file to write")
    if out.suffix != ".gguf":
        raise SpecError(f"{out}: a GGUF export's name ends in .gguf")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "vocab.json")  # what llama.cpp's converter reads
    if not any((folder / f).is_file() for f in tokenizer_files):
        raise CheckpointError(f"{folder} has no tokenizer ({', '.join(tokenizer_files)}), which a GGUF carries: copy "
                              "the source model's tokenizer files into it")
    grid = grid_of(folder)
    method = grid.method if grid else "unquantized"
    kind, why = exact_type(grid)
    if kind is not None and grid is not None and grid.rules and gguf_type in EXACT_TYPES and gguf_type[-1] == kind[-1]:
        gguf_type = kind  # a mixed 4/5-bit plan: each tensor takes its own width; the file is named by the default
    if gguf_type in EXACT_TYPES and grid is not None and kind != gguf_type:
        grids = (f"its grid is {kind}" if kind is None or not grid.rules else
                 f"its grids are {' and '.join(block_type(b, kind[-1]) for b in grid.widths)}")
        raise SpecError(f"{folder} ({method}) cannot be written as {gguf_type} without re-quantizing: "
                        f"{why if kind is None else grids}; use --type {kind or 'Q8_0'}")
    python, script = converter_paths()
    result = ExportResult(str(out), gguf_type, str(folder), method)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        with tempfile.TemporaryDirectory(prefix="qtool-gguf-", dir=out.parent) as tmp:
            codes = dense_folder(folder, Path(tmp) / "dense", grid)
            f16 = Path(tmp) / "model-F16.gguf"
            outtype = gguf_type.lower() if gguf_type in CONVERTER_TYPES else "f16"
            _run([str(python), str(script), str(Path(tmp) / "dense"), "--outfile", str(f16), "--outtype", outtype],
                 "llama.cpp's converter")
            if (gguf_type in EXACT_TYPES or gguf_type == kind) and codes:
                result.mapped_tensors, result.max_mapping_error = write_mapped(f16, codes, partial, gguf_type, folder,
                                                                               embedding_type)
                if embedding_type != "F16":
                    result.notes.append(f"token embedding / output head quantized to {embedding_type} "
                                        "(the checkpoint kept them unquantized)")
                unmapped = projection_count(Path(tmp) / "dense") - result.mapped_tensors
                if unmapped:  # rtn: layers off the checkpoint's grid (a mixed plan's other widths)
                    result.notes.append(f"{unmapped} projections are not on the checkpoint's {grid.bits}-bit grid "
                                        "(other widths of a mixed-precision plan) and stay F16")
                if grid is not None and grid.rules:
                    result.notes.append("mixed precision: each projection in its own width's block type "
                                        f"({', '.join(block_type(b, gguf_type[-1]) for b in grid.widths)}); {gguf_type} "
                                        "names the default width")
            elif gguf_type in EXACT_TYPES or gguf_type in QUANTIZER_TYPES:
                result.requantized = grid is not None
                if grid is not None:
                    result.notes.append(f"{method} weights quantized again by llama.cpp's {gguf_type} quantizer: "
                                        "quality is that of quantizing twice")
                _run([str(python), "-c", QUANTIZE_SNIPPET, str(f16), str(partial), gguf_type], "llama.cpp's quantizer")
            else:
                shutil.move(str(f16), partial)
                if grid is not None:
                    result.notes.append(f"{method} weights stored dequantized in {gguf_type}")
        result.size_bytes = partial.stat().st_size
        result.tensor_types = tensor_counts(partial)
        if "_K" in gguf_type and not any(t.endswith("_K") for t in result.tensor_types):
            result.notes.append(f"no K-quant tensors although {gguf_type} was asked for: llama.cpp's K-quants need rows of a "
                                "multiple of 256 weights, "
                                f"so it fell back to {describe_counts(result.tensor_types)}")
        os.replace(partial, out)  # the last step: an interruption before it leaves nothing
    finally:
        partial.unlink(missing_ok=True)
    result.seconds = round(time.perf_counter() - start, 1)
    return result


QUANTIZE_SNIPPET = """
import sys, llama_cpp
src, dst, kind = sys.argv[1:4]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + kind)
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
sys.exit("llama_model_quantize returned %d" % rc if rc else 0)
"""


def _run(cmd: list[str], what: str) -> None:
    from qtool.engines.external import last_error

    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EngineError(f"{what} failed: {last_error(proc.stdout + proc.stderr)}")


def dense_folder(folder: Path, dense: Path, grid: Grid | None) -> dict[str, Codes]:
    """Write `folder` as an unquantized HF folder for the converter; return the layers' codes when
    they map onto GGUF blocks (exact_type; empty otherwise)."""
    from safetensors.numpy import load_file, save_file

    dense.mkdir(parents=True)
    for item in folder.iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".json")) or item.name in (
                "tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
            shutil.copy2(item, dense / item.name)
    tokenizer_config = dense / "tokenizer_config.json"
    if tokenizer_config.is_file():
        # transformers 5 names a tokenizer.json-backed tokenizer "TokenizersBackend"; the converter's
        # transformers 4.57 knows the same class as PreTrainedTokenizerFast.
        data = json.loads(tokenizer_config.read_text())
        if data.get("tokenizer_class") == "TokenizersBackend":
            data["tokenizer_class"] = "PreTrainedTokenizerFast"
            tokenizer_config.write_text(json.dumps(data, indent=2))
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    (dense / "config.json").write_text(json.dumps(config, indent=2))
    if grid is not None and not grid.readable:
        save_file(kernel_weights(folder), str(dense / "model.safetensors"), metadata={"format": "pt"})
        return {}
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    codes: dict[str, Codes] = {}
    out: dict[str, np.ndarray] = {}
    mapped = exact_type(grid)[0] is not None
    for name, value in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        if grid is not None and grid.layout != "dense" and leaf == "qweight":
            layer = layer_codes(grid.layer(prefix), tensors, prefix)
            out[f"{prefix}.weight"] = layer.dequantize()
            if f"{prefix}.bias" in tensors:
                out[f"{prefix}.bias"] = tensors[f"{prefix}.bias"].astype(np.float32)
            if mapped:
                codes[f"{prefix}.weight"] = _fills_blocks(layer, prefix)
        elif grid is not None and grid.layout != "dense" and leaf in ("qzeros", "scales", "g_idx", "bias") and \
                f"{prefix}.qweight" in tensors:
            continue
        else:
            out[name] = value.astype(np.float32) if value.dtype.kind == "f" or value.dtype == np.uint16 else value
            if grid is not None and grid.layout == "dense" and mapped and leaf == "weight" and \
                    prefix.rsplit(".", 1)[-1] in PROJECTIONS:
                layer = grid_codes(value.astype(np.float32), grid)
                if layer is not None:
                    codes[name] = _fills_blocks(layer, prefix)
    save_file(out, str(dense / "model.safetensors"), metadata={"format": "pt"})
    return codes


def kernel_weights(folder: Path) -> dict[str, np.ndarray]:
    """Every weight of a checkpoint as dense float32, whatever its format: the model is loaded by
    its qtool backend and each quantized projection's weight is read back through its own kernel,
    W = (layer(I) - layer(0))^T, so no format-specific unpacking is needed (hqq, bnb, aqlm, eetq, ...)."""
    from qtool import api

    model = api.load(folder, "cpu").model
    projections = projection_modules(model)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()
             if v.is_floating_point() and not k.startswith(tuple(projections))}
    for name, (weight, bias) in projection_weights(model).items():
        state[f"{name}.weight"] = weight.numpy()
        if bias is not None:
            state[f"{name}.bias"] = bias.numpy()
    return state


def projection_weights(model: Any) -> dict[str, tuple[Any, Any]]:
    """name -> (weight [out, in], bias [out] or None), float32, of every decoder projection as its
    kernel computes it: W = (layer(I) - layer(0))^T."""
    import torch

    result = {}
    with torch.no_grad():
        for name, module in projection_modules(model).items():
            dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
            cols = module.in_features
            bias = module(torch.zeros(1, cols, dtype=dtype)).float()
            weight = (module(torch.eye(cols, dtype=dtype)).float() - bias).T.contiguous()
            result[name] = (weight, bias[0] if getattr(module, "bias", None) is not None else None)
    return result


def _llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's converter (LlamaModel.permute) reorders q/k rows for its rotary layout.
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def _blocks(codes: Codes, gguf_type: str) -> np.ndarray:
    """uint8 [out, in/32 * block bytes] in ggml's block layouts (ggml-common.h): Q4_0 (d, 16 bytes of
    codes), Q4_1 (d, m, codes), Q5_0 (d, qh, codes), Q5_1 (d, m, qh, codes) or Q8_0 (d, 32 int8
    codes - 128). The low 4 bits of codes j and j + 16 share byte j; Q5's fifth bits sit in the
    32-bit qh, bit j for code j."""
    out, cols = codes.codes.shape
    bits, symmetric = int(gguf_type[1]), gguf_type.endswith("_0")
    q = codes.codes.reshape(out, cols // 32, 32)
    group = (np.arange(cols // 32) * 32) // codes.group_size
    d = np.ascontiguousarray(codes.scales[:, group], dtype=np.float16)
    parts = [d.view(np.uint8).reshape(out, -1, 2)]
    if not symmetric:
        m = np.ascontiguousarray(-d.astype(np.float32) * codes.zeros[:, group], dtype=np.float16)
        parts.append(m.view(np.uint8).reshape(out, -1, 2))
    elif not np.all(codes.zeros == 2 ** (bits - 1)):
        raise SpecError(f"{gguf_type} needs every zero point at {2 ** (bits - 1)} (a symmetric grid); "
                        + (f"use {gguf_type[:2]}_1" if bits < 8 else "ggml has no 8-bit type with a minimum"))
    if bits == 8:
        signed = (q.astype(np.int16) - 128).astype(np.int8)
        return np.concatenate([*parts, signed.view(np.uint8)], axis=-1).reshape(out, -1)
    packed = ((q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)).astype(np.uint8)
    if bits == 5:
        high = (q.astype(np.uint32) >> 4) << np.arange(32, dtype=np.uint32)
        parts.append(np.ascontiguousarray(high.sum(-1, dtype=np.uint32), dtype="<u4").view(np.uint8)
                     .reshape(out, -1, 4))
    return np.concatenate([*parts, packed], axis=-1).reshape(out, -1)


def projection_count(dense: Path) -> int:
    """How many attention/MLP projection weights the dense folder `dense_folder` wrote holds."""
    from safetensors import safe_open

    with safe_open(str(dense / "model.safetensors"), "np") as f:
        return sum(name.endswith(".weight") and name.rsplit(".", 2)[-2] in PROJECTIONS for name in f.keys())


def _fills_blocks(layer: Codes, prefix: str) -> Codes:
    """`layer`, whose groups must fill GGUF's 32-weight blocks (only per-channel rows can fail to).
    Raises SpecError."""
    if layer.group_size % 32:
        raise SpecError(f"{prefix}: rows of {layer.group_size} weights with one scale each do not fill GGUF's "
                        "32-weight blocks; give --type, knowing that llama.cpp then quantizes the weights again")
    return layer


def write_mapped(f16: Path, codes: dict[str, Codes], out: Path, gguf_type: str, source: Path,
                 embedding_type: str = "F16") -> tuple[int, float]:
    """Copy the converter's F16 GGUF to `out` with each projection written as blocks of its own codes,
    in `gguf_type`'s family at the layer's own width (a mixed 4/5-bit checkpoint: Q4_1 and Q5_1 blocks).

    Returns (mapped tensors, the largest |dequantized block - F16 weight|). Raises CheckpointError
    when a mapped tensor does not reproduce the converter's weight (a layout qtool misread).
    """
    import gguf

    reader = gguf.GGUFReader(f16)
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    n_blocks = int(reader.fields[f"{arch}.block_count"].contents())
    n_head = int(reader.fields[f"{arch}.attention.head_count"].contents())
    n_kv = int(reader.fields[f"{arch}.attention.head_count_kv"].contents()) if \
        f"{arch}.attention.head_count_kv" in reader.fields else n_head
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_enum, n_blocks)
    by_gguf = {names.get_name(hf, try_suffixes=(".weight",)): hf for hf in codes}
    writer = gguf.GGUFWriter(out, arch=arch, endianess=reader.endianess)
    file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{gguf_type}")
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        value = int(file_type) if f.name == gguf.Keys.General.FILE_TYPE else f.contents()
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, value, f.types[0], sub_type=sub)
    writer.add_string("qtool.source", str(source.resolve()))
    writer.add_string("qtool.gguf_mapping", f"{gguf_type} blocks from the checkpoint's integer codes")
    tensors, worst = [], 0.0
    for t in reader.tensors:
        hf = by_gguf.get(t.name)
        if hf is None and embedding_type != "F16" and t.name in ("token_embd.weight", "output.weight"):
            kind = getattr(gguf.GGMLQuantizationType, embedding_type)
            tensors.append((t.name, gguf.quants.quantize(np.asarray(t.data, dtype=np.float32), kind), kind))
            continue
        if hf is None:
            tensors.append((t.name, t.data, t.tensor_type))
            continue
        target = np.asarray(t.data, dtype=np.float32).reshape(codes[hf].codes.shape)
        kind = block_type(codes[hf].bits, gguf_type[-1])
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        blocks, error = None, None
        for heads in (None, n_head if "q_proj" in hf else n_kv if "k_proj" in hf else None):
            layer = codes[hf] if heads is None else _permuted(codes[hf], heads)
            candidate = _blocks(layer, kind)
            restored = gguf.quants.dequantize(candidate, qtype).reshape(target.shape)
            error = float(np.abs(restored - target).max())
            if error <= 2e-3 * float(np.abs(target).max()) + 1e-6:
                blocks = candidate
                break
        if blocks is None:
            raise CheckpointError(f"{source}: {hf} does not reproduce llama.cpp's converted weight "
                                  f"(max |difference| {error:.3g}); not writing a GGUF that differs from the checkpoint")
        worst = max(worst, error)
        tensors.append((t.name, blocks, qtype))
    for name, data, kind in tensors:
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _name, data, _kind in tensors:
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()
    return len(by_gguf), worst


def _permuted(codes: Codes, n_head: int) -> Codes:
    return Codes(_llama_permute(codes.codes, n_head), _llama_permute(codes.scales, n_head),
                 _llama_permute(codes.zeros, n_head), codes.group_size, codes.bits)


def tensor_counts(path: Path) -> dict[str, int]:
    """The GGUF's tensor types with their counts, most common first: {"Q4_0": 210, "F32": 61, "F16": 1}."""
    from collections import Counter

    import gguf

    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors).most_common())


def describe_counts(counts: dict[str, int]) -> str:
    """Tensor type counts as text, e.g. "Q4_0 ×210, F32 ×61, F16 ×1"."""
    return ", ".join(f"{k} ×{v}" for k, v in counts.items())


def tensor_types(path: Path) -> str:
    """The GGUF's tensor types with counts as text (describe_counts of tensor_counts)."""
    return describe_counts(tensor_counts(path))


def cached_export(folder: Path) -> Path:
    """The lossless GGUF of a checkpoint folder (default_type), exported once into qtool's cache."""
    import hashlib

    from filelock import FileLock

    from qtool.checkpoint import weights_size_bytes
    from qtool.models import cache_dir

    folder = folder.resolve()
    stamp = f"{folder}|{weights_size_bytes(folder)}|{(folder / 'config.json').stat().st_mtime_ns}|{EXPORT_FORMAT}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:12]
    kind = default_type(folder)
    path = cache_dir() / "gguf-exports" / f"{folder.name}-{key}-{kind}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / ".export.lock")):
        if not path.is_file():
            log.info("exporting %s to GGUF %s once; cached in %s", folder, kind, path)
            export_gguf(folder, path, kind)
    return path
