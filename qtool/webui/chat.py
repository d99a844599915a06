"""The web UI's chat: one model (with its LoRA adapters) held in the server, answers streamed.

It drives qtool.chat.Chat, the same object `qtool chat` uses (chat template, greedy decoding,
adapter switching through PEFT), from a worker thread whose streamed text a generator yields.
Loading a different model or adapter set replaces the one held; turns are served one at a time.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

BASE = "base (adapters off)"

_lock = threading.Lock()
_held: dict[str, Any] = {}


def load(model: str, adapters_text: str = "", max_new_tokens: Any = 128) -> tuple[str, list[str]]:
    """Load MODEL with adapters given as NAME=PATH lines (or commas); returns (a status line, the
    choices for the adapter switch: each adapter, then the base). Raises QtoolError in one line,
    and then the model held before stays loaded. A turn sent while loading waits for it."""
    from qtool import api
    from qtool.chat import Chat
    from qtool.errors import SpecError
    from qtool.finetune.adapters import attach_adapters, parse_adapter_args
    from qtool.models import model_context

    model = (model or "").strip()
    if not model:
        raise SpecError("an empty value for MODEL: give a path, name or text")
    if not isinstance(max_new_tokens, (int, float)) or max_new_tokens < 1 or max_new_tokens != int(max_new_tokens):
        raise SpecError(f"max new tokens takes a positive whole number, got {max_new_tokens}")
    items = [a.strip() for line in (adapters_text or "").splitlines() for a in line.split(",") if a.strip()]
    adapters = parse_adapter_args(items)
    context = model_context(api.model_config(model))
    if context is not None and max_new_tokens >= context:
        raise SpecError(f"max new tokens {int(max_new_tokens)} does not fit {model}'s context of {context} tokens")
    with _lock:
        loaded = api.load(model, device="cpu")
        peft_model = attach_adapters(loaded.model, adapters, model)
        _held["chat"] = Chat(peft_model, loaded.tokenizer, loaded.device, list(adapters), None,
                             int(max_new_tokens), name=model)
    names = list(adapters)
    active = names[0] if names else BASE
    note = " (no chat template: plain completion)" if _held["chat"].plain else ""
    return f"loaded {model} with adapters: {', '.join(names) or 'none'}; active: {active}{note}", [*names, BASE]


def answer(message: str, history: list[dict[str, Any]], adapter: str | None) -> Iterator[str]:
    """Stream the reply to `message` after `history` (Gradio's messages: role/content dicts), with
    `adapter` active (BASE or None: the base model). Yields the reply so far. Raises SpecError when
    no model is loaded or the adapter is unknown."""
    from qtool.errors import SpecError

    if not (message or "").strip():
        raise SpecError("the message is empty")
    with _lock:
        chat = _held.get("chat")
        if chat is None:
            raise SpecError("no model loaded: load one first")
        if adapter and adapter != BASE:
            if adapter not in chat.adapters:
                raise SpecError(f"no adapter {adapter!r}; loaded: {', '.join(chat.adapters) or 'none'}")
            chat.command(f"/adapter {adapter}")
        elif chat.adapters:
            chat.command("/base")
        chat.history = [{"role": m["role"], "content": _text(m["content"])} for m in history or []
                        if m.get("role") in ("user", "assistant")]
        pieces: queue.Queue[str | None] = queue.Queue()
        failure: list[BaseException] = []

        class Out:
            def write(self, text: str) -> None:
                pieces.put(text)

            def flush(self) -> None:
                pass

        def run() -> None:
            try:
                chat.answer(message.strip(), Out())  # type: ignore[arg-type]
            except BaseException as exc:  # shown to the user by the page
                failure.append(exc)
            finally:
                pieces.put(None)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        reply = ""
        while (piece := pieces.get()) is not None:
            reply += piece
            yield reply.strip()
        worker.join()
        if failure:
            raise failure[0]
        yield chat.history[-1]["content"]


def _text(content: Any) -> str:
    """Gradio 6 may give a message's content as a list of parts ({'type': 'text', 'text': ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)
