"""Streaming quantization: read a checkpoint one tensor at a time, write it one shard at a time.

For the backends that quantize each Linear on its own, without calibration data (rtn, hqq,
eetq: `Backend.streams`), the model never needs to be in memory. `stream_quantize` reads the
source's safetensors tensor by tensor, hands every quantizable Linear's weight (and bias) to
`Backend.quantize_layer`, casts every other tensor to the compute dtype (as loading the model in
that dtype would), and writes the results into shards of at most `max_shard_bytes` in the
Hugging Face sharded layout (`model-0000K-of-0000N.safetensors` + `model.safetensors.index.json`,
or one `model.safetensors`). Peak memory is the process's libraries and the largest source tensor
with the backend's temporaries; not the model, and not a shard. The written tensors are
those the in-memory path (`Backend.quantize` then `Backend.save`) writes, bit for bit
(tests/test_streaming.py).

Why qtool reads safetensors itself: `safetensors.safe_open` maps the whole file, privately and
writable, into the process; under a data-size limit (RLIMIT_DATA) a file larger than the limit
cannot even be opened, and every page a read touches stays in the process's resident set until
the file is closed. A positioned read per tensor into a fresh buffer (the format is an 8-byte
header length, a JSON header of dtypes, shapes and offsets, then the raw bytes) keeps the
process at one tensor. Writing likewise goes tensor by tensor (see ShardWriter); the files are
standard safetensors, read back by `safetensors.torch.load_file` in the tests.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 2 * 2**30

# safetensors dtype codes (https://github.com/huggingface/safetensors, format spec) -> torch
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie: `file`, byte `start` (from the file's start) and `nbytes`."""

    file: Path
    start: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def tensor_index(folder: Path) -> dict[str, TensorEntry]:
    """Every tensor of the folder's *.safetensors files, in file order then byte order.

    Raises CheckpointError (qtool.checkpoint) for a header that does not parse, and ValueError for
    a dtype safetensors knows but torch here does not.
    """
    from qtool.checkpoint import safetensors_header

    entries: list[tuple[Path, int, str, TensorEntry]] = []
    for path in sorted(Path(folder).glob("*.safetensors")):
        header, header_len = safetensors_header(path)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = (int(x) for x in info["data_offsets"])
            if info["dtype"] not in DTYPES:
                raise ValueError(f"{path.name}: tensor {name} has dtype {info['dtype']}, which qtool cannot stream")
            entry = TensorEntry(path, 8 + header_len + begin, end - begin, DTYPES[info["dtype"]], tuple(info["shape"]))
            entries.append((path, entry.start, name, entry))
    return {name: entry for _, _, name, entry in sorted(entries, key=lambda e: (str(e[0]), e[1]))}


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """The tensor's bytes read into a new CPU tensor (no memory map: see the module docstring)."""
    buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    with open(entry.file, "rb") as fh:
        fh.seek(entry.start)
        if fh.readinto(memoryview(buffer.numpy())) != entry.nbytes:
            from qtool.errors import CheckpointError

            raise CheckpointError(f"{entry.file} ended inside a tensor; the checkpoint is truncated")
    return buffer.view(entry.dtype).reshape(entry.shape)


class ShardWriter:
    """Write tensors into safetensors shards of at most `max_bytes` of data, one tensor at a time.

    Each tensor's bytes go to the current shard's data file as soon as it is added; when the next
    tensor would take the shard past `max_bytes` (a larger tensor gets a shard of its own), the
    shard is finished: its header (names, dtypes, shapes, offsets; padded with spaces to 8 bytes,
    as the format allows) is written, followed by the data, copied in 64 MiB pieces. `close()`
    names the shards as transformers' `save_pretrained` does and writes the index (none for a
    single shard). Memory: one tensor, whatever the shard size (`safetensors.torch.save_file`
    would need the whole shard in memory, and copies it once more into bytes while writing).
    """

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.header: dict[str, dict] = {}
        self.data_bytes = 0
        self.data: Any = None
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.largest_shard_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().contiguous().cpu()
        nbytes = tensor.numel() * tensor.element_size()
        if self.header and self.data_bytes + nbytes > self.max_bytes:
            self.flush()
        if self.data is None:
            self.data = open(self.folder / f".shard-{len(self.shards):05d}.data", "wb")  # noqa: SIM115 - closed in flush
        self.data.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        self.header[name] = {"dtype": DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape),
                             "data_offsets": [self.data_bytes, self.data_bytes + nbytes]}
        self.data_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        """Finish the current shard (header, then its data) as `.shard-K.safetensors.part`."""
        if not self.header:
            return
        self.data.close()
        data = Path(self.data.name)
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        path = self.folder / f".shard-{len(self.shards):05d}.safetensors.part"
        with open(path, "wb") as out, open(data, "rb") as source:
            out.write(struct.pack("<Q", len(header)) + header)
            shutil.copyfileobj(source, out, 64 * 2**20)
        data.unlink()
        self.shards.append((path, list(self.header)))
        self.largest_shard_bytes = max(self.largest_shard_bytes, self.data_bytes)
        self.header, self.data_bytes, self.data = {}, 0, None

    def close(self) -> list[Path]:
        """Finish the last shard, give the shards their final names; return them."""
        self.flush()
        if len(self.shards) == 1:
            path, _ = self.shards[0]
            final = self.folder / SINGLE_NAME
            path.rename(final)
            return [final]
        count, weight_map, finals = len(self.shards), {}, []
        for number, (path, names) in enumerate(self.shards, 1):
            final = self.folder / f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            finals.append(final)
            weight_map |= dict.fromkeys(names, final.name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return finals


@dataclass
class StreamStats:
    """What qtool.json records about a streamed run (bytes)."""

    source_tensors: int
    largest_source_tensor_bytes: int
    shards: int
    max_shard_bytes: int
    largest_shard_bytes: int

    def as_dict(self) -> dict[str, int | str]:
        return {"mode": "per tensor from safetensors", **self.__dict__}


def stream_reason(source: Any, backend: Any, config: Any) -> str | None:
    """None when `source` can be quantized by streaming with `backend`; else why not (one line).

    Streaming needs a backend that quantizes each Linear alone (Backend.streams), a local folder
    of safetensors, and tensor names that are the model's own (transformers renames or fuses some
    architectures' tensors while loading; those are quantized in memory). Raises CheckpointError
    for weights whose shapes disagree with the config, as loading them would.
    """
    from qtool.errors import CheckpointError
    from qtool.models import meta_model, shape_mismatch

    if not backend.streams:
        return f"{backend.name} quantizes the model as a whole"
    folder = Path(source.location)
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        return "the source is not a local folder of safetensors"
    mismatch = shape_mismatch(folder, config)
    if mismatch:  # the in-memory path's own error: the weights do not fit the config
        raise CheckpointError(f"{source.name} could not be loaded: {mismatch}")
    expected = set(meta_model(config).state_dict())
    try:
        found = set(tensor_index(folder))
    except ValueError as exc:
        return str(exc)
    if getattr(config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
        found.discard("lm_head.weight")
    if found != expected:
        odd = sorted(found ^ expected)[:2]
        return f"its tensor names are not the model's own (e.g. {', '.join(odd)}): transformers converts them on load"
    return None


def stream_quantize(source: Any, backend: Any, spec: Any, out: Path, device: str, dtype: torch.dtype,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> StreamStats:
    """Quantize the safetensors folder `source.location` into `out` (an existing, empty folder).

    Every Linear but the output head goes through `backend.quantize_layer` on `device` in
    `dtype`; everything else is cast to `dtype` (floating tensors) and copied. The config files
    come from `backend.write_config`. Call `stream_reason` first: this assumes it returned None.
    """
    from tqdm.auto import tqdm

    from qtool.models import linear_layers, meta_model

    config = source.config()
    model = meta_model(config)
    linears = linear_layers(model)
    index = tensor_index(Path(source.location))
    tied = getattr(config, "tie_word_embeddings", False)
    writer = ShardWriter(out, max_shard_bytes)
    consumed: set[str] = set()
    for name, entry in tqdm(index.items(), desc=f"{backend.name}: stream tensors", unit="tensor", leave=False):
        if name in consumed or (tied and name == "lm_head.weight"):
            continue
        module = name.rsplit(".", 1)[0]
        if module in linears and name.endswith(".weight"):
            bias = index.get(f"{module}.bias")
            consumed.add(f"{module}.bias")
            for key, tensor in quantized_layer_tensors(backend, spec, module, linears[module], entry, bias, device,
                                                       dtype):
                writer.add(key, tensor)
        else:
            tensor = read_tensor(entry)
            writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    shards = writer.close()
    config.dtype = dtype  # what a model loaded in `dtype` records when it is saved
    backend.write_config(config, source_generation_config(source, config), out)
    return StreamStats(len(index), max(e.nbytes for e in index.values()), len(shards), max_shard_bytes,
                       writer.largest_shard_bytes)


def quantized_layer_tensors(backend: Any, spec: Any, name: str, meta_linear: nn.Linear, weight: TensorEntry,
                            bias: TensorEntry | None, device: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(full tensor name, tensor) of the Linear `name` once `backend` quantized it, as the model's
    state_dict would list them."""
    linear = nn.Linear(meta_linear.in_features, meta_linear.out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(read_tensor(weight).to(device=device, dtype=dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(read_tensor(bias).to(device=device, dtype=dtype), requires_grad=False)
    holder = nn.Module()  # the same state_dict recursion as the whole model's
    holder.add_module("layer", backend.quantize_layer(name, linear, spec, device))
    for key, tensor in holder.state_dict().items():
        yield f"{name}.{key.removeprefix('layer.')}", tensor


def source_generation_config(source: Any, config: Any) -> Any:
    """The source folder's generation config; else, as transformers makes it when loading, the
    one `config` implies."""
    from transformers import GenerationConfig

    if (Path(source.location) / "generation_config.json").is_file():
        try:
            return GenerationConfig.from_pretrained(source.location)
        except (OSError, ValueError):
            pass
    return GenerationConfig.from_model_config(config)
