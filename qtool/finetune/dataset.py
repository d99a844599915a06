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
import logging
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
log = logging.getLogger(__name__)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Examples:
    train: list[dict[str, list[int]]]
    validation: list[dict[str, list[int]]]
    source: dict[str, Any]


def read_rows(path: Path) -> list[tuple[int, Any]]:
    """The file's rows, each with its number: the 1-based line of a .jsonl file (blank lines skipped),
    the 1-based example index of a .json list, 1 for the whole of a .txt file. Messages about a row
    quote that number, so that the user can open the file at the right place."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"dataset {path} is unreadable: {exc}") from None
    if path.suffix == ".txt":
        return [(1, text)]
    if path.suffix == ".jsonl":
        return [(number, _json_line(line, number, path)) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"dataset {path} is not valid JSON: {exc}") from None
    if not isinstance(rows, list):
        raise DatasetError(f"dataset {path} must hold a JSON list of rows")
    return list(enumerate(rows, 1))


def _json_line(line: str, number: int, path: Path) -> Any:
    """One JSONL line parsed; an error names the file's line (json's own message counts lines of the
    one-line document it was given, so it would always say 'line 1')."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"dataset {path}, line {number} is not valid JSON: {exc.msg} (column {exc.colno})") from None


def row_place(path: Path, number: int) -> str:
    """How messages name a row: its line in a .jsonl file, its example index in a .json list."""
    return f"dataset {path.name}, {'line' if path.suffix == '.jsonl' else 'example'} {number}"


def to_messages(row: Any, fmt: str, number: int, path: Path) -> list[dict[str, str]]:
    """A row as chat messages (alpaca and ShareGPT formats); `number` is the row's line or index."""
    where = row_place(path, number)
    if not isinstance(row, dict):
        raise DatasetError(f"{where} is not a JSON object")
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if key not in row:
                raise DatasetError(f"{where}: alpaca rows need 'instruction' and 'output' strings (missing {key!r}; "
                                   f"found {', '.join(sorted(map(str, row))) or 'no fields'})")
            if not isinstance(row[key], str):
                raise DatasetError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__} {row[key]!r}")
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    turns = row.get("conversations", row.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise DatasetError(f"{where}: sharegpt rows need a 'conversations' or 'messages' list (found {', '.join(sorted(row))})")
    messages = [_turn_message(turn, index, where) for index, turn in enumerate(turns, 1)]
    check_turn_order(messages, turns, where)
    return messages


def _turn_message(turn: Any, index: int, where: str) -> dict[str, str]:
    """One ShareGPT turn ({from, value} or {role, content}) as a chat message."""
    if not isinstance(turn, dict):
        raise DatasetError(f"{where}, turn {index}: each turn needs from/value (human, gpt, system) or role/content, "
                           f"got {turn!r}")
    speaker = turn.get("from", turn.get("role"))
    content = turn.get("value", turn.get("content"))
    if speaker is None or not isinstance(content, str):
        raise DatasetError(f"{where}, turn {index}: each turn needs from/value (human, gpt, system) or role/content, "
                           f"got {turn!r}")
    role = ROLES.get(str(speaker))
    if role is None:
        raise DatasetError(f"{where}, turn {index}: unknown role {speaker!r} (known: {', '.join(ROLES)})")
    return {"role": role, "content": content}


def check_turn_order(messages: list[dict[str, str]], turns: list[Any], where: str) -> None:
    """A conversation is an optional system turn, then user and assistant turns taking turns, user first.

    Anything else (opening with the assistant, two user or two assistant turns in a row, a system turn
    later on) is refused: chat templates would render it silently as a different conversation, or fail
    with a template error that names no row."""
    def said(index: int) -> str:
        turn = turns[index]
        return repr(turn.get("from", turn.get("role")))

    start = 1 if messages[0]["role"] == "system" else 0
    for index in range(start, len(messages)):
        role, expected = messages[index]["role"], "user" if (index - start) % 2 == 0 else "assistant"
        if role == expected:
            continue
        if role == "system":
            problem = "a system turn may only open the conversation"
        elif index == start:
            problem = f"the conversation opens with the assistant ({said(index)}); its first turn must be the user's"
        else:
            problem = f"two {role} turns in a row ({said(index - 1)} then {said(index)}); user and assistant must alternate"
        raise DatasetError(f"{where}, turn {index + 1}: {problem}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{where}: the conversation has no assistant turn to learn from")


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], train_on_prompt: bool,
                system: str | None) -> dict[str, list[int]]:
    """Token ids and labels, uncut; labels are -100 except on assistant turns (and their end marker)."""
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
    return {"input_ids": full, "labels": labels}


def encode_alpaca(tokenizer: Any, messages: list[dict[str, str]], train_on_prompt: bool) -> dict[str, list[int]]:
    """The alpaca prompt and the answer (with EOS), uncut; labels are -100 on the prompt."""
    user = next(m["content"] for m in messages if m["role"] == "user")
    instruction, _, given = user.partition("\n\n")
    prompt = ALPACA_PROMPT.format(with_input=", paired with an input that provides further context" if given else "",
                                  instruction=instruction, input_block=f"### Input:\n{given}\n\n" if given else "")
    answer = messages[-1]["content"] + (tokenizer.eos_token or "")
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    labels = (p if train_on_prompt else [IGNORE] * len(p)) + a
    return {"input_ids": p + a, "labels": labels}


def encode_text(tokenizer: Any, rows: list[tuple[int, Any]], cutoff: int, path: Path) -> list[dict[str, list[int]]]:
    texts = []
    for number, row in rows:
        text = row if isinstance(row, str) else row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise DatasetError(f"{row_place(path, number)}: text rows need a 'text' string")
        texts.append(text)
    if not any(text.strip() for text in texts):
        raise DatasetError(f"dataset {path} has no examples (its text is empty)")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    blocks = [ids[i : i + cutoff] for i in range(0, len(ids) - cutoff + 1, cutoff)] or ([ids] if len(ids) > 1 else [])
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def build_examples(section: DatasetSection, path: Path | str, tokenizer: Any, seed: int) -> Examples:
    """`path` is a file, or (format text) a source name such as builtin or wikitext2 read through qtool.data."""
    if isinstance(path, str):
        from qtool.data import load_text

        text = load_text(path, "calibration")
        rows, origin, digest = [(1, text.content)], text.origin, text.sha256
        path = Path(path)
    else:
        if section.format != "text" and path.suffix not in (".json", ".jsonl"):
            raise DatasetError(f"dataset {path}: format {section.format} reads .json or .jsonl rows, not a "
                               f"{path.suffix or 'suffix-less'} file (format text reads plain text)")
        rows = read_rows(path)
        origin, digest = str(path), hashlib.sha256(path.read_bytes()).hexdigest()
    if not rows:
        raise DatasetError(f"dataset {path} has no examples")
    template = section.template or ("none" if section.format == "text" else "chat")
    if section.format == "text":
        encoded = encode_text(tokenizer, rows, section.cutoff_len, path)
    else:
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise DatasetError("the model's tokenizer has no chat template: set dataset.template to 'alpaca'")
        encoded = []
        for number, row in rows:
            messages = to_messages(row, section.format, number, path)
            if template == "chat":
                encoded.append(encode_chat(tokenizer, messages, section.train_on_prompt, section.system))
            else:
                encoded.append(encode_alpaca(tokenizer, messages, section.train_on_prompt))
    examples = keep_targets(encoded, section.cutoff_len, path)
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


def has_target(example: dict[str, list[int]]) -> bool:
    """Whether the loss sees a token of it: the first label is never predicted (nothing comes before it)."""
    return any(label != IGNORE for label in example["labels"][1:])


def keep_targets(encoded: list[dict[str, list[int]]], cutoff: int, path: Path) -> list[dict[str, list[int]]]:
    """The examples cut to `cutoff` tokens, less those left without a target token (nothing to learn).

    When none is left, the message says why: the cut removed every answer (a prompt longer than the
    cutoff), or the answers were empty to begin with; a partial loss is logged once."""
    if not encoded:
        raise DatasetError(f"dataset {path} has no examples (its text is shorter than two tokens)")
    cut = [{key: ids[:cutoff] for key, ids in example.items()} for example in encoded]
    kept = [example for example in cut if has_target(example)]
    if not kept and any(has_target(example) for example in encoded):
        raise DatasetError(f"dataset {path}: no example keeps a target token after cutoff_len {cutoff}: raise "
                           "cutoff_len or shorten prompts")
    if not kept:
        raise DatasetError(f"dataset {path}: no example has a target token (every answer is empty)")
    if len(kept) < len(cut):
        log.warning("dataset %s: %d of %d examples dropped: no target token left after cutoff_len %d",
                    path.name, len(cut) - len(kept), len(cut), cutoff)
    return kept
