import pkgutil

import pytest

from qtool import backends
from qtool.backends.base import parse_options
from qtool.backends.bnb import BnbOptions
from qtool.errors import SpecError, UnknownMethodError
from qtool.models import quantizable_linears
from tests.conftest import assert_one_line_error, env_without, run_qtool

BUILT_IN = {"gptq", "awq", "aqlm", "bnb", "hqq", "eetq", "rtn", "autoround"}


def test_every_backend_module_registers_one_method_listed_with_a_status():
    """The method list comes from the registry: one method per public module of qtool/backends."""
    modules = sorted(m.name for m in pkgutil.iter_modules(backends.__path__) if m.name != "base" and not m.name.startswith("_"))
    names = backends.known_methods()
    assert sorted(type(backends.get(name)).__module__.rsplit(".", 1)[-1] for name in names) == modules
    assert BUILT_IN <= set(names)
    rows = {r.name: r for r in backends.available("cpu")}
    assert sorted(rows) == names
    for row in rows.values():
        assert row.ready, (row.name, row.reason)


def test_unknown_method_names_the_known_ones():
    with pytest.raises(UnknownMethodError, match=f"known methods: {', '.join(backends.known_methods())}$"):
        backends.get("gguf")


@pytest.mark.parametrize(("method", "bits"), [("hqq", 5), ("bnb", 3), ("rtn", 1), ("bnb", 16), ("eetq", 4)])
def test_bits_outside_the_backend_are_refused(method, bits):
    with pytest.raises(SpecError, match=f"cannot quantize to {bits} bits"):
        backends.get(method).make_spec(bits=bits)


def test_group_size_must_divide_every_layer_width(smollm2):
    linears = quantizable_linears(smollm2.config())
    backend = backends.get("hqq")
    with pytest.raises(SpecError, match="does not divide the layer width 576"):
        backend.check_layers(backend.make_spec(bits=4, group_size=128), linears)
    for ok in (64, 32, 192, -1):
        backend.check_layers(backend.make_spec(bits=4, group_size=ok), linears)


@pytest.mark.parametrize(("method", "refused", "taken"), [("gptq", (48, 2048), (16, 64, 1024, -1)),
                                                         ("awq", (48, 256), (32, 128, -1))])
def test_gptqmodel_group_sizes_are_its_layers(method, refused, taken):
    """Refused before any work (gptq --group-size 48 was an internal error after calibration): the
    list is GPTQModel's own (SUPPORTS_GROUP_SIZE of its torch layer)."""
    pytest.importorskip("gptqmodel", reason="gptq/awq need GPTQModel: scripts/setup-venv.sh installs it")
    backend = backends.get(method)
    for group_size in refused:
        with pytest.raises(SpecError, match=f"{method} layers take group sizes -1, 16, 32, .*; got {group_size}"):
            backend.make_spec(bits=4, group_size=group_size)
    for group_size in taken:
        assert backend.make_spec(bits=4, group_size=group_size).group_size == group_size


def test_bnb_block_sizes_are_fixed():
    bnb = backends.get("bnb")
    assert bnb.make_spec(bits=4).group_size == 64
    assert bnb.make_spec(bits=8).group_size == -1
    with pytest.raises(SpecError, match="fixed blocks of 64"):
        bnb.make_spec(bits=4, group_size=-1)
    with pytest.raises(SpecError, match="fixed blocks of 64; --group-size 128"):
        bnb.make_spec(bits=4, group_size=128)
    with pytest.raises(SpecError, match="8-bit .* use --group-size -1, not 64"):
        bnb.make_spec(bits=8, group_size=64)


def test_options_are_typed_and_checked():
    opts = parse_options(BnbOptions, {"quant_type": "fp4", "double_quant": "false", "int8_threshold": "4.5"}, "bnb")
    assert (opts.quant_type, opts.double_quant, opts.int8_threshold) == ("fp4", False, 4.5)
    with pytest.raises(SpecError, match="has no option 'blocksize'"):
        parse_options(BnbOptions, {"blocksize": "32"}, "bnb")
    with pytest.raises(SpecError, match="one of nf4, fp4"):
        parse_options(BnbOptions, {"quant_type": "int4"}, "bnb")
    with pytest.raises(SpecError, match="true or false"):
        parse_options(BnbOptions, {"double_quant": "maybe"}, "bnb")
    with pytest.raises(SpecError, match="takes a float"):
        parse_options(BnbOptions, {"int8_threshold": "high"}, "bnb")


def test_effective_bits_count_the_scales():
    assert backends.get("hqq").effective_bits(backends.get("hqq").make_spec(bits=4, group_size=64)) == 4.5
    bnb = backends.get("bnb")
    assert 4.12 < bnb.effective_bits(bnb.make_spec(bits=4)) < 4.13  # double quant
    assert bnb.effective_bits(bnb.make_spec(bits=4, options={"double_quant": "false"})) == 4.5


@pytest.fixture()
def without_bitsandbytes(tmp_path):
    """A PYTHONPATH entry that shadows bitsandbytes with a module that fails to import,
    exactly what a user without the package (or with a broken one) meets."""
    return env_without("bitsandbytes", tmp_path)


def test_missing_package_is_reported_with_the_fix(without_bitsandbytes, tmp_path):
    proc = run_qtool("methods", env=without_bitsandbytes)
    assert proc.returncode == 0
    line = next(line for line in proc.stdout.splitlines() if line.startswith("bnb"))
    assert "not ready" in line and "pip install 'qtool[bnb]'" in line
    out = tmp_path / "out"
    proc = run_qtool("quantize", "--method", "bnb", "smollm2-135m", out, env=without_bitsandbytes)
    assert_one_line_error(proc, "bitsandbytes", "qtool[bnb]")
    assert not out.exists()


def test_methods_json_is_machine_readable():
    import json

    proc = run_qtool("methods", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {row["method"]: row for row in json.loads(proc.stdout)}
    assert rows["hqq"]["ready"] and rows["hqq"]["capabilities"]["bits"] == [1, 2, 3, 4, 8]
    assert [o["name"] for o in rows["bnb"]["options"]] == ["quant_type", "double_quant", "int8_threshold"]
