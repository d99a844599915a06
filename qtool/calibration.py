"""Calibration samples for the methods that quantize from data (GPTQ, AWQ).

Protocol of the GPTQ paper: the text is tokenised once and `nsamples` windows of `seqlen`
tokens are drawn at random positions, with a seed. qtool draws non-overlapping windows (a
shuffled choice among the text's whole windows), so that a sample is never counted twice and
"the text is too small" has one meaning: fewer than nsamples × seqlen tokens.

With BOS (qtool.bos; by default when the tokenizer adds one itself) every sample is BOS followed
by seqlen - 1 text tokens, so the model is calibrated on inputs shaped like those it was trained on.

Defaults are the papers' 128 × 2048 (seqlen capped to the model's context). When the user did
not ask for a sample count and the text holds fewer windows, qtool uses all it has and says so;
an explicit --nsamples the text cannot fill is an error.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

from pydantic import model_validator

from qtool.bos import BosMode, check_bos_mode, resolve_bos
from qtool.data import load_text
from qtool.errors import DatasetError, SpecError
from qtool.models import model_context
from qtool.schema import Section

log = logging.getLogger(__name__)

DEFAULT_NSAMPLES = 128  # GPTQ and AWQ papers
DEFAULT_SEQLEN = 2048


class CalibrationFields(Section):
    """The calibration keys every quantize request carries (quantize recipes, compare recipes,
    qlora's `quantization:` section); `calibration_arguments()` gives them to qtool.quantize."""

    calib: str | None = None  # calibration text for gptq/awq/aqlm/autoround (default: qtool's built-in text)
    nsamples: int | None = None  # ranges: CalibrationSpec.check, one message for flags and recipes
    seqlen: int | None = None
    bos: BosMode | None = None  # qtool.bos mode (default auto)

    @model_validator(mode="after")
    def _ranges(self) -> CalibrationFields:
        try:
            CalibrationSpec(nsamples=self.nsamples, seqlen=self.seqlen, bos=self.bos or "auto").check()
        except SpecError as exc:  # as a validation error, so that the message names the recipe or flags
            raise ValueError(str(exc)) from None
        return self

    def calibration_arguments(self) -> dict[str, Any]:
        return {"calib": self.calib, "nsamples": self.nsamples, "seqlen": self.seqlen, "bos": self.bos}


@dataclass(frozen=True)
class CalibrationSpec:
    source: str = "builtin"
    nsamples: int | None = None  # None: 128, or as many as the text holds if fewer
    seqlen: int | None = None  # None: 2048, capped to the model's context; BOS included
    bos: str = "auto"  # qtool.bos mode

    @classmethod
    def from_arguments(cls, calib: str | None, nsamples: int | None, seqlen: int | None,
                       bos: str | None = None) -> CalibrationSpec | None:
        """The spec the --calib/--nsamples/--seqlen/--bos flags ask for; None when none was given."""
        if calib is None and nsamples is None and seqlen is None and bos is None:
            return None
        return cls(source=cls.source if calib is None else calib, nsamples=nsamples, seqlen=seqlen,
                   bos=cls.bos if bos is None else bos)

    def check(self) -> None:
        check_bos_mode(self.bos)
        if self.nsamples is not None and self.nsamples < 1:
            raise SpecError(f"--nsamples must be at least 1, got {self.nsamples}")
        if self.seqlen is not None and self.seqlen < 2:
            raise SpecError(f"--seqlen must be at least 2 tokens, got {self.seqlen}")

    def resolved_seqlen(self, context: int | None) -> int:
        """The window length for a model with `context` positions; too long is an error."""
        if self.seqlen is None:
            return min(DEFAULT_SEQLEN, context) if context else DEFAULT_SEQLEN
        if context and self.seqlen > context:
            raise SpecError(f"--seqlen {self.seqlen} is longer than the model's context of {context} tokens")
        return self.seqlen


@dataclass(frozen=True)
class CalibrationSet:
    samples: list[list[int]]  # token ids, nsamples rows of seqlen
    record: dict[str, Any]  # what qtool.json says about them

    def as_gptqmodel_rows(self) -> list[dict[str, list[int]]]:
        return [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in self.samples]


def build_calibration(spec: CalibrationSpec, tokenizer: Any, config: Any, seed: int) -> CalibrationSet:
    """Tokenise the source and draw the samples; every failure is one clear line."""
    spec.check()
    seqlen = spec.resolved_seqlen(model_context(config))
    text = load_text(spec.source, purpose="calibration")
    rule = resolve_bos(tokenizer, spec.bos)
    span = seqlen - len(rule.prefix)  # text tokens per sample; seqlen >= 2 (check)
    ids = tokenizer(text.content, add_special_tokens=False).input_ids
    windows = len(ids) // span
    nsamples = spec.nsamples
    if nsamples is None:
        nsamples = min(DEFAULT_NSAMPLES, windows)
        if 0 < nsamples < DEFAULT_NSAMPLES:
            log.warning("calibrating on %d × %d tokens, all that %s holds; pass --calib with more text for the "
                        "papers' %d samples", nsamples, seqlen, spec.source, DEFAULT_NSAMPLES)
    if windows < max(nsamples, 1):
        fit = f"at most --nsamples {windows} at this length" if windows else "a shorter --seqlen"
        raise DatasetError(
            f"calibration source {spec.source} has {len(ids):,} tokens, fewer than the {max(nsamples, 1)} × {seqlen}"
            f" requested; use {fit}, or a larger --calib"
        )
    starts = random.Random(seed).sample(range(windows), nsamples)
    samples = [rule.prefix + ids[s * span : (s + 1) * span] for s in starts]
    record = {
        **text.describe(),
        "nsamples": nsamples,
        "seqlen": seqlen,
        "tokens": nsamples * seqlen,
        "text_tokens": len(ids),
        "seed": seed,
        "sampling": "non-overlapping windows at random positions",
        "bos": rule.record(),
    }
    return CalibrationSet(samples, record)
