"""One evaluation plan: what `qtool eval` and every `qtool compare` cell measure, and how.

The plan is a typed schema (qtool.schema) with its defaults in this one place. It is checked
when it is built (ranges, stride <= ctx) and against the model's config before any weight is
loaded (`check_model`: ctx within the model's context), so a bad setting fails in one line
before minutes of loading or quantizing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator

from qtool.bos import BosMode
from qtool.errors import SpecError
from qtool.models import model_context
from qtool.schema import Section, parse_section

DEFAULT_CTX = 2048


class SpeedPlan(Section):
    """Generation speed: batch sizes, prompt and generated tokens, timed repeats after a warm-up."""

    batch: list[PositiveInt] = Field(default_factory=lambda: [1, 8], min_length=1)
    prompt_len: PositiveInt = 128
    new_tokens: int = Field(32, ge=2)  # the first token comes from prefill
    repeats: PositiveInt = 3
    # vLLM's torch.compile warm-up, as deployed (minutes per checkpoint on CPU); off: eager PyTorch
    compile: bool = True


EngineName = Literal["hf", "vllm", "llamacpp"]  # qtool.engines.ENGINES


class LmEvalPlan(Section):
    """lm-evaluation-harness word perplexity on the plan's text."""

    limit: PositiveInt | None = None  # documents


class EvalPlan(Section):
    """Token-perplexity windows (ctx, stride, max_tokens, bos) on `text`, KL from the base, lm-eval, speed."""

    text: str = "builtin"
    ctx: int | None = Field(None, ge=2)  # None: DEFAULT_CTX, capped to the model's context (for_model)
    stride: PositiveInt | None = None  # default: ctx (non-overlapping windows)
    max_tokens: PositiveInt | None = None
    bos: BosMode = "auto"  # windows start with BOS: qtool.bos
    perplexity: bool = True  # token perplexity on `text`
    kl: bool = True  # and, with a base model, KL and top-1 agreement on the same windows
    speed: SpeedPlan | None = None
    # engines that measure speed and memory: hf (transformers in qtool's process), vllm, llamacpp
    engines: list[EngineName] = Field(default_factory=lambda: ["hf"], min_length=1)
    lm_eval: LmEvalPlan | None = None

    @model_validator(mode="after")
    def _stride_within_ctx(self) -> EvalPlan:
        ctx = self.ctx or DEFAULT_CTX
        if self.stride is not None and self.stride > ctx:
            raise ValueError(f"stride {self.stride} is longer than ctx {ctx}: windows would skip tokens")
        if self.max_tokens is not None and self.ctx is not None and self.max_tokens < self.ctx:
            raise ValueError(f"max_tokens {self.max_tokens} is fewer than one window of ctx {self.ctx} tokens")
        if len(set(self.engines)) != len(self.engines):
            raise ValueError(f"engines {self.engines} names an engine twice")
        if self.engines != ["hf"] and self.speed is None and not self.perplexity:
            raise ValueError(f"engines {self.engines} measure speed or perplexity: add --speed or --ppl")
        return self

    def check_engines(self, checkpoint: Path | None = None) -> None:
        """EngineError (one line with the set-up command) for an engine of the plan that cannot run
        here; SpecError for one that cannot take `checkpoint` (a folder or .gguf that exists),
        before any weight loads."""
        from qtool import engines
        from qtool.errors import EngineError

        for name in self.engines:
            engine = engines.get(name)
            reason = engine.unavailable()
            if reason:
                raise EngineError(reason)
            if checkpoint is not None and checkpoint.exists():
                engine.check_checkpoint(checkpoint)

    def windows(self, progress: bool = True) -> dict[str, Any]:
        """Keyword arguments of qtool.evaluate_perplexity / evaluate_divergence."""
        return {"ctx": self.ctx or DEFAULT_CTX, "stride": self.stride, "max_tokens": self.max_tokens, "progress": progress,
                "bos": self.bos}

    def for_model(self, config: Any, model: str) -> EvalPlan:
        """This plan for one model (its config, before weights load): ctx defaults to DEFAULT_CTX
        capped to the model's context; an explicit ctx or speed run longer than the context is a
        SpecError."""
        context = model_context(config)
        ctx = self.ctx if self.ctx is not None else min(DEFAULT_CTX, context or DEFAULT_CTX)
        if context is not None and ctx > context:
            raise SpecError(f"ctx {ctx} is longer than {model}'s context of {context} tokens; "
                            f"use a ctx of at most {context}")
        if self.speed and context is not None and self.speed.prompt_len + self.speed.new_tokens > context:
            raise SpecError(f"speed: prompt_len {self.speed.prompt_len} + new_tokens {self.speed.new_tokens} exceed "
                            f"{model}'s context of {context} tokens")
        return parse_section(EvalPlan, {**self.model_dump(), "ctx": ctx}, f"evaluation of {model}", error=SpecError)
