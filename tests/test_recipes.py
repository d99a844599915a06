import json

import pytest

from qtool import backends
from qtool.errors import QtoolError
from qtool.recipes import copy_recipe, list_recipes, load_quantize_recipe
from tests.conftest import assert_one_line_error, run_qtool


def test_bundled_recipes_are_listed_and_valid():
    names = [name for name, _ in list_recipes()]
    assert {"quantize-smollm2-hqq4", "quantize-smollm2-bnb-nf4", "quantize-smollm2-rtn4"} <= set(names)
    for name in names:
        if name.startswith("quantize-"):
            recipe = load_quantize_recipe(name)
            assert recipe.model == "smollm2-135m"
            # The options, bits and group size are ones the backend accepts (SpecError otherwise).
            backends.get(recipe.method).make_spec(recipe.bits, recipe.group_size, recipe.options, recipe.seed)


def test_copy_then_edit(tmp_path):
    target = copy_recipe("quantize-smollm2-hqq4", str(tmp_path))
    assert load_quantize_recipe(str(target)).bits == 4
    with pytest.raises(QtoolError, match="already exists"):
        copy_recipe("quantize-smollm2-hqq4", str(tmp_path))


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
