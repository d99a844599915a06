"""Integer codes, scales and zero points of a quantized checkpoint's linear layers, read from its files.

Why qtool's own code: GGUF export maps these codes straight onto llama.cpp blocks, and no library
exposes unpacked codes of GPTQ/AWQ checkpoints without loading a kernel. The layouts are the
published ones:
- GPTQ (AutoGPTQ / GPTQModel "gptq" checkpoint format, v1): qweight int32 [in/8, out], eight 4-bit
  codes per int32 along the input dimension, low bits first; qzeros int32 [groups, out/8] along the
  output dimension, stored as zero - 1; scales fp16 [groups, out]; g_idx int32 [in] (group of
  each input column). "gptq_v2" stores zeros without the - 1.
- GPTQModel "gptq_p" (its 5/6-bit checkpoints): codes in bit planes of 32-code blocks, unpacked
  with GPTQModel's own planar_unpack_rows / planar_unpack_cols; zero points stored raw.
- AWQ GEMM (llm-awq / AutoAWQ): qweight int32 [in, out/8] and qzeros int32 [groups, out/8], eight
  codes per int32 along the output dimension in the order 0, 2, 4, 6, 1, 3, 5, 7; scales fp16
  [groups, out]; no g_idx (groups are contiguous).
- rtn: dense weights on a per-group min-max (or absmax) grid; the grid is recovered from each
  group's range (qtool.backends.rtn) and checked to reproduce every weight.
Every layer: weight[o, i] = scales[o, g(i)] * (codes[o, i] - zeros[o, g(i)]).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from qtool.errors import CheckpointError

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


@dataclass
class Codes:
    """One linear layer as integer codes on per-group grids.

    codes: uint8 [out, in] in [0, 2**bits); scales: float32 [out, groups]; zeros: float32 [out, groups]
    (integers); group_size: input columns per group (contiguous); bits: the codes' width.
    """

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    group_size: int
    bits: int = 4

    def dequantize(self) -> np.ndarray:
        """float32 [out, in]."""
        g = np.arange(self.codes.shape[1]) // self.group_size
        return self.scales[:, g] * (self.codes.astype(np.float32) - self.zeros[:, g])


@dataclass(frozen=True)
class Grid:
    """How a checkpoint stores its quantized layers: method, bits, group size, symmetric or not."""

    method: str
    bits: int
    group_size: int
    sym: bool
    layout: str  # "gptq", "gptq_v2", "gptq_p" (GPTQModel's planar packing), "awq" or "dense"
    # mixed precision: GPTQModel's `dynamic` rules that give modules other bits, as (regex, bits)
    rules: tuple[tuple[str, int], ...] = ()

    @property
    def widths(self) -> tuple[int, ...]:
        """Every bit-width a layer of this checkpoint has."""
        return tuple(sorted({self.bits, *(bits for _, bits in self.rules)}))

    @property
    def readable(self) -> bool:
        """Whether layer_codes reads this grid's codes: a known layout whose codes fill int32 words
        evenly at every width (or GPTQModel's planar packing, which holds any width)."""
        return (self.layout in ("dense", "gptq_p") or self.layout in ("gptq", "gptq_v2", "awq")
                and all(32 % bits == 0 for bits in self.widths))

    def layer(self, module: str) -> Grid:
        """The grid of one module: its own bits where a `dynamic` rule names it (GPTQModel's first
        matching rule wins), the checkpoint's default otherwise."""
        bits = next((bits for pattern, bits in self.rules if re.match(pattern, module)), self.bits)
        return replace(self, bits=bits, rules=())


def grid_of(folder: Path) -> Grid | None:
    """The checkpoint's quantization grid from config.json / qtool.json, or None when unquantized."""
    from qtool.checkpoint import read_record

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder / 'config.json'} is unreadable or not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / 'config.json'} is not a JSON object")
    qc = config.get("quantization_config")
    record = read_record(folder) or {}
    if qc:
        method = str(qc.get("quant_method", "?")).lower()
        bits, group = int(qc.get("bits", 0) or qc.get("w_bit", 0)), int(qc.get("group_size", 0) or qc.get("q_group_size", 0))
        rules, other_groups = _dynamic_bits(qc.get("dynamic") or {})
        if method == "gptq":
            fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
            layout = "per-module groups" if other_groups else fmt if fmt in ("gptq_v2", "gptq_p") else "gptq"
            return Grid("gptq", bits, group, bool(qc.get("sym", True)), layout, rules)
        if method == "awq":
            return Grid("awq", bits, group, not bool(qc.get("zero_point", True)),
                        "per-module groups" if other_groups else "awq", rules)
        return Grid(method, bits, group, True, method)
    if record.get("method") == "rtn":
        spec = record.get("spec") or record
        options = spec.get("options") or {}
        # `symmetric`: the name of rtn's option in records written before it took gptq's `sym`
        sym = options.get("sym", options.get("symmetric"))
        return Grid("rtn", int(spec.get("bits") or 0), int(spec.get("group_size") or 0), bool(sym), "dense")
    return None


def _unpack_rows(packed: np.ndarray, bits: int) -> np.ndarray:
    """int32 [r, c] -> uint8 [r * 32/bits, c]: codes packed along the first dimension, low bits first."""
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, :, None]
    words = packed.astype(np.uint32)[:, None, :]
    return ((words >> shifts) & (2**bits - 1)).astype(np.uint8).reshape(-1, packed.shape[1])


def _unpack_cols(packed: np.ndarray, bits: int, order: list[int] | None = None) -> np.ndarray:
    """int32 [r, c] -> uint8 [r, c * 32/bits]: codes packed along the second dimension."""
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
    codes = ((packed.astype(np.uint32)[:, :, None] >> shifts) & (2**bits - 1)).astype(np.uint8)
    if order is not None:  # codes[..., j] holds the column order[j] of its block of eight
        unordered = np.empty_like(codes)
        unordered[..., order] = codes
        codes = unordered
    return codes.reshape(packed.shape[0], -1)


def layer_codes(grid: Grid, tensors: dict[str, np.ndarray], prefix: str) -> Codes:
    """Codes of the layer `prefix` (e.g. "model.layers.0.self_attn.q_proj") from its tensors.

    A per-channel layer (group size -1) comes back as one group the width of the row.
    Raises CheckpointError when its groups are not contiguous (act-order with a permuting g_idx).
    """
    scales = tensors[f"{prefix}.scales"].astype(np.float32).T  # [out, groups]
    if grid.layout in ("gptq", "gptq_v2"):
        codes = _unpack_rows(tensors[f"{prefix}.qweight"], grid.bits).T  # [out, in]
        zeros = _unpack_cols(tensors[f"{prefix}.qzeros"], grid.bits).astype(np.float32).T
        if grid.layout == "gptq":
            zeros = zeros + 1
    elif grid.layout == "gptq_p":
        codes, zeros = _planar_codes(tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"], grid.bits)
        codes, zeros = codes.T, zeros.T
    elif grid.layout == "awq":
        codes = _unpack_cols(tensors[f"{prefix}.qweight"], grid.bits, AWQ_ORDER).T
        zeros = _unpack_cols(tensors[f"{prefix}.qzeros"], grid.bits, AWQ_ORDER).astype(np.float32).T
    else:
        raise CheckpointError(f"{prefix}: layout {grid.layout} has no integer codes qtool can read")
    group = _group_size(grid, codes.shape[1])
    _check_contiguous(tensors.get(f"{prefix}.g_idx"), codes.shape[1], group, prefix)  # awq has no g_idx
    return Codes(np.ascontiguousarray(codes), np.ascontiguousarray(scales), np.ascontiguousarray(zeros), group,
                 grid.bits)


def _group_size(grid: Grid, columns: int) -> int:
    """Input columns per group: the grid's group size, or the whole row for per-channel scales (-1)."""
    return grid.group_size if grid.group_size > 0 else columns


def _dynamic_bits(dynamic: dict[str, Any]) -> tuple[tuple[tuple[str, int], ...], bool]:
    """(the (regex, bits) of GPTQModel `dynamic` rules that set bits, whether any rule sets a group
    size). Rule keys are "+:regex" or a bare regex for modules it changes; "-:regex" skips modules."""
    rules = tuple((key.removeprefix("+:"), int(rule["bits"])) for key, rule in dynamic.items()
                  if not key.startswith("-:") and isinstance(rule, dict) and "bits" in rule)
    groups = any(isinstance(rule, dict) and "group_size" in rule for rule in dynamic.values())
    return rules, groups


def _check_contiguous(g_idx: np.ndarray | None, columns: int, group_size: int, prefix: str) -> None:
    if g_idx is not None and not np.array_equal(g_idx, np.arange(columns) // group_size):
        raise CheckpointError(f"{prefix}: its groups are not contiguous input columns (act-order g_idx)")


def _planar_codes(qweight: np.ndarray, qzeros: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 [in, out], zero points float32 [groups, out]) of a gptq_p layer, unpacked by
    GPTQModel's own planar unpackers (the format is GPTQModel's; it stores zero points raw)."""
    import torch

    from qtool.backends._gptqmodel import import_quietly

    import_quietly()  # its banner and log lines would land on stdout (and in `qtool export --json -`)
    from gptqmodel.utils.planar_packing import planar_unpack_cols, planar_unpack_rows

    codes = planar_unpack_rows(torch.from_numpy(qweight), bits).numpy().astype(np.uint8)
    zeros = planar_unpack_cols(torch.from_numpy(qzeros), bits).numpy().astype(np.float32)
    return codes, zeros


def grid_codes(weight: np.ndarray, grid: Grid, tolerance: float = 1e-4) -> Codes | None:
    """Codes of a dense weight [out, in] that lies on rtn's per-group grid, or None when it does not.

    The grid of each group is recovered from its range: absmax / qmax for rtn's symmetric grid; for
    its min-max grid, the step is range / k where k is 2**bits - 1, or one or two less when rounding
    left the top or bottom code unused. None unless every weight is reproduced within `tolerance`
    steps of its group's grid.
    """
    out, cols = weight.shape
    g = _group_size(grid, cols)
    w = weight.astype(np.float32).reshape(out, cols // g, g)
    top = 2**grid.bits - 1
    if grid.sym:
        qmax = 2 ** (grid.bits - 1) - 1
        candidates = [np.maximum(np.abs(w).max(-1, keepdims=True) / qmax, 1e-10)]
    else:
        low, high = w.min(-1, keepdims=True), w.max(-1, keepdims=True)
        candidates = [np.maximum((high - low) / k, 1e-10) for k in (top, top - 1, top - 2)]
    best_scale = best_zero = None
    best_error = np.full(w.shape[:2] + (1,), np.inf, dtype=np.float32)
    for scale in candidates:
        # rtn's absmax grid uses codes in [-qmax, qmax]; unsigned: q + 2**(bits-1). Its min-max grid
        # puts the group's minimum on code 0.
        zero = np.full_like(scale, 2 ** (grid.bits - 1)) if grid.sym else np.round(-w.min(-1, keepdims=True) / scale)
        codes = np.clip(np.round(w / scale + zero), 0, top)
        error = np.abs((codes - zero) * scale - w).max(-1, keepdims=True) / scale
        better = error < best_error
        best_scale = scale if best_scale is None else np.where(better, scale, best_scale)
        best_zero = zero if best_zero is None else np.where(better, zero, best_zero)
        best_error = np.minimum(error, best_error)
    if best_error.max(initial=0.0) > tolerance:
        return None
    codes = np.clip(np.round(w / best_scale + best_zero), 0, top)
    return Codes(codes.reshape(out, cols).astype(np.uint8), best_scale[..., 0].astype(np.float32),
                 best_zero[..., 0].astype(np.float32), g, grid.bits)
