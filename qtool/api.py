"""The public Python API; the CLI is a thin layer over these functions."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtool import backends
from qtool.backends.base import Quantized
from qtool.calibration import build_calibration
from qtool.checkpoint import (
    atomic_output_dir,
    check_output_dir,
    folder_size_bytes,
    read_record,
    resume_dir,
    tensor_bytes_under,
    verify_weights,
    weights_size_bytes,
    write_record,
)
from qtool.data import load_text
from qtool.errors import CheckpointError, DatasetError, OutputExistsError, QtoolError, SpecError
from qtool.evaluate.divergence import DivergenceResult, perplexity_and_divergence
from qtool.evaluate.lm_harness import WordPerplexityResult, word_perplexity
from qtool.evaluate.memory import peak_memory, tensor_bytes
from qtool.evaluate.perplexity import PerplexityResult, token_perplexity, tokenize
from qtool.evaluate.speed import SpeedResult, measure_speed
from qtool.mixed.plan import Budget, MixedPlan, budget_table, check_budget, make_plan
from qtool.mixed.target import parse_size
from qtool.models import (
    ModelSource,
    describe_load_error,
    parameter_count,
    quantizable_linears,
    resolve_model,
    tokenizer_of,
)
from qtool.request import QuantizeRequest
from qtool.runtime import (
    Stopwatch,
    compute_dtype,
    configure_cpu,
    package_versions,
    resolve_device,
    seed_everything,
)
from qtool.schema import parse_section
from qtool.streaming import DEFAULT_MAX_SHARD_BYTES, stream_quantize, stream_reason

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    device: str
    record: dict[str, Any] | None  # qtool.json when qtool wrote the folder
    source: str


def quantize(
    model: str,
    out: str | Path,
    method: str,
    bits: int | None = None,
    group_size: int | None = None,
    options: dict[str, Any] | None = None,
    device: str = "auto",
    force: bool = False,
    seed: int = 0,
    calib: str | None = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
    resume: bool = False,
    bos: str | None = None,
    target_bits: float | None = None,
    target_size: str | int | None = None,
    sensitivity: str | None = None,
    perturbation: str | None = None,
    mixed_bits: list[int] | None = None,
    max_shard_size: str | int | None = None,
) -> dict[str, Any]:
    """Quantize `model` with `method` into the folder `out`; return its qtool.json record.

    The arguments make one qtool.request.QuantizeRequest (see `quantize_request`). `calib`,
    `nsamples`, `seqlen` and `bos` are for the methods that calibrate (default: qtool's built-in
    text, 128 samples of 2048 tokens capped to the model's context, BOS first when the tokenizer
    adds it: qtool.bos). `target_bits` (average bits per weight) or `target_size` (bytes, or a size
    such as "120MiB") asks for mixed precision: qtool.mixed chooses each layer's bits, with the
    `sensitivity` measure "fisher" (default) or "kl", perturbing the weights by the `perturbation`
    "rtn" (default) or "method" (the backend's own error), giving layers the `mixed_bits` widths
    (default: all the backend offers). `max_shard_size`: see `quantize_request`. Raises SpecError
    for what the backend refuses.
    """
    request = parse_section(QuantizeRequest, {
        "method": method, "bits": bits, "group_size": group_size, "options": options or {}, "device": device,
        "seed": seed, "calib": calib, "nsamples": nsamples, "seqlen": seqlen, "bos": bos,
        "target_bits": target_bits, "target_size": target_size, "sensitivity": sensitivity,
        "perturbation": perturbation, "mixed_bits": mixed_bits,
    }, "quantize", error=SpecError)
    return quantize_request(model, out, request, force=force, resume=resume, max_shard_size=max_shard_size)


def quantize_request(model: str, out: str | Path, request: QuantizeRequest, force: bool = False,
                     resume: bool = False, max_shard_size: str | int | None = None) -> dict[str, Any]:
    """Quantize `model` as `request` says into the folder `out`; return its qtool.json record.

    Everything that can be checked without weights is checked first (output, device, package,
    model, layer widths, calibration text); OUT appears only when the whole run succeeded.
    Backends that quantize layer by layer (rtn, hqq, eetq) stream a local safetensors source one
    tensor at a time into shards of at most `max_shard_size` bytes (default 2 GiB; "500MB" and
    the like are read too): see qtool.streaming; qtool.json's `streaming` says which way it ran.
    Resumable backends (aqlm) keep finished blocks in `.OUT.qtool-resume/` beside OUT until the
    run succeeds; `resume=True` continues from there. Raises QtoolError subclasses, one line each.
    """
    out = Path(out)
    backend, spec, seed, calib = backends.get(request.method), request.spec, request.seed, request.calib
    max_shard_bytes = shard_bytes(max_shard_size)
    inputs = [model, *([calib] if calib else [])]
    check_output_dir(out, force, inputs)
    workdir = resume_folder(out, backend, resume, force)
    device = resolve_device(request.device)
    backend.require_available(device)
    source = resolve_model(model)
    inputs.append(source.location)  # a .gguf's converted folder in qtool's cache
    check_output_dir(out, force, inputs)
    config, linears = checked_source(model, source, backend, spec)
    budget = mixed_budget(backend, spec, config, linears, device) if spec.target else None
    watch = Stopwatch()
    calibration = None
    if spec.calibration:
        with watch.stage("calibration_data"):
            calibration = build_calibration(spec.calibration, source.load_tokenizer(), config, seed)
    plan = None
    if budget is not None:
        with watch.stage("sensitivity"):
            plan = make_plan(source, backend, spec, budget, calibration, device, compute_dtype(device))
        for line in plan.summary_lines():
            log.info(line)
        spec = plan.apply(spec)

    if device == "cpu":
        configure_cpu()
    seed_everything(seed)
    not_streamed = stream_reason(source, backend, config)
    with atomic_output_dir(out, force, inputs) as tmp:
        # the peak is reset here so that runs in one process (qtool compare) each get their own
        with peak_memory(device) as peak:
            if not_streamed is None:
                with watch.stage("quantize"):  # reading, quantizing and writing, tensor by tensor
                    streamed = stream_quantize(source, backend, spec, tmp, device, compute_dtype(device), max_shard_bytes)
                result = Quantized(None)
            else:
                with watch.stage("quantize"):
                    result = backend.quantize(source, spec, device, calibration, **({"workdir": workdir} if workdir else {}))
                    result = result if isinstance(result, Quantized) else Quantized(result)
                with watch.stage("save"):
                    backend.save(result.model, tmp)
            source.load_tokenizer().save_pretrained(tmp)
        layer_losses, extra = result.losses, result.record
        del result
        with watch.stage("reload_check"):
            reload_check = backend.reload_check(tmp, device)
        record = {
            "qtool_format": 1,
            "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "method": request.method,
            "spec": spec.as_dict(),
            "source": source.describe(),
            "device": device,
            "compute_dtype": str(compute_dtype(device)).removeprefix("torch."),
            "kernel": backend.kernel(device),
            "format": backend.capabilities.format,
            "effective_bits_per_weight": round(plan.average_bits if plan else backend.effective_bits(spec), 4),
            "quantized_layers": len(linears),
            "timings_s": watch.seconds,
            "peak_memory_mib": round(peak.mib, 1),
            "peak_memory_kind": peak.kind.replace("this phase", "quantize and save"),
            "streaming": streamed.as_dict() if not_streamed is None else {"mode": "in memory", "why": not_streamed},
            "weights_bytes": weights_size_bytes(tmp),
            "quantized_layers_bytes": tensor_bytes_under(tmp, linears),
            "size_on_disk_bytes": folder_size_bytes(tmp),
            "versions": package_versions(),
        }
        if calibration:
            record["calibration"] = calibration.record
        if plan:
            record["mixed_precision"] = plan.record() | {
                "written_bytes": record["weights_bytes"],
                "size_error": round(record["weights_bytes"] / plan.predicted_bytes - 1, 5)}
        record |= extra
        if layer_losses:
            record["layer_losses"] = layer_losses
        if reload_check:
            record["reload_check"] = reload_check
        write_record(tmp, record)
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return record


def shard_bytes(size: str | int | None) -> int:
    """Bytes of `size` ("500MB", "2GiB", bytes; None: qtool.streaming's default). Raises SpecError."""
    if size is None:
        return DEFAULT_MAX_SHARD_BYTES
    try:
        value = parse_size(size)
    except SpecError:
        value = 0
    if value < 1:
        raise SpecError(f"--max-shard-size takes a size such as 500MB, 2GiB or 1000000 (bytes), got {size!r}")
    return value


def checked_source(model: str, source: ModelSource, backend: Any, spec: Any) -> tuple[Any, dict[str, nn.Linear]]:
    """(config, quantizable linears) of `source`, after the checks that need no weights: not quantized
    already, the architecture and the layer widths fit `spec`. Raises SpecError."""
    config = source.config()
    prior = read_record(Path(source.location)) if source.kind == "folder" else None
    if prior or getattr(config, "quantization_config", None):
        kind = prior["method"] if prior else dict(config.quantization_config).get("quant_method", "?")
        raise SpecError(f"model {model} is already quantized ({kind}); quantize its full-precision original")
    backend.check_model(spec, config)
    linears = quantizable_linears(config)
    backend.check_layers(spec, linears)
    return config, linears


def mixed_budget(backend: Any, spec: Any, config: Any, linears: dict[str, nn.Linear], device: str) -> Budget:
    """The sizes of every layer group at every candidate width; refuses a budget no plan meets."""
    dtype_bytes = torch.empty((), dtype=compute_dtype(device)).element_size()
    params, tensors = parameter_count(config)
    added_params, added_tensors = backend.added_parameters(spec, config)
    budget = budget_table(backend, spec, linears, (params + added_params, tensors + added_tensors), dtype_bytes)
    check_budget(budget, spec.target, backend.name)
    return budget


def plan_precision(model: str, request: QuantizeRequest) -> MixedPlan:
    """The mixed-precision plan `request` (with target_bits or target_size) gives `model`, without
    quantizing: `qtool plan`. Measures the costs or reads them from qtool's cache (the quantize run
    that follows reads them there). Raises SpecError for a request without a budget."""
    backend, spec = backends.get(request.method), request.spec
    if spec.target is None:
        raise SpecError("a plan needs a budget: --target-bits or --target-size")
    device = resolve_device(request.device)
    backend.require_available(device)
    source = resolve_model(model)
    config, linears = checked_source(model, source, backend, spec)
    budget = mixed_budget(backend, spec, config, linears, device)
    calibration = build_calibration(spec.calibration, source.load_tokenizer(), config, request.seed)
    if device == "cpu":
        configure_cpu()
    seed_everything(request.seed)
    return make_plan(source, backend, spec, budget, calibration, device, compute_dtype(device))


def resume_folder(out: Path, backend: Any, resume: bool, force: bool) -> Path | None:
    """Where a resumable backend keeps finished work; checks --resume/--force against what is there."""
    if not backend.resumable:
        if resume:
            raise SpecError(f"{backend.name} runs do not resume (each run is short); drop --resume")
        return None
    folder = resume_dir(out)
    if folder.exists() and not resume:
        if not force:
            raise OutputExistsError(f"an interrupted {backend.name} run left {folder}: add --resume to continue it, "
                                    "or --force to start over")
        shutil.rmtree(folder)
    return folder


def model_config(path: str | Path) -> Any:
    """The transformers config of a qtool output folder or any model source, without its weights.

    Raises ModelNotFoundError / CheckpointError (one line) for what cannot be found or read.
    """
    folder = Path(path).expanduser()
    if folder.is_dir() and read_record(folder) is not None:
        return ModelSource(str(path), "folder", str(folder)).config()
    return resolve_model(str(path)).config()


def load(path: str | Path, device: str = "auto", trainable: bool = False) -> LoadedModel:
    """Load a qtool output folder (any backend) or any model source qtool resolves.

    `trainable=True` asks the backend for layers that support a backward pass (LoRA training):
    some loaders otherwise pick an inference-only kernel on some CPUs (GPTQModel on AVX-512).
    Raises CheckpointError for a folder that cannot be loaded.
    """
    device = resolve_device(device)
    if device == "cpu":
        configure_cpu()
    folder = Path(path).expanduser()
    record = read_record(folder) if folder.is_dir() else None
    if record is None:
        source = resolve_model(str(path))
        model = _guarded(lambda: source.load_model(device, compute_dtype(device)), path)
        tokenizer = source.load_tokenizer()
        check_vocabulary(model, tokenizer, path)
        return LoadedModel(model, tokenizer, device, None, str(path))
    verify_weights(folder)
    backend = backends.get(record["method"])
    backend.require_available(device)
    load_fn = backend.load_for_training if trainable else backend.load
    model = _guarded(lambda: load_fn(folder, device), path)
    tokenizer = _output_tokenizer(folder, path)
    check_vocabulary(model, tokenizer, path)
    return LoadedModel(model, tokenizer, device, record, str(path))


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer `load(path)` would give, without the weights: seconds where the model takes
    tens of them, so input that the tokenizer alone can judge (a prompt's length) is refused first.
    Raises CheckpointError / ModelNotFoundError (one line) as `load` does."""
    folder = Path(path).expanduser()
    if folder.is_dir() and read_record(folder) is not None:
        return _output_tokenizer(folder, path)
    return tokenizer_of(str(path))


def _output_tokenizer(folder: Path, path: Any) -> Any:
    # a qtool output folder's tokenizer: the files it copied from its model
    return _guarded(lambda: ModelSource(str(folder), "folder", str(folder)).load_tokenizer(), path)


def check_vocabulary(model: nn.Module, tokenizer: Any, name: Any) -> None:
    """CheckpointError when the tokenizer makes ids the model's embedding has no row for."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise CheckpointError(f"{name}: its tokenizer has {len(tokenizer)} tokens but the model's embedding only {rows} "
                              "rows (vocab_size in config.json): the tokenizer belongs to another model")


def _guarded(load_fn: Any, path: Any) -> Any:
    # Weights were verified already; what still fails here is a damaged config or tensor layout.
    try:
        return load_fn()
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} could not be loaded: {describe_load_error(exc)}") from None


def evaluate_perplexity(
    loaded: LoadedModel,
    source: str,
    ctx: int = 2048,
    stride: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    bos: str = "auto",
) -> PerplexityResult:
    """Token perplexity (qtool.evaluate.perplexity) of the model on a text source; `bos`: qtool.bos mode."""
    text = load_text(source, purpose="eval")
    return token_perplexity(loaded.model, loaded.tokenizer, text, ctx, stride, max_tokens, progress, bos)


def evaluate_divergence(
    loaded: LoadedModel,
    base: LoadedModel,
    source: str,
    ctx: int = 2048,
    stride: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    bos: str = "auto",
) -> tuple[PerplexityResult, DivergenceResult]:
    """The model's token perplexity and its next-token KL from `base`, on the same windows."""
    text = load_text(source, purpose="eval")
    return perplexity_and_divergence(
        loaded.model, base.model, base.source, loaded.tokenizer, text, ctx, stride, max_tokens, progress, bos
    )


def evaluate_word_perplexity(
    loaded: LoadedModel, source: str, max_length: int = 2048, limit: int | None = None, bos: str = "auto"
) -> WordPerplexityResult:
    """lm-evaluation-harness's word perplexity of the model on a local text; see evaluate.lm_harness."""
    return word_perplexity(loaded.model, loaded.tokenizer, load_text(source, purpose="eval"), max_length, limit, bos)


def evaluate_speed(
    loaded: LoadedModel,
    batches: tuple[int, ...] = (1, 8),
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
    prompt_source: str = "builtin",
) -> list[SpeedResult]:
    """Prefill/decode throughput and time to first token at each batch size; see evaluate.speed."""
    ids = speed_prompt(loaded, prompt_source, prompt_tokens)
    return [measure_speed(loaded.model, ids, batch, new_tokens, repeats) for batch in batches]


def speed_prompt(loaded: LoadedModel, source: str, prompt_tokens: int) -> torch.Tensor:
    """The speed runs' prompt: the first prompt_tokens tokens of a text source, int64 [prompt_tokens]."""
    ids = tokenize(loaded.tokenizer, load_text(source).content, max_tokens=prompt_tokens).ids
    if len(ids) < prompt_tokens:
        raise DatasetError(f"{source} has {len(ids)} tokens, fewer than --prompt-len {prompt_tokens}")
    return ids


def checkpoint_folder(loaded: LoadedModel) -> Path:
    """The folder (or .gguf) a loaded model came from, as engines load it: a qtool output folder, a
    .gguf file, or the local folder qtool resolved a model name to (a built-in model's converted folder)."""
    folder = Path(loaded.source).expanduser()
    if folder.is_dir() or (folder.is_file() and folder.suffix == ".gguf"):
        return folder
    return Path(resolve_model(loaded.source).location)


def evaluate_in_engine(loaded: LoadedModel, engine_name: str, plan: Any) -> Any:
    """The loaded model's checkpoint measured in a serving engine (qtool.engines), as `plan` says.

    plan: an EvalPlan for this model. With plan.speed: speed and peak memory (the prompt is the
    first prompt_len tokens of plan.text, as in evaluate_speed). With plan.perplexity and an
    engine that scores windows (llamacpp, vllm): token perplexity on the same windows as
    evaluate_perplexity. Returns an EngineRun, or an EngineFailure when the engine cannot take this
    checkpoint (the error in one line).
    """
    from qtool import engines
    from qtool.engines import EngineFailure, EngineJob
    from qtool.evaluate.perplexity import window_tokens, windowed

    engine = engines.get(engine_name)
    speed, windows, scored_from, length = None, None, None, 16
    if plan.speed:
        s = plan.speed
        ids = speed_prompt(loaded, plan.text, s.prompt_len)
        speed = {"batch": list(s.batch), "prompt_ids": ids.tolist(), "new_tokens": s.new_tokens, "repeats": s.repeats}
        length = s.prompt_len + s.new_tokens + 16
    if plan.perplexity and engine.scores_windows:
        w = plan.windows(progress=False)
        text = windowed(loaded.tokenizer, load_text(plan.text, purpose="eval"), w["ctx"], w["stride"],
                        w["max_tokens"], w["bos"])
        pairs = [window_tokens(text, start, first) for start, first in text.plan]
        windows, scored_from = [t.tolist() for t, _ in pairs], [o for _, o in pairs]
        length = max(length, text.ctx + 1)  # vLLM generates one token after a full window
    try:
        path = engine.checkpoint_for(checkpoint_folder(loaded))
        job = EngineJob(model=str(path), prompts=[], new_tokens=plan.speed.new_tokens if plan.speed else 1,
                        max_model_len=length, compile=bool(plan.speed and plan.speed.compile), speed=speed,
                        windows=windows, scored_from=scored_from)
        return engine.run(job)
    except QtoolError as exc:
        return EngineFailure(engine_name, str(exc))


def memory_footprint(loaded: LoadedModel) -> dict[str, Any]:
    """Size of the weights in memory and on disk, and what producing them cost (from qtool.json)."""
    folder = Path(loaded.source)
    footprint: dict[str, Any] = {
        "in_memory_bytes": tensor_bytes(loaded.model),
        "on_disk_weights_bytes": weights_size_bytes(folder) if folder.is_dir() else None,
    }
    if loaded.record:
        footprint["quantization_cost"] = {
            "timings_s": loaded.record["timings_s"],
            "peak_memory_mib": loaded.record["peak_memory_mib"],
            "peak_memory_kind": loaded.record["peak_memory_kind"],
        }
    return footprint


@torch.no_grad()
def generate(loaded: LoadedModel, prompt: str, max_new_tokens: int = 64, chat: bool = True) -> str:
    """Greedy completion of `prompt`, through the model's chat template when it has one."""
    tok = loaded.tokenizer
    if chat and getattr(tok, "chat_template", None):
        inputs = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tok(prompt, return_tensors="pt")
    inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
    output = loaded.model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id
    )
    return tok.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
