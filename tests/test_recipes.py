import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtool import backends
from qtool.errors import QtoolError
from qtool.recipes import copy_recipe, list_recipes, load_quantize_recipe
from tests.conftest import assert_one_line_error, qtool_in_process, run_qtool


def test_bundled_recipes_are_listed_and_valid():
    names = [name for name, _ in list_recipes()]
    assert {"quantize-smollm2-hqq4", "quantize-smollm2-bnb-nf4", "quantize-smollm2-rtn4"} <= set(names)
    for name in names:
        if name.startswith("quantize-"):
            recipe = load_quantize_recipe(name)
            assert recipe.model == "smollm2-135m"
            # The options, bits and group size are ones the backend accepts (SpecError otherwise).
            backends.get(recipe.method).make_spec(recipe.bits, recipe.group_size, recipe.options, recipe.seed or 0)


def test_copy_then_edit(tmp_path):
    target = copy_recipe("quantize-smollm2-hqq4", str(tmp_path))
    assert load_quantize_recipe(str(target)).bits == 4
    with pytest.raises(QtoolError, match="already exists"):
        copy_recipe("quantize-smollm2-hqq4", str(tmp_path))
    # a folder that does not exist is refused, never written as a file of that name
    for dest in (f"{tmp_path / 'missing'}/", str(tmp_path / "missing" / "r.yaml")):
        with pytest.raises(QtoolError, match="does not exist"):
            copy_recipe("quantize-smollm2-hqq4", dest)
    assert not (tmp_path / "missing").exists()


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("quantize:\n  method: hqq\n  bitz: 4\n")
    proc = run_qtool("quantize", "--recipe", path, tmp_path / "o")
    assert_one_line_error(proc, "unknown key 'bitz'")


def test_recipe_with_flag_override(tiny_llama, tmp_path):
    out = tmp_path / "o"
    proc = run_qtool("quantize", "--recipe", "quantize-smollm2-rtn4", "--bits", "3", "--json", tiny_llama, out)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert (record["method"], record["spec"]["bits"], record["spec"]["group_size"]) == ("rtn", 3, 64)
    assert record == json.loads((out / "qtool.json").read_text())


# ---- typed recipe values (issue 17, kind 4) -------------------------------------------------------
def write_yaml(path, data):
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_unambiguous_strings_are_coerced(tiny_llama, tmp_path):
    recipe = write_yaml(tmp_path / "q.yaml", {"quantize": {"method": "rtn", "bits": "4", "group_size": "32"}})
    proc = qtool_in_process("quantize", "--recipe", recipe, "--json", "--quiet", tiny_llama, tmp_path / "o")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["spec"]["group_size"] == 32

    from qtool.finetune.recipe import load_qlora_recipe

    path = tmp_path / "lora.yaml"
    # YAML 1.1 reads 2e-4 (no dot) as the string "2e-4": every trainer's users meet this
    path.write_text("qlora:\n  model: m\n  dataset: {path: d.jsonl}\n  train: {learning_rate: 2e-4, epochs: '1'}\n")
    recipe = load_qlora_recipe(str(path))
    assert recipe.train.learning_rate == pytest.approx(2e-4) and recipe.train.epochs == 1.0


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"lora": {"dropout": "high"}}, "lora.dropout: Input should be a valid number"),
        ({"lora": {"dropout": 1.5}}, "lora.dropout: Input should be less than 1"),
        ({"lora": {"r": 0}}, "lora.r: Input should be greater than 0"),
        ({"lora": {"target_modules": []}}, "target_modules is 'all-linear' or a non-empty list"),
        ({"train": {"learning_rate": "fast"}}, "train.learning_rate: Input should be a valid number"),
        ({"train": {"batch_size": 2.5}}, "train.batch_size: Input should be a valid integer"),
        ({"train": {"scheduler": "zigzag"}}, "train.scheduler: Input should be 'linear', 'cosine'"),
        ({"dataset": {"path": "d.jsonl", "format": "csv"}}, "dataset.format: Input should be 'alpaca', 'sharegpt' or 'text'"),
        ({"dataset": {"path": "d.jsonl", "cutoff_len": -1}}, "dataset.cutoff_len"),
        ({"dataset": "d.jsonl"}, "dataset: Input should be a valid dictionary"),
        ({"device": "tpu"}, "device: Input should be 'auto', 'cpu' or 'cuda'"),
        ({"lora": {"rank": 8}}, "unknown key 'lora.rank'; allowed here: r, alpha, dropout, target_modules"),
        ({"quantization": {"method": "hqq"}, "quantized": "out/x"}, "not both"),
    ],
)
def test_qlora_values_of_the_wrong_type_name_the_key(section, needle, tmp_path):
    base = {"model": "m", "dataset": {"path": "d.jsonl"}}
    path = write_yaml(tmp_path / "lora.yaml", {"qlora": {**base, **section}})
    assert_one_line_error(qtool_in_process("qlora", path), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.yaml"]  # nothing created


# Values of every YAML type, and strings that look like numbers or booleans.
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(-1, 1e3, allow_nan=False, allow_subnormal=False),
                   st.sampled_from(["", "4", "64", "-1", "2e-4", "true", "no", "hqq", "rtn", "all-linear", "x" * 300]),
                   st.lists(st.integers(-2, 8), max_size=3), st.dictionaries(st.sampled_from(["a", "bits"]), st.integers(), max_size=2))
QUANTIZE_KEYS = ["method", "bits", "group_size", "options", "seed", "device", "calib", "nsamples", "seqlen", "colour"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(QUANTIZE_KEYS), VALUES, min_size=1, max_size=3))
def test_mutated_quantize_recipes_succeed_or_fail_in_one_line(changes, tiny_llama, tmp_path_factory):
    """Any mutation of a working recipe: success, or one line and a non-zero exit; never an internal
    error or a traceback, and nothing left beside OUT."""
    work = tmp_path_factory.mktemp("mutant")
    recipe = write_yaml(work / "r.yaml", {"quantize": {"method": "rtn", "bits": 4, "group_size": 32, **changes}})
    proc = qtool_in_process("quantize", "--recipe", recipe, "--quiet", "--device", "cpu", tiny_llama, work / "o")
    left = sorted(p.name for p in work.iterdir())
    if proc.returncode == 0:
        assert left == ["o", "r.yaml"] and (work / "o" / "qtool.json").is_file()
    else:
        assert proc.returncode in (1, 2), proc.stderr  # 70 would be an internal error
        assert_one_line_error(proc)
        assert left == ["r.yaml"], left


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=st.sampled_from(["lora", "train", "dataset", None]),
       changes=st.dictionaries(st.sampled_from(["r", "alpha", "dropout", "target_modules", "learning_rate", "epochs",
                                                "batch_size", "scheduler", "warmup_ratio", "path", "format",
                                                "cutoff_len", "val_size", "max_steps", "device", "model"]),
                               VALUES, min_size=1, max_size=3))
def test_mutated_qlora_and_compare_recipes_parse_or_name_the_key(section, changes, tmp_path_factory):
    from qtool.compare import load_compare_recipe
    from qtool.finetune.recipe import load_qlora_recipe
    from qtool.schema import RecipeError

    work = tmp_path_factory.mktemp("mutant")
    body = {"model": "m", "dataset": {"path": "d.jsonl"}}
    if section:
        body[section] = {**body.get(section, {}), **changes}
    else:
        body.update(changes)
    try:
        load_qlora_recipe(str(write_yaml(work / "q.yaml", {"qlora": body})))
    except RecipeError as exc:
        assert "\n" not in str(exc)
    compare = {"model": "m", "cells": [{"method": "rtn", "bits": 4}], "eval": dict(changes)}
    try:
        load_compare_recipe(str(write_yaml(work / "c.yaml", {"compare": compare})))
    except RecipeError as exc:
        assert "\n" not in str(exc)
