"""Fine-tuning data: read alpaca / ShareGPT / plain-text files into tokenised training examples.

- alpaca: rows with `instruction`, optional `input`, `output` (and optional `system`).
- sharegpt: rows with `conversations` ([{from: human|gpt|system, value}]) or `messages`
  ([{role: user|assistant|system, content}]).
- text: a .txt file (continued pre-training, cut into cutoff_len-token blocks) or rows with `text`.

With the chat template (default for alpaca and ShareGPT), every assistant turn is a target and
everything else is masked with -100, unless `train_on_prompt`. Files are .json (a list) or .jsonl.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtool.errors import DatasetError
from qtool.finetune.recipe import DatasetSection

IGNORE = -100
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Examples:
    train: list[dict[str, list[int]]]
    validation: list[dict[str, list[int]]]
    source: dict[str, Any]


def read_rows(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"dataset {path} is unreadable: {exc}") from None
    if path.suffix == ".txt":
        return [text]
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"dataset {path} is not valid JSON{'L' if path.suffix == '.jsonl' else ''}: {exc}") from None
    if not isinstance(rows, list):
        raise DatasetError(f"dataset {path} must hold a JSON list of rows")
    return rows


def to_messages(row: Any, fmt: str, number: int, path: Path) -> list[dict[str, str]]:
    """A row as chat messages (alpaca and ShareGPT formats)."""
    where = f"dataset {path.name}, row {number}"
    if not isinstance(row, dict):
        raise DatasetError(f"{where} is not a JSON object")
    if fmt == "alpaca":
        missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
        if missing:
            raise DatasetError(f"{where}: alpaca rows need 'instruction' and 'output' strings (missing {missing[0]!r}; "
                               f"found {', '.join(sorted(row)) or 'no fields'})")
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    turns = row.get("conversations", row.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise DatasetError(f"{where}: sharegpt rows need a 'conversations' or 'messages' list (found {', '.join(sorted(row))})")
    messages = []
    for turn in turns:
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))) if isinstance(turn, dict) else "")
        content = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if role is None or not isinstance(content, str):
            raise DatasetError(f"{where}: each turn needs from/value (human, gpt, system) or role/content, got {turn!r}")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{where}: the conversation has no assistant turn to learn from")
    return messages


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], cutoff: int, train_on_prompt: bool,
                system: str | None) -> dict[str, list[int]]:
    """Token ids and labels; labels are -100 except on assistant turns (and their end marker)."""
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]

    def ids(turns: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        return tokenizer.apply_chat_template(turns, add_generation_prompt=generation_prompt, tokenize=True,
                                             return_dict=True)["input_ids"]

    full = ids(messages, False)
    labels = list(full) if train_on_prompt else [IGNORE] * len(full)
    if not train_on_prompt:
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                start, end = len(ids(messages[:i], True)), len(ids(messages[: i + 1], False))
                labels[start:end] = full[start:end]
    return {"input_ids": full[:cutoff], "labels": labels[:cutoff]}


def encode_alpaca(tokenizer: Any, messages: list[dict[str, str]], cutoff: int, train_on_prompt: bool) -> dict[str, list[int]]:
    user = next(m["content"] for m in messages if m["role"] == "user")
    instruction, _, given = user.partition("\n\n")
    prompt = ALPACA_PROMPT.format(with_input=", paired with an input that provides further context" if given else "",
                                  instruction=instruction, input_block=f"### Input:\n{given}\n\n" if given else "")
    answer = messages[-1]["content"] + (tokenizer.eos_token or "")
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    labels = (p if train_on_prompt else [IGNORE] * len(p)) + a
    return {"input_ids": (p + a)[:cutoff], "labels": labels[:cutoff]}


def encode_text(tokenizer: Any, rows: list[Any], cutoff: int, path: Path) -> list[dict[str, list[int]]]:
    texts = []
    for number, row in enumerate(rows, 1):
        text = row if isinstance(row, str) else row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise DatasetError(f"dataset {path.name}, row {number}: text rows need a 'text' string")
        texts.append(text)
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    blocks = [ids[i : i + cutoff] for i in range(0, len(ids) - cutoff + 1, cutoff)] or ([ids] if len(ids) > 1 else [])
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def build_examples(section: DatasetSection, path: Path | str, tokenizer: Any, seed: int) -> Examples:
    """`path` is a file, or (format text) a source name such as builtin or wikitext2 read through qtool.data."""
    if isinstance(path, str):
        from qtool.data import load_text

        text = load_text(path, "calibration")
        rows, origin, digest = [text.content], text.origin, text.sha256
        path = Path(path)
    else:
        rows = read_rows(path)
        origin, digest = str(path), hashlib.sha256(path.read_bytes()).hexdigest()
    if not rows:
        raise DatasetError(f"dataset {path} has no rows")
    template = section.template or ("none" if section.format == "text" else "chat")
    if section.format == "text":
        examples = encode_text(tokenizer, rows, section.cutoff_len, path)
    else:
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise DatasetError("the model's tokenizer has no chat template: set dataset.template to 'alpaca'")
        examples = []
        for number, row in enumerate(rows, 1):
            messages = to_messages(row, section.format, number, path)
            if template == "chat":
                examples.append(encode_chat(tokenizer, messages, section.cutoff_len, section.train_on_prompt, section.system))
            else:
                examples.append(encode_alpaca(tokenizer, messages, section.cutoff_len, section.train_on_prompt))
    examples = [e for e in examples if any(label != IGNORE for label in e["labels"][1:])]
    if not examples:
        raise DatasetError(f"dataset {path}: no example keeps a target token within cutoff_len={section.cutoff_len}")
    if section.max_samples:
        examples = examples[: section.max_samples]
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = int(section.val_size * len(examples)) if section.val_size < 1 else int(section.val_size)
    if n_val >= len(examples):
        raise DatasetError(f"val_size {section.val_size} leaves no training examples out of {len(examples)}")
    validation = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    source = {"path": origin, "sha256": digest, "format": section.format,
              "template": template, "examples": len(examples), "train": len(train), "validation": len(validation)}
    return Examples(train, validation, source)
