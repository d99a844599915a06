"""`qtool serve-check OUT --engine NAME`: does the checkpoint load in a serving engine and say the same?

The engine greedy-generates from fixed chat prompts; transformers (qtool's loader, fp32 on CPU)
generates from the same token ids; the tokens are compared position by position, up to the
reference's first EOS (both sides ignore EOS, so what follows is no reply), and the first
divergence is reported with the dtype and kernel of each side. A run passes when the engine loads
the checkpoint and, for every prompt, the first `require` tokens agree: a checkpoint the engine
misreads diverges at once (a re-quantized GGUF answered "What is the capital of France?" with
"212.25 meters"), while bf16 against fp32 rounding may flip a token later on, which is reported,
not failed. For llama.cpp a checkpoint folder is first exported to its lossless GGUF
(qtool.export.gguf); a .gguf file is compared with the checkpoint it was exported from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qtool.errors import CheckpointError, SpecError

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a hash table is.",
)


@dataclass
class PromptCheck:
    """One prompt: the tokens of each side and where they first differ (None: they never do)."""

    prompt: str
    reference: list[int]
    engine: list[int]
    first_divergence: int | None
    reference_text: str = ""
    engine_text: str = ""


@dataclass
class ServeCheck:
    """The outcome: the engine's run (identity, kernel, dtype), the reference's, and each prompt."""

    checkpoint: str
    loaded: str  # what the engine loaded (the GGUF for llama.cpp)
    engine: dict[str, Any]
    reference: dict[str, Any]
    prompts: list[PromptCheck]
    require: int
    passed: bool
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        e, r = self.engine, self.reference
        lines = [f"{self.checkpoint} in {e['engine']} {e['version']} ({e['device']}, {e['dtype']}, kernel "
                 f"{e['kernel']}, quantization {e['quantization']}) vs transformers {r['version']} ({r['device']}, "
                 f"{r['dtype']}, {r['kernel']})"]
        if self.loaded != self.checkpoint:
            lines.append(f"  loaded: {self.loaded}")
        for p in self.prompts:
            same = "all" if p.first_divergence is None else f"first {p.first_divergence}"
            lines.append(f"  {p.prompt!r}: {same} of {len(p.reference)} greedy tokens equal (to EOS); engine says "
                         f"{p.engine_text[:60]!r}")
        verdict = "PASS" if self.passed else f"FAIL: a prompt diverges within its first {self.require} tokens"
        lines.append(f"  {verdict}")
        return "\n".join(lines)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where the two token lists differ (None when equal)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def eos_ids(loaded: Any) -> set[int]:
    """The token ids that end a reply (tokenizer's EOS and the generation config's)."""
    ids = {loaded.tokenizer.eos_token_id}
    eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}


def until_eos(tokens: list[int], stops: set[int]) -> list[int]:
    """The tokens up to and including the first EOS: what follows it is no reply, so not compared."""
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[:i + 1]
    return tokens


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt as a chat turn when the tokenizer has a template (as `qtool generate` does)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    return list(ids)


def reference_of(path: Path) -> Path:
    """What transformers loads as the reference: the folder itself, or the checkpoint a qtool GGUF
    export was made from (its qtool.source key), else the GGUF itself."""
    if path.is_dir():
        return path
    import gguf

    field_ = gguf.GGUFReader(path).fields.get("qtool.source")
    source = Path(str(field_.contents())) if field_ is not None else None
    return source if source is not None and source.is_dir() else path


def serve_check(checkpoint: str | Path, engine_name: str, new_tokens: int = 32, require: int = 4,
                compile: bool = False) -> ServeCheck:
    """Load `checkpoint` in the engine and compare its greedy tokens with transformers'.

    Raises EngineError when the engine is missing or cannot load it, CheckpointError /
    SpecError for a path that is no checkpoint or an engine that cannot take it.
    """
    from qtool import api, engines
    from qtool.engines import EngineJob

    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise CheckpointError(f"{checkpoint} does not exist")
    if require < 0 or new_tokens < 1 or require > new_tokens:
        raise SpecError(f"--require {require} must be between 0 and --new-tokens {new_tokens}")
    engine = engines.get(engine_name)
    if engine.name == "hf":
        raise SpecError("serve-check compares an engine with transformers (hf): choose --engine vllm or llamacpp")
    reason = engine.unavailable()
    if reason:
        from qtool.errors import EngineError

        raise EngineError(reason)
    if path.is_file() and engine.inputs != "gguf":
        raise SpecError(f"{engine.name} loads checkpoint folders; {checkpoint} is a file")
    loaded_path = engine.checkpoint_for(path)
    reference = api.load(reference_of(loaded_path), "cpu")
    ids = [prompt_ids(reference.tokenizer, p) for p in PROMPTS]
    context = min(2048, max(len(i) for i in ids) + new_tokens + 16)
    job = EngineJob(model=str(loaded_path), prompts=ids, new_tokens=new_tokens, max_model_len=context, compile=compile)
    ref_run = engines.get("hf").run(job, loaded=reference)  # type: ignore[call-arg]
    run = engine.run(job)
    checks = []
    stops = eos_ids(reference)
    for prompt, ref, got in zip(PROMPTS, ref_run.tokens, run.tokens, strict=True):
        ref, got = until_eos(ref, stops), got[:len(until_eos(ref, stops))]
        checks.append(PromptCheck(prompt, ref, got, first_divergence(ref, got),
                                  reference.tokenizer.decode(ref, skip_special_tokens=True),
                                  reference.tokenizer.decode(got, skip_special_tokens=True)))
    passed = all(c.first_divergence is None or c.first_divergence >= require for c in checks)
    return ServeCheck(str(checkpoint), str(loaded_path), run.as_dict(), ref_run.as_dict(), checks, require, passed)
