"""YAML recipes: a run described in a file that can be versioned, diffed, listed and copied.

A quantize recipe holds the same fields as `qtool quantize`'s flags; flags given on the
command line override the recipe. Every section is a typed schema (qtool.schema): unknown keys
and values of the wrong type are one-line errors that name the key.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from qtool.errors import SpecError
from qtool.request import OptionValue, QuantizeFields, QuantizeRequest
from qtool.resources import bundled_dir
from qtool.schema import RecipeError, parse_section

__all__ = ["OptionValue", "RecipeError", "QuantizeRecipe", "load_quantize_recipe", "quantize_arguments"]


class QuantizeRecipe(QuantizeFields):
    """A `quantize:` section (or a flat quantize recipe): the flags of `qtool quantize`."""

    method: str = Field(min_length=1)
    model: str | None = None
    description: str = ""


def list_recipes() -> list[tuple[str, str]]:
    """(name, description) of every bundled recipe."""
    rows = []
    for path in sorted(bundled_dir("recipes").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        rows.append((path.stem, str(data.get("description", ""))))
    return rows


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    bundled = bundled_dir("recipes") / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if bundled.is_file():
        return bundled
    raise RecipeError(f"recipe {name_or_path} is neither a file nor a bundled recipe (see `qtool recipes list`)")


def copy_recipe(name: str, dest: str) -> Path:
    """Copy the bundled recipe (or recipe file) `name` to `dest`: a file path, or an existing folder
    (the recipe keeps its file name there). Raises RecipeError for a missing folder (`dest` ending
    in a separator, or a file path whose folder does not exist) or an existing target."""
    source = find_recipe(name)
    target = Path(dest).expanduser()
    names_folder = dest.endswith(("/", os.sep))
    if target.is_dir():
        target = target / source.name
    elif names_folder or not target.parent.is_dir():
        folder = target if names_folder else target.parent
        raise RecipeError(f"folder {folder} does not exist (create it first, or name a file in an existing folder)")
    if target.exists() or target.is_symlink():
        raise RecipeError(f"{target} already exists" + (" (a symbolic link)" if target.is_symlink() else ""))
    shutil.copyfile(source, target)
    return target


def read_recipe_section(name_or_path: str, section: str) -> tuple[Path, dict[str, Any], str]:
    """(path, the `section` mapping, the file's description) of a recipe file or bundled name.

    Quantize recipes may also be flat (their keys at the top level).
    """
    path = find_recipe(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError(f"recipe {path} is not readable YAML: {str(exc).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path} is not UTF-8 text (a binary file?)") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of keys to values")
    body = data.get(section, data if section == "quantize" else None)
    if not isinstance(body, dict):
        raise RecipeError(f"recipe {path} has no '{section}' mapping (see `qtool recipes list`)")
    return path, dict(body), str(data.get("description", ""))


def load_quantize_recipe(name_or_path: str) -> QuantizeRecipe:
    path, data, _ = read_recipe_section(name_or_path, "quantize")
    return parse_section(QuantizeRecipe, data, f"recipe {path}")


QUANTIZE_FLAGS = {"group_size": "--group-size", "options": "--opt", "nsamples": "--nsamples", "seqlen": "--seqlen",
                  "calib": "--calib", "bits": "--bits", "method": "--method", "seed": "--seed", "device": "--device",
                  "bos": "--bos", "target_bits": "--target-bits", "target_size": "--target-size",
                  "sensitivity": "--sensitivity", "perturbation": "--perturbation",
                  "mixed_bits": "--mixed-bits"}


def quantize_arguments(recipe: QuantizeRecipe | None, paths: list[str], **flags: Any) -> tuple[str, str, QuantizeRequest]:
    """(MODEL, OUT, the checked request) from a recipe and the command line's flags (`flags`:
    QuantizeRequest's keys; None = not given). Flags win over the recipe; options merge, flags last.

    Raises RecipeError for missing MODEL/OUT/method, SpecError for what the backend refuses.
    """
    r = recipe.model_dump(exclude={"model", "description"}) if recipe else {}
    if not 1 <= len(paths) <= 2:
        raise RecipeError(f"quantize takes MODEL OUT, got {len(paths)} paths")
    model, out = paths if len(paths) == 2 else (recipe.model if recipe else None, paths[0])
    if not model:
        raise RecipeError("no MODEL given: pass MODEL OUT, or a --recipe with a 'model'")
    if not (flags.get("method") or r.get("method")):
        raise RecipeError("no method given: pass --method (see `qtool methods`) or a --recipe")
    merged = {k: v for k, v in r.items() if v is not None} | {k: v for k, v in flags.items() if v is not None}
    merged["options"] = (r.get("options") or {}) | (flags.get("options") or {})
    return model, out, parse_section(QuantizeRequest, merged, "", names=QUANTIZE_FLAGS, error=SpecError)


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)
