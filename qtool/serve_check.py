"""`qtool serve-check OUT --engine NAME`: does the checkpoint load in a serving engine and say the same?

The engine greedy-generates from fixed chat prompts; transformers (qtool's loader, fp32 on CPU)
generates from the same token ids; each reply is compared up to its first EOS (both sides ignore
EOS, so what follows is no reply), and the first divergence is reported with the dtype and kernel
of each side. Equal tokens are too strict a verdict across dtypes (bf16 against fp32 flips
near-ties: a haiku's second token), so the verdict is the regret: transformers is fed the
engine's reply and, at each position, the gap in nats between its own best token and the
engine's is taken. Where the tokens differ, transformers' own greedy reply is also generated with
its input embeddings perturbed by 1e-6 (relative; the size of fp32 rounding differences between
two implementations): the first token where that changes its reply says how far any engine could
agree. An unquantized model does not move; SmolLM2's INT8 W8A8 (per-token activations, where one
rounding flip moves an input by a whole step) changed its reply to the haiku prompt at token 1 for
each of 4 seeds. A run passes when the engine loads the checkpoint and no regret exceeds
`max_regret`: a checkpoint the engine misreads picks tokens transformers ranks far below (a
re-quantized GGUF answered "What is the capital of France?" with "212.25 meters"). For llama.cpp a checkpoint folder is first exported to its lossless GGUF
(qtool.export.gguf); a .gguf file is compared with the checkpoint it was exported from. The
prompts are three fixed ones unless a text file gives one per line (read_prompts).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from qtool.errors import CheckpointError, SpecError

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a hash table is.",
)


MAX_CONTEXT = 2048  # tokens per sequence given to the engine: prompt + reply; bounds its KV cache
log = logging.getLogger("qtool")
ENGINE_DTYPES = ("auto", "float32", "bfloat16", "float16")
NOISE_RELATIVE = 1e-6  # the size of fp32 rounding differences between two implementations (2^-23 ≈ 1.2e-7 per op)
NOISE_SEEDS = 16  # default draws of that noise; more find more of the reference's own flips (3 missed 2 of 24)
NOISE_BATCH = 16  # draws generated together (unstable_at)


@dataclass
class PromptCheck:
    """One prompt: the tokens of each side and where they first differ (None: they never do)."""

    prompt: str
    reference: list[int]
    engine: list[int]
    first_divergence: int | None
    reference_text: str = ""
    engine_text: str = ""
    # transformers' log-prob of its own top token minus that of the engine's token, at each position
    # of the engine's reply (teacher-forced on the engine's tokens), nats: 0 where they agree
    regret: list[float] = field(default_factory=list)
    # where transformers' own reply first changes when its input embeddings are perturbed by
    # NOISE_RELATIVE (earliest over the check's noise seeds); None: it never does within the reply
    reference_unstable_at: int | None = None

    @property
    def within_reference_noise(self) -> bool:
        """Equal tokens up to where transformers' own reply is unstable to fp32-sized noise."""
        if self.first_divergence is None:
            return True
        return self.reference_unstable_at is not None and self.first_divergence >= self.reference_unstable_at

    @property
    def max_regret(self) -> float:
        return max(self.regret, default=0.0)


@dataclass
class ServeCheck:
    """The outcome: the engine's run (identity, kernel, dtype), the reference's, and each prompt."""

    checkpoint: str
    loaded: str  # what the engine loaded (the GGUF for llama.cpp)
    engine: dict[str, Any]
    reference: dict[str, Any]
    prompts: list[PromptCheck]
    max_regret: float  # nats: the pass threshold
    passed: bool
    notes: list[str] = field(default_factory=list)
    noise_seeds: int = NOISE_SEEDS  # draws of the reference's noise (unstable_at)
    new_tokens: int = 32  # greedy tokens asked of each side per prompt

    def as_dict(self) -> dict[str, Any]:
        result = asdict(self)
        for entry, check in zip(result["prompts"], self.prompts, strict=True):
            entry["within_reference_noise"] = check.within_reference_noise
        return result

    def summary(self) -> str:
        e, r = self.engine, self.reference
        lines = [f"{self.checkpoint} in {e['engine']} {e['version']} ({e['device']}, {e['dtype']}, kernel "
                 f"{e['kernel']}, quantization {e['quantization']}) vs transformers {r['version']} ({r['device']}, "
                 f"{r['dtype']}, {r['kernel']})"]
        if self.loaded != self.checkpoint:
            lines.append(f"  loaded: {self.loaded}")
        for p in self.prompts:
            same = ("all" if p.first_divergence is None else "none" if p.first_divergence == 0
                    else f"the first {p.first_divergence}")
            noise = ("" if p.first_divergence is None else
                     f" (transformers' own reply, its embeddings perturbed by {NOISE_RELATIVE:g}, changes "
                     + ("nowhere)" if p.reference_unstable_at is None else f"at token {p.reference_unstable_at})"))
            lines.append(f"  {p.prompt!r}: {same} of {len(p.reference)} greedy tokens equal (up to the first EOS){noise}, "
                         f"largest regret {p.max_regret:.2f} nats; engine says {p.engine_text[:60]!r}")
        within = sum(p.within_reference_noise for p in self.prompts)
        lines.append(f"  tokens equal up to where transformers' own reply changes under {NOISE_RELATIVE:g} noise "
                     f"({self.noise_seeds} seed{'s' * (self.noise_seeds != 1)}): {within} of {len(self.prompts)} prompts")
        verdict = (f"PASS: no engine token is more than {self.max_regret:g} nat(s) below transformers' own choice "
                   "(the verdict is this regret: equal tokens are too strict, near-ties flip)"
                   if self.passed else
                   f"FAIL: the engine picked a token transformers ranks more than {self.max_regret:g} nat(s) below its own")
        lines.append(f"  {verdict}")
        if not self.passed and e["dtype"] != r["dtype"] and e["engine"] == "vllm":
            lines.append(f"  the engine ran in {e['dtype']} against the {r['dtype']} reference: --dtype {r['dtype']} "
                         "compares like with like where vLLM runs the format in it")
        return "\n".join(lines)


def unstable_at(reference: Any, job: Any, replies: list[list[int]], stops: set[int],
                relative: float = NOISE_RELATIVE, seeds: int = NOISE_SEEDS) -> list[int | None]:
    """Per prompt of `job`, the first token where transformers' own greedy reply (`replies`) changes
    when the output of its input embedding is multiplied by 1 + relative·N(0, 1), the earliest over
    `seeds` draws; None where it never changes. A model that is this sensitive (dynamic per-token
    INT8 activations: one rounding flip moves an input by a whole step) cannot be expected to give an
    engine's exact tokens past that point, whatever the engine computes.

    Draw k takes its noise from a generator seeded k, and the draws of a prompt are generated
    together, NOISE_BATCH at a time (16 draws cost about twice one on CPU: the weights are read once
    per step for the whole batch). A batch is always NOISE_BATCH rows, the unused ones dropped, so
    draw k computes the same whatever `seeds` is: more draws can only find an earlier change."""
    import torch
    from tqdm.auto import tqdm

    from qtool.evaluate.speed import greedy_run

    model = reference.model
    device = next(model.parameters()).device
    earliest: list[int | None] = [None] * len(replies)
    batches = [(i, first) for i in range(len(replies)) for first in range(0, seeds, NOISE_BATCH)]
    for i, first in tqdm(batches, desc="transformers: noise draws", unit="batch", leave=False):
        generators = [torch.Generator(device="cpu").manual_seed(k) for k in range(first, first + NOISE_BATCH)]

        def perturb(module: Any, args: Any, output: Any, generators: list[Any] = generators) -> Any:
            noise = torch.stack([torch.randn(output.shape[1:], generator=g, dtype=torch.float32) for g in generators])
            return output * (1 + relative * noise).to(output.device, output.dtype)

        handle = model.get_input_embeddings().register_forward_hook(perturb)
        try:
            with torch.inference_mode():
                prompt = torch.tensor([job.prompts[i]] * NOISE_BATCH, device=device)
                noisy = greedy_run(model, prompt, job.new_tokens, device.type)[2].tolist()
        finally:
            handle.remove()
        for other in noisy[:seeds - first]:
            at = first_divergence(replies[i], until_eos(other, stops))
            if at is not None and (earliest[i] is None or at < earliest[i]):
                earliest[i] = at
    return earliest


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

    try:
        field_ = gguf.GGUFReader(path).fields.get("qtool.source")
    except (OSError, ValueError, KeyError, IndexError) as exc:  # not a GGUF, or a damaged one
        raise CheckpointError(f"{path} is not a readable GGUF file ({exc}); llama.cpp takes a .gguf or a "
                              "qtool output folder") from None
    source = Path(str(field_.contents())) if field_ is not None else None
    return source if source is not None and source.is_dir() else path


def read_prompts(path: str | Path) -> list[str]:
    """The chat prompts in a UTF-8 text file, one per line; blank lines and lines starting with '#'
    are skipped. Raises SpecError (one line, naming the file) when it cannot be read, is not UTF-8
    text or holds no prompt."""
    from qtool.data import read_utf8

    text = read_utf8(Path(path).expanduser(), "--prompts", "give a text file with one prompt per line", SpecError)
    lines = text.removeprefix("\ufeff").split("\n")  # a BOM (Notepad) is no text; only newlines end a prompt
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise SpecError(f"--prompts {path} holds no prompt: give one per line ('#' starts a comment)")
    return prompts


def serve_check(checkpoint: str | Path, engine_name: str, new_tokens: int = 32, max_regret: float = 1.0,
                compile: bool = False, dtype: str = "auto", prompts: list[str] | None = None,
                noise_seeds: int = NOISE_SEEDS) -> ServeCheck:
    """Load `checkpoint` in the engine and compare its greedy tokens with transformers'.

    `dtype`: the engine's (ENGINE_DTYPES; vLLM only, "auto" lets it choose). `prompts`: the chat
    prompts (default PROMPTS); each, as a chat turn, plus `new_tokens` must fit in MAX_CONTEXT.
    `noise_seeds`: draws of the reference's noise for the prompts whose tokens differ (unstable_at).

    Raises EngineError when the engine is missing or cannot load it, CheckpointError /
    SpecError for a path that is no checkpoint or an engine that cannot take it.
    """
    from qtool import api, engines
    from qtool.engines import EngineJob

    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise CheckpointError(f"{checkpoint} does not exist")
    prompts = list(PROMPTS if prompts is None else prompts)
    if not prompts or not all(p.strip() for p in prompts):
        raise SpecError("serve-check needs at least one prompt, and no empty one")
    if not 1 <= new_tokens < MAX_CONTEXT:
        raise SpecError(f"--new-tokens must be from 1 to {MAX_CONTEXT - 1} (serve-check's context is {MAX_CONTEXT} "
                        f"tokens, prompt included), got {new_tokens}")
    if noise_seeds < 1:
        raise SpecError(f"--noise-seeds must be at least 1, got {noise_seeds}")
    if not max_regret >= 0:
        raise SpecError(f"--max-regret must be at least 0 nats, got {max_regret}")
    engine = engines.get(engine_name)
    if dtype not in ENGINE_DTYPES:
        raise SpecError(f"--dtype takes one of {', '.join(ENGINE_DTYPES)}, got {dtype!r}")
    if dtype != "auto" and engine.name != "vllm":
        raise SpecError(f"--dtype chooses vLLM's dtype; {engine.name} computes in the GGUF's own types")
    if engine.name == "hf":
        raise SpecError("serve-check compares an engine with transformers (hf): choose --engine vllm or llamacpp")
    reason = engine.unavailable()
    if reason:
        from qtool.errors import EngineError

        raise EngineError(reason)
    if path.is_file() and engine.inputs != "gguf":
        raise SpecError(f"{engine.name} loads checkpoint folders; {checkpoint} is a file")
    reference_path = reference_of(path)  # what the engine's input (or the GGUF exported from it) came from
    # the tokenizer alone judges the prompts' length: before the GGUF export and the weights load
    tokenizer = api.load_tokenizer(reference_path)
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    context = context_for(ids, new_tokens)
    loaded_path = engine.checkpoint_for(path)
    reference = api.load(reference_path, "cpu")
    job = EngineJob(model=str(loaded_path), prompts=ids, new_tokens=new_tokens, max_model_len=context, compile=compile,
                    dtype=dtype)
    # the engine first: one that cannot load the checkpoint fails before the reference's minutes
    log.info("%s: loading %s, then %d greedy tokens for each of %d prompt(s) (start-up takes a minute or more "
             "on CPU)", engine.name, loaded_path, new_tokens, len(ids))
    run = engine.run(job)
    log.info("transformers (the reference): the same prompts")
    ref_run = engines.get("hf").run(job, loaded=reference)  # type: ignore[call-arg]
    ref_run.model = str(reference_path)
    checks = []
    stops = eos_ids(reference)
    for prompt, ids_, ref, got in zip(prompts, ids, ref_run.tokens, run.tokens, strict=True):
        ref, got = until_eos(ref, stops), until_eos(got, stops)
        checks.append(PromptCheck(prompt, ref, got, first_divergence(ref, got),
                                  reference.tokenizer.decode(ref, skip_special_tokens=True),
                                  reference.tokenizer.decode(got, skip_special_tokens=True),
                                  regret=regrets(reference.model, ids_, got)))
    differing = [(c, i) for c, i in zip(checks, ids, strict=True) if c.first_divergence is not None]
    if differing:  # only the prompts whose tokens differ are regenerated under noise
        log.info("transformers: %d prompt(s) differ; their replies regenerated under %g noise, %d seeds",
                 len(differing), NOISE_RELATIVE, noise_seeds)
        noisy_job = replace(job, prompts=[i for _, i in differing])
        for (check, _), at in zip(differing, unstable_at(reference, noisy_job, [c.reference for c, _ in differing],
                                                         stops, seeds=noise_seeds), strict=True):
            check.reference_unstable_at = at
    passed = all(c.max_regret <= max_regret for c in checks)
    return ServeCheck(str(checkpoint), str(loaded_path), run.as_dict(), ref_run.as_dict(), checks, max_regret,
                      passed, noise_seeds=noise_seeds, new_tokens=new_tokens)


def context_for(ids: list[list[int]], new_tokens: int) -> int:
    """The engine's max_model_len for these prompt token ids and `new_tokens` replies: the longest
    prompt, the reply and 16 spare, at most MAX_CONTEXT. Raises SpecError naming the prompt (1-based)
    that leaves no room for the reply."""
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    if len(ids[longest]) + new_tokens > MAX_CONTEXT:
        raise SpecError(f"prompt {longest + 1} is {len(ids[longest])} tokens as a chat turn; with --new-tokens "
                        f"{new_tokens}, prompts of at most {MAX_CONTEXT - new_tokens} tokens fit in serve-check's "
                        f"{MAX_CONTEXT}-token context")
    return min(MAX_CONTEXT, len(ids[longest]) + new_tokens + 16)


def regrets(model: Any, prompt: list[int], tokens: list[int]) -> list[float]:
    """Per engine token: transformers' best log-prob minus its log-prob of the engine's token (nats),
    with transformers fed the engine's own tokens (teacher forcing), so one early flip between two
    near-equal tokens does not make every later position count as a difference."""
    import torch

    if not tokens:
        return []
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens], device=device)).logits[0, len(prompt) - 1:-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=device).unsqueeze(1))[:, 0]
    return [round(v, 4) for v in (logp.max(dim=-1).values - chosen).tolist()]
