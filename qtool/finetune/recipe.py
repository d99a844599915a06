"""QLoRA recipes: one YAML file describes the base, its quantization, the data, LoRA and training.

Every section is a typed schema (qtool.schema, pydantic): unknown keys, values of the wrong
type and values out of range are one-line errors that name the key; unambiguous strings are
coerced (`learning_rate: 2e-4`, which YAML 1.1 reads as a string, is 0.0002). Relative dataset
paths are resolved against the recipe's folder, then the working directory, then qtool's bundled
recipes folder, so a bundled recipe finds the data shipped beside it even after `qtool recipes
copy` put the YAML elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

from qtool.recipes import read_recipe_section
from qtool.request import QuantizeFields
from qtool.schema import RecipeError, Section, Seed, parse_section

__all__ = ["RecipeError", "QloraRecipe", "load_qlora_recipe", "resolve_data_path"]

class QuantizationSection(QuantizeFields):
    """qlora's `quantization:` section: a quantize request without model or OUT (seed defaults to
    train.seed, device to the run's)."""

    method: str = Field(min_length=1)


class DatasetSection(Section):
    path: str = Field(min_length=1)  # a file; for format 'text' also a text source name: builtin, wikitext2, c4, pile
    format: Literal["alpaca", "sharegpt", "text"] = "alpaca"
    template: Literal["chat", "alpaca", "none"] | None = None  # default: chat for alpaca/sharegpt, none for text
    system: str | None = None  # system message for the chat template
    cutoff_len: PositiveInt = 512
    max_samples: PositiveInt | None = None
    val_size: NonNegativeFloat = 0.0  # a fraction (< 1) or a number of examples (>= 1)
    train_on_prompt: bool = False


class LoraSection(Section):
    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"

    @model_validator(mode="after")
    def _some_targets(self) -> LoraSection:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules is 'all-linear' or a non-empty list of module names")
        return self


class TrainSection(Section):
    learning_rate: PositiveFloat = 2e-4
    epochs: PositiveFloat = 3.0
    max_steps: PositiveInt | None = None  # overrides epochs
    batch_size: PositiveInt = 4
    grad_accum: PositiveInt = 1
    gradient_checkpointing: bool = False
    max_grad_norm: PositiveFloat = 1.0
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    seed: Seed = 0
    logging_steps: PositiveInt = 1
    save_steps: PositiveInt = 20
    eval_steps: PositiveInt | None = None  # default: save_steps, when there is a validation split
    save_total_limit: PositiveInt = 2
    # Multi-process runs (torchrun / accelerate launch / `qtool qlora --nproc N`): DDP by default.
    distributed: Literal["ddp", "fsdp"] = "ddp"  # fsdp needs GPUs: accelerate 1.15 enables it only there
    fsdp: str = "full_shard auto_wrap"  # the Trainer's `fsdp` options, for distributed: fsdp
    deepspeed: str | None = None  # a DeepSpeed ZeRO stage 2/3 JSON config (relative: beside the recipe)


class QloraRecipe(Section):
    path: Path
    model: str = Field(min_length=1)
    dataset: DatasetSection
    quantization: QuantizationSection | None = None
    quantized: str | None = None  # an existing qtool output folder to train on
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainSection = Field(default_factory=TrainSection)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out: str | None = None
    description: str = ""
    # LLaMA-Factory's names: lora (adapters on a quantized or full base), freeze (train only the last
    # N decoder layers) or full (every weight); freeze and full need a full-precision base.
    finetuning_type: Literal["lora", "freeze", "full"] = "lora"
    freeze_trainable_layers: PositiveInt | None = None  # freeze only; default 2, as LLaMA-Factory

    @model_validator(mode="after")
    def _one_base(self) -> QloraRecipe:
        if self.quantization and self.quantized:
            raise ValueError("give either 'quantization' (quantize first) or 'quantized' (an existing folder), not both")
        if self.finetuning_type != "lora" and (self.quantization or self.quantized):
            key = "quantization" if self.quantization else "quantized"
            raise ValueError(f"finetuning_type {self.finetuning_type} trains the base's own weights, which a quantized "
                             f"base cannot: drop {key!r} (train on the full-precision model) or use finetuning_type: lora")
        if self.freeze_trainable_layers is not None and self.finetuning_type != "freeze":
            raise ValueError("freeze_trainable_layers is for finetuning_type: freeze")
        if self.train.deepspeed and self.train.distributed == "fsdp":
            raise ValueError("train.deepspeed and train.distributed: fsdp exclude each other: pick one")
        return self

    @property
    def trainable_layers(self) -> int:
        """How many of the last decoder layers a freeze run trains (LLaMA-Factory's default: 2)."""
        return self.freeze_trainable_layers or 2

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def load_qlora_recipe(name_or_path: str) -> QloraRecipe:
    path, body, description = read_recipe_section(name_or_path, "qlora")
    if "path" in body or "description" in body:
        key = "path" if "path" in body else "description"
        raise RecipeError(f"recipe {path.name}: {key!r} is not a key of the qlora section")
    return parse_section(QloraRecipe, {**body, "path": path.resolve(), "description": description}, f"recipe {path.name}")


def resolve_data_path(recipe: QloraRecipe) -> Path | str:
    """The dataset file, or for plain text a source name that qtool.data knows (builtin, wikitext2, ...)."""
    from qtool.data import NAMED_DATASETS
    from qtool.errors import DatasetError
    from qtool.resources import bundled_dir

    name = recipe.dataset.path
    if recipe.dataset.format == "text" and name in ("builtin", *NAMED_DATASETS):
        return name
    raw = Path(name).expanduser()
    places = [raw] if raw.is_absolute() else [recipe.path.parent / raw, Path.cwd() / raw, bundled_dir("recipes") / raw]
    for candidate in places:
        if candidate.is_file():
            return candidate
        if candidate.is_dir():
            raise DatasetError(f"dataset {candidate} is a folder; dataset.path names one .json, .jsonl or .txt file")
    raise DatasetError(f"dataset {name} not found (looked beside the recipe {recipe.path.parent}, in the current folder "
                       "and in qtool's bundled recipes)")
