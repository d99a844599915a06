"""LoRA adapters on a loaded model: attach several by name, merge into a full-precision base."""

from __future__ import annotations

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
        folder = Path(path if sep else name).expanduser()
        if (folder / "adapter").is_dir() and not (folder / "adapter_config.json").exists():
            folder = folder / "adapter"  # a qlora run folder
        if not sep:
            name = folder.parent.name if folder.name == "adapter" else folder.name
        if not (folder / "adapter_config.json").is_file():
            raise CheckpointError(f"adapter {folder} has no adapter_config.json (expected a PEFT adapter or a qtool qlora run)")
        if name in adapters:
            raise SpecError(f"adapter name {name!r} is given twice")
        adapters[name] = folder
    return adapters


def attach_adapters(model: Any, adapters: dict[str, Path]) -> Any:
    """A PeftModel holding every adapter, the first one active; the model itself if there are none."""
    if not adapters:
        return model
    import_peft()
    from peft import PeftModel

    names = list(adapters)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(str(adapters[name]), adapter_name=name)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"adapter does not fit this model: {first}") from None
    peft_model.set_adapter(names[0])
    return peft_model.eval()


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
