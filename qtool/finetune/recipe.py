"""QLoRA recipes: one YAML file describes the base, its quantization, the data, LoRA and training.

Every section is a dataclass; unknown keys are errors that name the key and list the allowed
ones. Relative dataset paths are resolved against the recipe's folder, then the working
directory, then qtool's bundled recipes folder, so a bundled recipe finds the data shipped beside
it even after `qtool recipes copy` put the YAML elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from qtool.recipes import RecipeError, check_keys, read_recipe_section

FORMATS = ("alpaca", "sharegpt", "text")
TEMPLATES = ("chat", "alpaca", "none")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")


@dataclass
class QuantizationSection:
    method: str
    bits: int | None = None
    group_size: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    calib: str | None = None  # calibration text for gptq/awq (default: qtool's built-in text)
    nsamples: int | None = None
    seqlen: int | None = None


@dataclass
class DatasetSection:
    path: str  # a file; for format 'text' also a text source name: builtin, wikitext2, c4, pile
    format: str = "alpaca"
    template: str | None = None  # default: chat for alpaca/sharegpt, none for text
    system: str | None = None  # system message for the chat template
    cutoff_len: int = 512
    max_samples: int | None = None
    val_size: float = 0.0  # a fraction (< 1) or a number of examples (>= 1)
    train_on_prompt: bool = False


@dataclass
class LoraSection:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"


@dataclass
class TrainSection:
    learning_rate: float = 2e-4
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 4
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0
    scheduler: str = "cosine"
    warmup_ratio: float = 0.0
    seed: int = 0
    logging_steps: int = 1
    save_steps: int = 20
    eval_steps: int | None = None  # default: save_steps, when there is a validation split
    save_total_limit: int = 2


@dataclass
class QloraRecipe:
    path: Path
    model: str
    dataset: DatasetSection
    quantization: QuantizationSection | None = None
    quantized: str | None = None  # an existing qtool output folder to train on
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    device: str = "auto"
    out: str | None = None
    description: str = ""

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        data = asdict(self)
        data["path"] = str(self.path)
        return data


def _section(cls: type, data: Any, where: str, required: tuple[str, ...] = ()) -> Any:
    check_keys(data, [f.name for f in fields(cls)], where, required)
    return cls(**data)


def load_qlora_recipe(name_or_path: str) -> QloraRecipe:
    path, body, description = read_recipe_section(name_or_path, "qlora")
    where = f"recipe {path.name}"
    check_keys(body, [f.name for f in fields(QloraRecipe) if f.name not in ("path", "description")], where,
               required=("model", "dataset"))
    if body.get("quantization") and body.get("quantized"):
        raise RecipeError(f"{where}: give either 'quantization' (quantize first) or 'quantized' (an existing folder), not both")
    recipe = QloraRecipe(
        path=path.resolve(),
        model=str(body["model"]),
        dataset=_section(DatasetSection, body["dataset"], f"{where}, dataset", ("path",)),
        quantization=_section(QuantizationSection, body["quantization"], f"{where}, quantization", ("method",))
        if body.get("quantization") else None,
        quantized=body.get("quantized"),
        lora=_section(LoraSection, body.get("lora") or {}, f"{where}, lora"),
        train=_section(TrainSection, body.get("train") or {}, f"{where}, train"),
        device=str(body.get("device", "auto")),
        out=body.get("out"),
        description=description,
    )
    _check_values(recipe, where)
    return recipe


def _check_values(recipe: QloraRecipe, where: str) -> None:
    ds, tr, lora = recipe.dataset, recipe.train, recipe.lora
    if ds.format not in FORMATS:
        raise RecipeError(f"{where}, dataset: format {ds.format!r} is not one of {', '.join(FORMATS)}")
    if ds.template is not None and ds.template not in TEMPLATES:
        raise RecipeError(f"{where}, dataset: template {ds.template!r} is not one of {', '.join(TEMPLATES)}")
    if tr.scheduler not in SCHEDULERS:
        raise RecipeError(f"{where}, train: scheduler {tr.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    positive = {"dataset.cutoff_len": ds.cutoff_len, "lora.r": lora.r, "train.batch_size": tr.batch_size,
                "train.grad_accum": tr.grad_accum, "train.save_steps": tr.save_steps}
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise RecipeError(f"{where}: {name} must be a positive integer, got {value!r}")
    if not (isinstance(lora.target_modules, str) or (isinstance(lora.target_modules, list) and lora.target_modules)):
        raise RecipeError(f"{where}, lora: target_modules is 'all-linear' or a list of module names")
    if ds.val_size < 0:
        raise RecipeError(f"{where}, dataset: val_size must be >= 0")


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
    raise DatasetError(f"dataset {name} not found (looked beside the recipe {recipe.path.parent}, in the current folder "
                       "and in qtool's bundled recipes)")
