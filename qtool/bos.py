"""Whether a window of tokens starts with the beginning-of-sequence (BOS) token: one rule for
token perplexity, KL, calibration and lm-eval's word perplexity.

Model families whose tokenizer adds BOS (Gemma, Llama 2/3, Mistral) were trained on sequences
that start with it; scoring or calibrating them on windows cut from the middle of a text, with no
BOS, feeds them inputs they never saw (measured on a 270M Gemma-family model: token PPL 74.8 vs
41.0 on the same 511 tokens). The rule follows the tokenizer's own convention, the way
lm-evaluation-harness (`add_bos_token`) and llama.cpp's perplexity tool (`add_bos` of the
vocabulary) decide it:

- `auto` (default): prepend BOS when the tokenizer adds it to an encoded text by itself
  (`tokenizer(text)` starts with `bos_token_id`; probed, because `add_bos_token` attributes are
  not reliable across tokenizer classes);
- `always`: prepend BOS when the tokenizer has one (an error when it has none);
- `never`: no BOS, qtool's protocol before this rule.

A window keeps `ctx` tokens in all, BOS included, so it holds ctx - 1 text tokens; BOS is context,
never a scored target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from qtool.errors import SpecError

BosMode = Literal["auto", "always", "never"]
BOS_MODES: tuple[str, ...] = get_args(BosMode)
_PROBE = "The quick brown fox"


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """True when `tokenizer(text)` (special tokens on, its default) starts with its BOS id while
    the same text without special tokens does not."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_specials = tokenizer(_PROBE)["input_ids"]
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    return with_specials[:1] == [bos] and plain[:1] != [bos]


@dataclass(frozen=True)
class BosRule:
    """The rule resolved for one tokenizer: `token_id` is prepended to every window, or None."""

    mode: str
    token_id: int | None

    @property
    def prefix(self) -> list[int]:
        """Token ids every window starts with: [] or [bos_token_id]."""
        return [] if self.token_id is None else [self.token_id]

    def record(self) -> dict[str, Any]:
        """What qtool.json and result files say about it."""
        return {"mode": self.mode, "prepended": self.token_id is not None, "bos_token_id": self.token_id}


def check_bos_mode(mode: str) -> None:
    """SpecError unless `mode` is one of auto, always, never."""
    if mode not in BOS_MODES:
        raise SpecError(f"--bos must be one of {', '.join(BOS_MODES)}, got {mode!r}")


def resolve_bos(tokenizer: Any, mode: str = "auto") -> BosRule:
    """The BOS rule for `tokenizer` under `mode` (see the module docstring).

    Raises SpecError for an unknown mode, or `always` with a tokenizer that has no BOS token.
    """
    check_bos_mode(mode)
    if mode == "never":
        return BosRule(mode, None)
    bos = getattr(tokenizer, "bos_token_id", None)
    if mode == "always":
        if bos is None:
            raise SpecError("--bos always: this tokenizer has no BOS token; use --bos auto or never")
        return BosRule(mode, int(bos))
    return BosRule(mode, int(bos) if tokenizer_adds_bos(tokenizer) else None)
