"""LoRA adapters on a loaded model: attach several by name, check what they target, merge into a full-precision base."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from qtool.errors import CheckpointError, SpecError


def import_peft() -> None:
    """Import PEFT. It imports GPTQModel when installed, which prints a banner to stdout; do that
    import quietly first (the chat's stdout carries only the conversation)."""
    from importlib.util import find_spec

    if find_spec("gptqmodel") is not None:
        from qtool.backends._gptqmodel import import_quietly

        import_quietly()
    try:
        import peft  # noqa: F401
    except ImportError:
        from qtool.errors import BackendUnavailableError

        raise BackendUnavailableError("LoRA needs PEFT: pip install 'qtool[train]'") from None


def parse_adapter_args(values: list[str]) -> dict[str, Path]:
    """NAME=PATH pairs (or a bare PATH, named after its run folder) → {name: adapter folder}."""
    adapters: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if sep and not (name.strip() and path.strip()):
            raise SpecError(f"--adapter takes NAME=PATH or PATH, got {value!r}")
        folder = Path(path if sep else name).expanduser()
        if (folder / "adapter").is_dir() and not (folder / "adapter_config.json").exists():
            folder = folder / "adapter"  # a qlora run folder
        refuse_full_model_run(folder)
        if not sep:
            name = folder.parent.name if folder.name == "adapter" else folder.name
        check_adapter_folder(folder)
        if name in adapters:
            raise SpecError(f"adapter name {name!r} is given twice")
        adapters[name] = folder
    return adapters


def refuse_full_model_run(folder: Path) -> None:
    """A freeze or full fine-tuning run holds a whole model (RUN/model), not an adapter: say so in
    one line (CheckpointError) where an adapter is expected (chat --adapter, merge)."""
    if (folder / "model").is_dir() and not (folder / "adapter").exists() and not (folder / "adapter_config.json").exists():
        import json

        try:
            kind = json.loads((folder / "qtool.json").read_text()).get("finetuning_type", "freeze or full")
        except (OSError, ValueError, AttributeError):
            kind = "freeze or full"
        raise CheckpointError(f"{folder} is a {kind} fine-tuning run: it holds a whole model in {folder / 'model'}, "
                              f"not a LoRA adapter; use that folder as the model (qtool chat {folder / 'model'})")


def check_adapter_folder(folder: Path) -> None:
    """A PEFT adapter folder: a JSON-object adapter_config.json and whole weights, or CheckpointError."""
    import json

    from qtool.checkpoint import verify_safetensors_file

    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise CheckpointError(f"adapter {folder} has no adapter_config.json (expected a PEFT adapter or a qtool qlora run)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"adapter {folder}: adapter_config.json is not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"adapter {folder}: adapter_config.json is not a JSON object")
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        verify_safetensors_file(weights)
    elif not (folder / "adapter_model.bin").is_file():
        raise CheckpointError(f"adapter {folder} has no weights (adapter_model.safetensors)")


def attach_adapters(model: Any, adapters: dict[str, Path], base: str | None = None) -> Any:
    """A PeftModel holding every adapter, the first one active; the model itself if there are none.

    `base` names the model in messages (default: the folder it was loaded from). An adapter that
    does not fit (trained on another base) fails in one line naming both bases."""
    if not adapters:
        return model
    import_peft()
    from peft import PeftModel

    names = list(adapters)
    peft_model = model
    for name in names:
        try:
            if peft_model is model:
                peft_model = PeftModel.from_pretrained(model, str(adapters[name]), adapter_name=name)
            else:
                peft_model.load_adapter(str(adapters[name]), adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise CheckpointError(misfit_message(name, adapters[name], base or model_name(model), exc)) from None
    peft_model.set_adapter(names[0])
    return peft_model.eval()


def model_name(model: Any) -> str:
    """Where a loaded model came from, as transformers recorded it (its folder or Hub id)."""
    return getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "") or "this model"


def trained_on(folder: Path) -> str:
    """The base an adapter was trained on, from its adapter_config.json (PEFT records it)."""
    import json

    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return "an unrecorded base"
    return config.get("base_model_name_or_path") or "an unrecorded base"


SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
                           r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)")


def misfit_message(name: str, folder: Path, base: str, exc: BaseException) -> str:
    """One line for an adapter PEFT could not load onto `base`: both bases, then the first concrete
    reason (for a shape mismatch: which tensor, and its shape in the adapter and in the model)
    rather than torch's header line "Error(s) in loading state_dict for PeftModel:"."""
    text = str(exc).strip()
    mismatch = SIZE_MISMATCH.search(text)
    if mismatch:
        tensor = mismatch.group(1).removeprefix("base_model.model.")
        return (f"adapter {name} ({folder}) was trained on {trained_on(folder)} and does not fit {base}, a model of "
                f"other shapes: {tensor} is [{mismatch.group(2)}] in the adapter but [{mismatch.group(3)}] in the model")
    lines = [line.strip() for line in text.splitlines() if line.strip() and "Error(s) in loading" not in line]
    detail = lines[0] if lines else type(exc).__name__
    return f"adapter {name} ({folder}, trained on {trained_on(folder)}) does not fit {base}: {detail}"


def quantized_base_record(base: str) -> dict[str, Any] | None:
    """The qtool.json of a folder qtool quantized; None for any other model."""
    from qtool.checkpoint import read_record

    folder = Path(base).expanduser()
    return read_record(folder) if folder.is_dir() else None


def full_precision_source(base: str, record: dict[str, Any] | None) -> str:
    """The original a qtool quantized folder (its `record`) was made from; any other model is its own original."""
    if record is None:
        return base
    source = record.get("source") or {}
    location = source.get("location")
    return location if location and Path(location).exists() else source.get("name", base)


def weightless_model(config: Any) -> Any:
    """The model `config` describes, on the meta device: its module names and its weight sharing
    (tied embeddings are tied at construction) at no memory cost."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def shared_weights(model: Any) -> dict[str, list[str]]:
    """Each module whose own parameter another module holds too (tied embeddings: lm_head and
    embed_tokens), mapped to the other holders."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for param in {id(p) for p in module.parameters(recurse=False)}:
            holders.setdefault(param, []).append(name)
    return {name: [other for other in names if other != name]
            for names in holders.values() if len(names) > 1 for name in names}


def lora_config(folder: Path) -> Any:
    """The adapter's PEFT config (adapter_config.json), read as PEFT reads it."""
    import_peft()
    from peft import PeftConfig

    try:
        return PeftConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"adapter {folder}: adapter_config.json is unreadable: {first}") from None


def targets_among(config: Any, names: list[str]) -> list[str]:
    """The module names, of `names`, that the adapter puts LoRA layers on (PEFT's own matching rule)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    return [name for name in names if check_target_module_exists(config, name)]
