"""`qtool chat`: a terminal chat with a model and its LoRA adapters, switched live.

Reads user turns from stdin (a terminal or a pipe, so it can be scripted), streams each answer
token by token through the model's chat template, and keeps the conversation. A model without a
chat template (a base model, or a tokenizer saved without one) is chatted with as plain
completion, as `qtool generate` does: the conversation so far is the text to continue, one turn
a line; the chat says so once on stderr. Commands:
/adapter NAME (switch), /base (adapters off), /adapters (list), /reset (forget the turns),
/quit. Decoding is greedy so that the same question gets the same answer.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import torch

HELP = "commands: /adapter NAME, /base, /adapters, /reset, /quit"


class Chat:
    def __init__(self, model: Any, tokenizer: Any, device: str, adapters: list[str], system: str | None = None,
                 max_new_tokens: int = 128, name: str | None = None) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.adapters = adapters
        self.active: str | None = adapters[0] if adapters else None
        self.system, self.max_new_tokens = system, max_new_tokens
        self.history: list[dict[str, str]] = []
        self.name = name or getattr(tokenizer, "name_or_path", None) or "the model"
        self.plain = not getattr(tokenizer, "chat_template", None)  # no template: plain completion

    def command(self, line: str) -> str | None:
        """Run a /command; returns the message to show (None for /quit)."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name == "quit" or name == "exit":
            return None
        if name == "base":
            self.active = None
            return "adapters off: answering with the base model"
        if name == "adapter":
            if arg not in self.adapters:
                return f"no adapter {arg!r}; loaded: {', '.join(self.adapters) or 'none'}"
            self.active = arg
            self.model.set_adapter(arg)
            return f"adapter {arg} on"
        if name == "adapters":
            return f"adapters: {', '.join(self.adapters) or 'none'} (active: {self.active or 'base'})"
        if name == "reset":
            self.history = []
            return "conversation cleared"
        return f"unknown command /{name}; {HELP}"

    @torch.no_grad()
    def answer(self, text: str, out: TextIO) -> str:
        self.history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        inputs = {k: v.to(self.device) for k, v in self.encode(messages).items()}
        streamer = _streamer(self.tokenizer, out)
        off = self.model.disable_adapter() if self.active is None and self.adapters else contextlib.nullcontext()
        with off:
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                         streamer=streamer, pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        reply = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        self.history.append({"role": "assistant", "content": reply})
        return reply


    def encode(self, messages: list[dict[str, str]]) -> dict[str, torch.Tensor]:
        """The prompt for the next answer: the chat template's rendering of `messages` with the
        assistant's turn opened, or (no template) the turns' text, one a line, to be continued."""
        if not self.plain:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                      return_dict=True)
        return self.tokenizer("\n".join(m["content"] for m in messages), return_tensors="pt")


def _streamer(tokenizer: Any, out: TextIO) -> Any:
    """transformers' TextStreamer (decodes whole words as they come), writing to `out`."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def run_chat(chat: Chat, lines: Iterable[str], out: TextIO = sys.stdout, interactive: bool = False) -> int:
    note = sys.stderr
    if chat.plain:
        note.write(f"qtool: {chat.name} has no chat template; chatting as plain completion\n")
    note.write(f"qtool chat: adapters {', '.join(chat.adapters) or 'none'} (active: {chat.active or 'base'}); {HELP}\n")
    if interactive:
        note.write("you> ")
        note.flush()
    from qtool.data import as_valid_text

    for raw in lines:
        line, replaced = as_valid_text(raw.strip())
        if replaced:
            note.write("qtool: that line was not UTF-8 text; its invalid bytes were replaced by U+FFFD\n")
        if line.startswith("/"):
            message = chat.command(line)
            if message is None:
                break
            out.write(f"[{message}]\n")
        elif line:
            out.write(f"assistant[{chat.active or 'base'}]> ")
            out.flush()
            chat.answer(line, out)
        out.flush()
        if interactive:
            note.write("you> ")
            note.flush()
    return 0
