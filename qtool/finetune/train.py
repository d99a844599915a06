"""`qtool qlora`: LoRA on a quantized base with PEFT and the transformers Trainer.

qtool's part is the recipe, the data, the quantized base (quantized into OUT/base first, or an
existing qtool folder) and the outputs; LoRA on quantized layers is PEFT's job and the loop is
the Trainer's. OUT holds: base/ (when quantized here), checkpoints/ (for --resume), adapter/
(PEFT format), train_log.jsonl, loss.png and qtool.json (written last: its presence means done).
OUT is created only after the recipe, the data and the LoRA targets passed their checks, and is
removed again if anything fails before the first training step: a failed run that trained
nothing leaves nothing that the corrected command would have to --force away.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from qtool.errors import OutputExistsError, QtoolError
from qtool.finetune.dataset import IGNORE, Examples, build_examples
from qtool.finetune.recipe import QloraRecipe, RecipeError, resolve_data_path

LOG_NAME = "train_log.jsonl"


class TrainingUnsupportedError(QtoolError):
    """PEFT cannot put LoRA on this backend's layers."""


def output_dir(recipe: QloraRecipe, out: str | None) -> Path:
    return Path(out or recipe.out or Path("runs") / recipe.path.stem)


def check_output(out: Path, resume: bool, force: bool, inputs: list[Any]) -> bool:
    """Whether this run may write OUT, checked before any work; True when --force will replace it.

    OUT may not be, contain or lie inside an input (the model, the data, a quantized base), and
    --force replaces only a run folder (or another qtool output, or an empty folder). Nothing is
    removed here: a --force run replaces OUT only once its inputs passed every check (see
    `provisional_output`), so a failed validation leaves the old run as it was."""
    from qtool.checkpoint import check_output_dir, check_writable_location, refuse_overlap

    refuse_overlap(out, [i for i in inputs if i])
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} is a file; a qlora run writes a folder: pick another --out")
    if not out.exists():
        check_writable_location(out)
        return False
    if force:
        check_output_dir(out, force=True)
        return True
    if (out / "qtool.json").exists():
        raise OutputExistsError(f"{out} holds a finished run; pass --force to train again from scratch")
    if not resume:
        raise OutputExistsError(f"{out} holds an unfinished run: pass --resume to continue it, or --force to restart")
    return False


@contextmanager
def provisional_output(out: Path, replace: bool, main: bool = True) -> Iterator[None]:
    """Create OUT (replacing the old one when `replace`); remove it again if the block fails.

    The block holds what still fails before the first training step (quantizing the base,
    loading it, attaching LoRA): an OUT left behind then would make the corrected rerun meet
    "holds an unfinished run". An OUT that existed before (a --resume run) is left as it is.
    In a multi-process run only rank 0 (`main`) creates and removes OUT; the others wait for it."""
    from qtool.finetune.distributed import agreed

    existed = out.exists() and not replace

    def create() -> None:
        if main:
            if replace:
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)

    agreed(create)
    try:
        yield
    except BaseException:
        if main and not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise


def target_modules(model: torch.nn.Module, wanted: str | list[str], base_linears: list[str]) -> list[str]:
    """Module-name suffixes for LoRA; 'all-linear' means every quantized linear (the head excluded)."""
    names = sorted({name.rsplit(".", 1)[-1] for name in base_linears})
    if wanted == "all-linear":
        return names
    if isinstance(wanted, str):
        wanted = [wanted]
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for name in wanted:
        if name not in present:
            raise RecipeError(f"lora.target_modules: {name!r} is not a module of this model (its linear layers: {', '.join(names)})")
    return list(wanted)


def base_model_folder(recipe: QloraRecipe, out: Path, device: str) -> tuple[str, dict[str, Any] | None]:
    """What LoRA trains on: an existing qtool folder, one quantized into OUT/base now, or the model itself."""
    from qtool import api
    from qtool.checkpoint import read_record

    if recipe.quantized:
        return recipe.quantized, None
    if recipe.quantization is None:
        return recipe.model, None
    folder = out / "base"
    if not (folder.is_dir() and read_record(folder)):
        api.quantize_request(recipe.model, folder, recipe.quantization.request(seed=recipe.train.seed, device=device),
                             force=True)
    return str(folder), read_record(folder)


def check_before_quantizing(recipe: QloraRecipe, data_path: Path | str, device: str) -> Examples:
    """For a base still to be quantized into OUT/base: every check that needs no quantized weights.

    The quantization spec, the data (tokenised with the original's tokenizer, which quantizing
    copies unchanged into the base) and the LoRA targets (named on a weightless skeleton of the
    original: quantizing replaces layers under the same names) all fail before OUT exists."""
    from qtool.finetune.adapters import weightless_model
    from qtool.models import resolve_model

    q = recipe.quantization
    refuse_known_failures(q.method, device)  # before minutes of quantizing
    q.request(seed=recipe.train.seed, device=device)  # the backend checks bits, group size, options, calibration
    source = resolve_model(recipe.model)
    examples = build_examples(recipe.dataset, data_path, source.load_tokenizer(), recipe.train.seed)
    skeleton = weightless_model(source.config())
    target_modules(skeleton, recipe.lora.target_modules, base_linear_names(skeleton.config))
    return examples


def refuse_known_failures(method: str, device: str) -> None:
    """Backends whose layers take LoRA but fail in training say so before any step runs."""
    from qtool import backends

    if method in backends.known_methods():
        backend = backends.get(method)
        reason = backend.lora_unsupported_reason(device) or (
            None if backend.capabilities.peft_trainable else "PEFT has no LoRA layer for them")
        if reason:
            raise TrainingUnsupportedError(f"PEFT cannot train LoRA on {method} layers on {device}: {reason}")


def attach_lora(model: torch.nn.Module, recipe: QloraRecipe, targets: list[str], method: str) -> Any:
    from qtool.finetune.adapters import import_peft

    import_peft()
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as exc:
        layer = type(next(m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets)).__name__
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TrainingUnsupportedError(f"PEFT cannot train LoRA on {method} layers ({layer}): {first}") from None


def _log_callback(path: Path) -> Any:
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        """Every Trainer log line (train loss, eval loss, lr, grad norm) as one JSON line."""

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if logs and state.is_world_process_zero:
                with open(path, "a") as fh:
                    fh.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")

    return JsonlLog()


def last_checkpoint(folder: Path) -> Path | None:
    # The Trainer writes trainer_state.json last: a checkpoint without it was cut off mid-save.
    points = sorted((p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                    key=lambda p: int(p.name.split("-")[-1]))
    return points[-1] if points else None


def trim_log(path: Path, step: int) -> None:
    """Drop log lines past `step`: an interrupted run logged steps the resumed run will redo."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def run_qlora(recipe: QloraRecipe, out: str | None = None, resume: bool = False, force: bool = False,
              max_steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Fine-tune as `recipe` says (LoRA, freeze or full); return the qtool.json record written to OUT.

    OUT appears only once everything that can fail without training has been checked (recipe,
    data, LoRA targets, the base when it need not be quantized into OUT first); whatever fails
    after that but before the first step removes it again, so the corrected command just works.

    Under a launcher (torchrun, accelerate launch, `qtool qlora --nproc N`) every rank runs this;
    the checks run on all ranks and fail on all of them together (distributed.agreed), and only
    rank 0 writes: OUT, OUT/base (the others wait, then load it), the log, the adapter or model,
    loss.png and qtool.json. Every rank returns the same record."""
    from qtool import api
    from qtool.finetune.distributed import agreed, init_process_group
    from qtool.runtime import Stopwatch, resolve_device

    device = resolve_device(recipe.device)
    me = init_process_group(device)
    folder = output_dir(recipe, out)
    limit = max_steps or recipe.train.max_steps

    def preflight() -> tuple[Path | str, bool, str | None, Path | None]:
        from qtool.finetune.distributed import check_distributed

        data_path = resolve_data_path(recipe)
        replace = check_output(folder, resume, force, [recipe.model, recipe.quantized, data_path])
        done = last_checkpoint(folder / "checkpoints") if resume else None
        if done and limit and int(done.name.split("-")[-1]) >= limit:
            raise QtoolError(f"{folder} is already at step {done.name.split('-')[-1]}, at or past the {limit} steps "
                             "asked for: nothing to train (raise --max-steps, or --force to train again from scratch)")
        deepspeed = check_distributed(recipe.train.distributed, recipe.train.deepspeed, recipe.path, device)
        if recipe.finetuning_type != "lora":
            check_full_precision_base(recipe)
        return data_path, replace, deepspeed, done

    data_path, replace, deepspeed, _ = agreed(preflight)
    if device == "cpu":
        torch.set_flush_denormal(True)  # LoRA through 4-bit layers hits denormals; 7x slower without this
    watch = Stopwatch()
    if recipe.quantization:
        examples = agreed(lambda: check_before_quantizing(recipe, data_path, device))
    else:
        def load_base() -> tuple[Any, ...]:
            base_name, base_record = base_model_folder(recipe, folder, device)
            with watch.stage("base"):
                loaded = api.load(base_name, device=device, trainable=True)
            examples = build_examples(recipe.dataset, data_path, loaded.tokenizer, recipe.train.seed)
            return base_name, base_record, loaded, examples, *trainable_model(loaded, recipe, device)

        base_name, base_record, loaded, examples, model, method, targets = agreed(load_base)
    with provisional_output(folder, replace, main=me.main):
        if recipe.quantization:
            with watch.stage("base"):
                if me.main:  # rank 0 quantizes into OUT/base; the others wait here, then load it
                    agreed(lambda: base_model_folder(recipe, folder, device))
                else:
                    agreed(lambda: None)

                def load_quantized() -> tuple[Any, ...]:
                    base_name, base_record = base_model_folder(recipe, folder, device)
                    loaded = api.load(base_name, device=device, trainable=True)
                    return base_name, base_record, loaded, *trainable_model(loaded, recipe, device)

                base_name, base_record, loaded, model, method, targets = agreed(load_quantized)
        tokenizer = loaded.tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        trainer = agreed(lambda: make_trainer(model, tokenizer, examples, recipe, folder, max_steps, progress,
                                              device, deepspeed))  # makes OUT/checkpoints
        checkpoint = last_checkpoint(folder / "checkpoints") if resume else None
    facts = {"model": base_name, "method": method, "record": base_record, "targets": targets, "data": examples.source,
             "deepspeed": deepspeed}
    return train_and_record(trainer, tokenizer, recipe, folder, checkpoint, watch, device, facts)


def check_full_precision_base(recipe: QloraRecipe) -> None:
    """freeze and full train the base's own weights: refuse a quantized base (a qtool quantized
    folder) and more trainable layers than the model has, in one line, before loading anything."""
    from qtool.finetune.adapters import quantized_base_record
    from qtool.models import resolve_model

    record = quantized_base_record(recipe.model)
    if record and record.get("method") and record.get("kind", "quantize") == "quantize":
        source = (record.get("source") or {}).get("name", "its full-precision original")
        raise RecipeError(f"finetuning_type {recipe.finetuning_type} trains the base's own weights, and {recipe.model} "
                          f"is {record['method']}-quantized: set model: to a full-precision model ({source}), or use "
                          "finetuning_type: lora")
    if recipe.finetuning_type == "freeze":
        layers = getattr(resolve_model(recipe.model).config(), "num_hidden_layers", None)
        if layers is not None and recipe.trainable_layers > layers:
            raise RecipeError(f"freeze_trainable_layers: {recipe.trainable_layers}, but {recipe.model} has {layers} "
                              "decoder layers")


def trainable_model(loaded: Any, recipe: QloraRecipe, device: str) -> tuple[Any, str, list[str] | None]:
    """The model to train and what it trains: LoRA adapters (lora_model), the last N decoder
    layers (freeze: everything else has requires_grad off) or every weight (full). Returns
    (model, base method, LoRA targets or None)."""
    from qtool.runtime import seed_everything

    if recipe.finetuning_type == "lora":
        return lora_model(loaded, recipe, device)
    model = loaded.model
    seed_everything(recipe.train.seed)
    if recipe.finetuning_type == "full":
        for param in model.parameters():
            param.requires_grad_(True)
    else:
        layers = decoder_layers(model)
        for param in model.parameters():
            param.requires_grad_(False)
        for layer in layers[len(layers) - recipe.trainable_layers:]:
            for param in layer.parameters():
                param.requires_grad_(True)
    return model, (loaded.record or {}).get("method", "full-precision"), None


def decoder_layers(model: Any) -> Any:
    """The model's decoder layers: its ModuleList as long as config.num_hidden_layers (Llama's model.layers)."""
    count = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and name.endswith("layers"):
            return module
    raise QtoolError(f"finetuning_type freeze: found no list of {count} decoder layers in {type(model).__name__}")


def lora_model(loaded: Any, recipe: QloraRecipe, device: str) -> tuple[Any, str, list[str]]:
    """The loaded base with the recipe's LoRA attached (seeded); also its method and the target names."""
    from qtool.runtime import seed_everything

    method = (loaded.record or {}).get("method", "full-precision")
    targets = target_modules(loaded.model, recipe.lora.target_modules, base_linear_names(loaded.model.config))
    refuse_known_failures(method, device)
    seed_everything(recipe.train.seed)
    return attach_lora(loaded.model, recipe, targets, method), method, targets


def train_and_record(trainer: Any, tokenizer: Any, recipe: QloraRecipe, folder: Path, checkpoint: Path | None,
                     watch: Any, device: str, base: dict[str, Any]) -> dict[str, Any]:
    """Run the Trainer (from `checkpoint` when resuming), save the adapter (lora) or the whole
    model (freeze, full) and write qtool.json last; rank 0 writes, every rank returns the record."""
    from qtool.checkpoint import write_record
    from qtool.evaluate.memory import peak_memory
    from qtool.finetune.distributed import barrier, distributed_record, world
    from qtool.runtime import package_versions

    main = world().main
    if main and checkpoint:
        trim_log(folder / LOG_NAME, int(checkpoint.name.split("-")[-1]))
    elif main and (folder / LOG_NAME).exists():
        (folder / LOG_NAME).unlink()
    barrier()
    with watch.stage("train"), peak_memory(device) as peak:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    model = trainer.model
    saved = folder / ("adapter" if recipe.finetuning_type == "lora" else "model")
    mode = distributed_mode(recipe, base.get("deepspeed"))
    if mode in ("fsdp", "deepspeed"):
        trainer.save_model(str(saved))  # a collective: the Trainer gathers the sharded weights, rank 0 writes
    elif main:
        model.save_pretrained(saved)
    write_rank_view(trainer, model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    curve = None
    if main:
        tokenizer.save_pretrained(saved)
        curve = loss_curve(folder / LOG_NAME, folder / "loss.png")
    history = read_log(folder / LOG_NAME) if main else [h for h in trainer.state.log_history if "loss" in h]
    first, last = train_losses(history, result.training_loss)
    tr = recipe.train
    record = {
        "qtool_format": 1,
        "kind": "qlora",
        "finetuning_type": recipe.finetuning_type,
        "output": saved.name,
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe.as_dict(),
        "base": {"model": base["model"], "method": base["method"],
                 "quantization": base["record"] and base["record"].get("spec"),
                 "sha256_weights": _weights_hash(base["model"])},
        "data": base["data"],
        "lora_targets": base["targets"],
        "trainable_layers": recipe.trainable_layers if recipe.finetuning_type == "freeze" else None,
        "trainable_parameters": trainable,
        "base_parameters": total,
        "steps": trainer.state.global_step,
        "resumed_from": checkpoint.name if checkpoint else None,
        "train_loss_first": first,
        "train_loss_last": last,
        "eval_loss_last": next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None),
        "train_runtime_s": result.metrics.get("train_runtime"),
        "timings_s": watch.seconds,
        "peak_memory_mib": round(peak.mib, 1),
        "peak_memory_kind": peak.kind.replace("this phase", "training"),
        "device": device,
        "distributed": distributed_record(device, mode, tr.batch_size, tr.grad_accum),
        "loss_curve": curve and curve.name,
        "versions": package_versions(),
    }
    if main:
        write_record(folder, record)
    barrier()  # no rank reports success before rank 0 has written qtool.json
    return record


def distributed_mode(recipe: QloraRecipe, deepspeed: str | None) -> str | None:
    """ddp, fsdp or deepspeed for a multi-process run; None for a single process."""
    from qtool.finetune.distributed import world

    if not world().distributed:
        return None
    return "deepspeed" if deepspeed else recipe.train.distributed


def write_rank_view(trainer: Any, model: Any) -> None:
    """With QTOOL_RANK_LOG_DIR set, each rank writes DIR/rank<R>.json: the losses it logged and a
    sha256 of its own trainable weights, so that ranks can be compared (the tests do); off by default."""
    import hashlib
    import os

    from qtool.finetune.distributed import world

    folder = os.environ.get("QTOOL_RANK_LOG_DIR")
    if not folder:
        return
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    me = world()
    view = {"rank": me.rank, "world_size": me.world_size, "steps": trainer.state.global_step,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "trainable_sha256": digest.hexdigest()}
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"rank{me.rank}.json").write_text(json.dumps(view) + "\n")


def train_losses(history: list[dict[str, Any]], mean_loss: float) -> tuple[float, float]:
    """First and last logged training loss; the run's mean loss for both when no step was logged.

    The Trainer logs a step's loss only every `logging_steps` steps: a run shorter than that logs
    none, and its summary still needs a loss (the mean over the run's steps, from the Trainer)."""
    losses = [h["loss"] for h in history if "loss" in h]
    return (losses[0], losses[-1]) if losses else (mean_loss, mean_loss)


def base_linear_names(config: Any) -> list[str]:
    """The base's quantizable linears by name (qtool.models), read past its quantization_config."""
    from qtool.models import quantizable_linears

    quantization = getattr(config, "quantization_config", None)
    try:
        if quantization is not None:
            del config.quantization_config
        return list(quantizable_linears(config))
    finally:
        if quantization is not None:
            config.quantization_config = quantization


def make_trainer(model: Any, tokenizer: Any, examples: Any, recipe: QloraRecipe, folder: Path,
                 max_steps: int | None, progress: bool, device: str = "cpu", deepspeed: str | None = None) -> Any:
    """The transformers Trainer for this run; it creates OUT/checkpoints.

    Without `progress` (--quiet) the Trainer shows nothing: no tqdm bars, none of its own log
    lines (with tqdm off it would print each log dict to stdout instead), no reporting
    integrations; every log line still goes to OUT/train_log.jsonl through JsonlLog.

    Multi-process: gloo on CPU (the Trainer's default there would be ccl), FSDP when the recipe
    says train.distributed: fsdp, DeepSpeed with the checked config path `deepspeed`."""
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainingArguments

    from qtool.finetune.distributed import backend_for, world

    tr = recipe.train
    has_val = bool(examples.validation)
    args = TrainingArguments(
        output_dir=str(folder / "checkpoints"),
        per_device_train_batch_size=tr.batch_size,
        per_device_eval_batch_size=tr.batch_size,
        gradient_accumulation_steps=tr.grad_accum,
        learning_rate=tr.learning_rate,
        num_train_epochs=tr.epochs,
        max_steps=max_steps or tr.max_steps or -1,
        lr_scheduler_type=tr.scheduler,
        warmup_steps=tr.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        max_grad_norm=tr.max_grad_norm,
        gradient_checkpointing=tr.gradient_checkpointing,
        logging_steps=tr.logging_steps,
        save_strategy="steps",
        save_steps=tr.save_steps,
        save_total_limit=tr.save_total_limit,
        eval_strategy="steps" if has_val else "no",
        eval_steps=(tr.eval_steps or tr.save_steps) if has_val else None,
        seed=tr.seed,
        data_seed=tr.seed,
        use_cpu=not torch.cuda.is_available() or recipe.device == "cpu",
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=not progress,
        log_level="passive" if progress else "error",
        dataloader_num_workers=0,
        **distributed_args(recipe, device, deepspeed, world().distributed, backend_for(device)),
    )
    if tr.gradient_checkpointing:
        model.enable_input_require_grads()
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
    trainer = Trainer(model=model, args=args, train_dataset=examples.train,
                      eval_dataset=examples.validation or None, data_collator=collator,
                      callbacks=[_log_callback(folder / LOG_NAME)])
    if not progress:
        trainer.remove_callback(PrinterCallback)
    return trainer


def distributed_args(recipe: QloraRecipe, device: str, deepspeed: str | None, distributed: bool,
                     backend: str) -> dict[str, Any]:
    """TrainingArguments for a multi-process run: the backend, FSDP options or a DeepSpeed config."""
    if not distributed:
        return {"deepspeed": deepspeed} if deepspeed else {}
    # every trainable weight takes part in each forward: no extra autograd traversal to look for unused ones
    args: dict[str, Any] = {"ddp_backend": backend, "ddp_find_unused_parameters": False}
    if deepspeed:
        args["deepspeed"] = deepspeed
    elif recipe.train.distributed == "fsdp":
        args["fsdp"] = recipe.train.fsdp
    return args


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curve(log: Path, png: Path) -> Path | None:
    history = read_log(log)
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def _weights_hash(name: str) -> str | None:
    """sha256 over the base's safetensors files (None for a model that is not a local folder)."""
    import hashlib

    folder = Path(name)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
