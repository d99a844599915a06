"""YAML recipes: a run described in a file that can be versioned, diffed, listed and copied.

A quantize recipe holds the same fields as `qtool quantize`'s flags; flags given on the
command line override the recipe. Every section is a typed schema (qtool.schema): unknown keys
and values of the wrong type are one-line errors that name the key.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PositiveInt

from qtool.calibration import CalibrationFields
from qtool.resources import bundled_dir
from qtool.schema import RecipeError, Seed, parse_section

__all__ = ["RecipeError", "QuantizeRecipe", "load_quantize_recipe", "quantize_arguments"]

OptionValue = bool | int | float | str


class QuantizeRecipe(CalibrationFields):
    """A `quantize:` section (or a flat quantize recipe): the flags of `qtool quantize`."""

    method: str = Field(min_length=1)
    model: str | None = None
    bits: PositiveInt | None = None
    group_size: int | None = Field(None, ge=-1)
    options: dict[str, OptionValue] | None = None
    device: Literal["auto", "cpu", "cuda"] | None = None
    seed: Seed | None = None
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
    source = find_recipe(name)
    target = Path(dest)
    if target.is_dir():
        target = target / source.name
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


def quantize_arguments(
    recipe: QuantizeRecipe | None,
    paths: list[str],
    *,
    method: str | None = None,
    bits: int | None = None,
    group_size: int | None = None,
    options: dict[str, str] | None = None,
    device: str | None = None,
    seed: int | None = None,
    calib: str | None = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
    bos: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments for qtool.quantize: explicit values win over the recipe's."""
    r = recipe.model_dump() if recipe else {}
    if not 1 <= len(paths) <= 2:
        raise RecipeError(f"quantize takes MODEL OUT, got {len(paths)} paths")
    model, out = paths if len(paths) == 2 else (r.get("model"), paths[0])
    if not model:
        raise RecipeError("no MODEL given: pass MODEL OUT, or a --recipe with a 'model'")
    if not (method or r.get("method")):
        raise RecipeError("no method given: pass --method (see `qtool methods`) or a --recipe")
    return {
        "model": model,
        "out": out,
        "method": method or r["method"],
        "bits": _first(bits, r.get("bits")),
        "group_size": _first(group_size, r.get("group_size")),
        # YAML gives typed values; backends parse option strings, as from the command line
        "options": {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in (r.get("options") or {}).items()}
        | (options or {}),
        "device": _first(device, r.get("device"), "auto"),
        "seed": _first(seed, r.get("seed"), 0),
        "calib": _first(calib, r.get("calib")),
        "nsamples": _first(nsamples, r.get("nsamples")),
        "seqlen": _first(seqlen, r.get("seqlen")),
        "bos": _first(bos, r.get("bos")),
    }


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)
