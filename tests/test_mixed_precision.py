"""Mixed precision from a budget (qtool.mixed): allocation, budgets, per-layer bits in real checkpoints."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
import torch

import qtool
from qtool.errors import SpecError
from qtool.mixed.allocate import allocate
from qtool.mixed.target import parse_size
from tests.conftest import assert_one_line_error, qtool_in_process, run_qtool

CALIB = {"calib": "builtin", "nsamples": 4, "seqlen": 64}
# gptq/awq plans measure costs with the method's own error by default, one uniform run per width:
# tests about what a plan writes take the cheap measure (test_method_perturbation_... tests the default)
CHEAP_COSTS = {"sensitivity": "fisher", "perturbation": "rtn"}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test measures its own costs (the sensitivity cache lives in QTOOL_CACHE)."""
    monkeypatch.setenv("QTOOL_CACHE", str(tmp_path / "cache"))


def brute_force(cost: np.ndarray, size: np.ndarray, budget: float) -> float:
    best = np.inf
    for choice in itertools.product(range(cost.shape[1]), repeat=cost.shape[0]):
        rows = np.arange(cost.shape[0])
        if size[rows, choice].sum() <= budget + 1e-9:
            best = min(best, cost[rows, choice].sum())
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_the_optimum_of_every_plan(seed):
    rng = np.random.default_rng(seed)
    groups, candidates = 6, 4
    size = np.sort(rng.uniform(1, 10, (groups, candidates)), axis=1)
    cost = np.sort(rng.uniform(0, 1, (groups, candidates)), axis=1)[:, ::-1]  # more bits, less cost
    budget = rng.uniform(size.min(1).sum(), size.max(1).sum())
    choice = allocate(cost, size, budget)
    rows = np.arange(groups)
    assert size[rows, choice].sum() <= budget + 1e-9
    assert cost[rows, choice].sum() == pytest.approx(brute_force(cost, size, budget), rel=1e-6)


def test_allocation_refuses_a_budget_below_the_smallest_plan():
    with pytest.raises(SpecError, match="below the smallest plan"):
        allocate(np.ones((2, 2)), np.array([[1.0, 2.0], [1.0, 2.0]]), 1.5)


@pytest.mark.parametrize("text, expected", [("120MiB", 120 * 2**20), ("0.5GB", 500_000_000), ("1024", 1024),
                                            ("64 kib", 65536), (2048, 2048)])
def test_sizes_parse(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["12 parsecs", "MiB", "-5MiB", ""])
def test_bad_sizes_are_refused(text):
    with pytest.raises(SpecError, match="--target-size takes a size"):
        parse_size(text)


def test_gptq_plans_take_5_and_6_bits_only_when_asked():
    from qtool import backends
    from qtool.mixed.target import MixedTarget

    gptq = backends.get("gptq")
    assert gptq.mixed_widths(MixedTarget(bits=4.5)) == (2, 3, 4, 8)
    assert gptq.mixed_widths(MixedTarget(bits=4.5, candidates=(6, 3, 5))) == (3, 5, 6)
    with pytest.raises(SpecError, match="gptq gives a layer one of 2,3,4,5,6,8 bits"):
        gptq.mixed_widths(MixedTarget(bits=4.5, candidates=(4, 7)))
    with pytest.raises(SpecError, match="awq gives a layer one of 2,3,4,8 bits"):
        backends.get("awq").check_mixed(MixedTarget(bits=4.5, candidates=(4, 5)), None)


def test_fused_projections_share_a_width(tiny_llama):
    from qtool.api import model_config
    from qtool.mixed.units import decision_units
    from qtool.models import quantizable_linears

    units = decision_units(quantizable_linears(model_config(tiny_llama)))
    names = [u.name for u in units]
    assert names[:4] == ["model.layers.0.self_attn.q_proj+k_proj+v_proj", "model.layers.0.self_attn.o_proj",
                         "model.layers.0.mlp.gate_proj+up_proj", "model.layers.0.mlp.down_proj"]
    assert len(units) == 8 and units[0].modules[1] == "model.layers.0.self_attn.k_proj"


@pytest.mark.parametrize("target", [3.6, 4.4, 9.0, 12.0])  # rtn g32: 2 bits is 3.0 per weight, 8 bits 9.0
def test_rtn_plan_meets_the_budget_and_reloads_in_plain_transformers(target, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "rtn"
    record = qtool.quantize(str(tiny_llama), out, "rtn", group_size=32, device="cpu", target_bits=target, **CALIB)
    mixed = record["mixed_precision"]
    assert mixed["average_bits"] <= target and record["effective_bits_per_weight"] == pytest.approx(
        mixed["average_bits"], abs=1e-4)
    assert mixed["average_bits"] > min(target, 9.0) - 1.2  # the solver spends the budget (next width up is ~1 bit)
    bits = {m: g["bits"] for g in mixed["groups"] for m in g["modules"]}
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, width in bits.items():
        groups = model.get_submodule(name).weight.reshape(-1, 32)
        assert max(g.unique().numel() for g in groups) <= 2**width, name
    assert len(set(bits.values())) > 1 or (target >= 9.0 and set(bits.values()) == {8})


@pytest.mark.parametrize("method, layer_class", [("gptq", "TorchLinear"), ("awq", "AwqTorchLinear")])
def test_gptqmodel_plan_writes_per_module_bits_and_its_predicted_size(method, layer_class, tiny_llama, tmp_path):
    out = tmp_path / method
    record = qtool.quantize(str(tiny_llama), out, method, group_size=32, device="cpu", target_bits=3.6, **CALIB,
                            **CHEAP_COSTS)
    mixed = record["mixed_precision"]
    assert abs(mixed["size_error"]) < 0.01
    assert record["reload_check"]["kernel_classes"] == [layer_class]
    dynamic = json.loads((out / "config.json").read_text())["quantization_config"]["dynamic"]
    planned = {m: g["bits"] for g in mixed["groups"] for m in g["modules"]}
    assert all(rule["bits"] != record["spec"]["bits"] for rule in dynamic.values())
    loaded = qtool.load(out, device="cpu")
    for name, width in planned.items():
        assert loaded.model.get_submodule(name).bits == width, name
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert torch.isfinite(loaded.model(ids).logits).all()


def test_hqq_plan_meets_a_size_budget(tiny_llama, tmp_path):
    out = tmp_path / "hqq"
    record = qtool.quantize(str(tiny_llama), out, "hqq", group_size=32, device="cpu", target_size="12.07MiB", **CALIB)
    mixed = record["mixed_precision"]
    assert record["weights_bytes"] <= 12.07 * 2**20 and abs(mixed["size_error"]) < 0.001  # the file meets it
    loaded = qtool.load(out, device="cpu")
    widths = {name: module.meta["nbits"] for name, module in loaded.model.named_modules() if hasattr(module, "W_q")}
    assert widths == {m: g["bits"] for g in mixed["groups"] for m in g["modules"]}


def test_plan_is_deterministic_per_seed(tiny_llama, tmp_path, monkeypatch):
    def plan(seed: int, cache: str) -> dict:
        # two widths: each is one uniform gptq run per plan (the default four made this the suite's slowest test)
        args = ["plan", "--method", "gptq", "--group-size", "32", "--target-bits", "4.0", "--mixed-bits", "3,4",
                "--calib", "builtin", "--nsamples", "4", "--seqlen", "64", "--seed", str(seed),
                "--device", "cpu", "--json", "--quiet", tiny_llama]
        monkeypatch.setenv("QTOOL_CACHE", str(tmp_path / cache))
        proc = run_qtool(*args)  # a fresh process: stdout must be nothing but the JSON
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    first, again, cached, other = plan(0, "a"), plan(0, "b"), plan(0, "a"), plan(1, "c")
    keep = ("groups", "average_bits", "predicted_bytes")
    assert {k: first[k] for k in keep} == {k: again[k] for k in keep} == {k: cached[k] for k in keep}
    assert cached["sensitivity"]["cached"] and not again["sensitivity"]["cached"]
    assert [g["cost"] for g in other["groups"]] != [g["cost"] for g in first["groups"]]  # other samples


def test_kl_shortcut_equals_a_full_forward(tiny_llama):
    """The kl measure runs only the layers after the perturbed one, from cached hidden states."""
    from qtool.mixed.sensitivity import kl_costs, rounded, rtn_errors
    from qtool.mixed.units import decision_units
    from qtool.models import linear_layers

    model = qtool.load(str(tiny_llama), device="cpu").model
    units = decision_units(linear_layers(model))
    rows = [torch.randint(0, 1000, (1, 48), generator=torch.Generator().manual_seed(0))]
    costs = kl_costs(model, units, (2, 4), rtn_errors(32), rows)
    with torch.no_grad():
        base = torch.log_softmax(model(rows[0]).logits, -1)
        unit = units[5]  # layer 1's o_proj: the shortcut starts at layer 1
        with rounded(model, unit, 2, rtn_errors(32)):
            q = torch.log_softmax(model(rows[0]).logits, -1)
    full = float((base.exp() * (base - q)).sum(-1).mean())
    assert costs[5][0] == pytest.approx(full, rel=1e-4) and full > 0
    assert all(row[0] > row[1] >= 0 for row in costs)  # 2 bits cost more than 4


@pytest.mark.parametrize("args, needles", [
    (["--method", "gptq", "--target-bits", "1.5"], ["cannot meet 1.5 bits/weight", "2.", "ask for at least 2."]),
    (["--method", "gptq", "--target-bits", "3.5", "--bits", "4"], ["--bits and a mixed-precision budget"]),
    (["--method", "rtn", "--target-size", "10MiB"], ["rtn writes dense weights", "--target-bits"]),
    (["--method", "bnb", "--target-bits", "4"], ["bnb has no per-layer bit-widths", "gptq"]),
    (["--method", "hqq", "--target-size", "12 parsecs"], ["--target-size takes a size"]),
    (["--method", "hqq", "--target-size", "1MiB"], ["cannot meet 1.00 MiB", "MiB"]),
    (["--method", "hqq", "--target-bits", "3", "--target-size", "12MiB"], ["not both"]),
    (["--method", "hqq", "--sensitivity", "kl"], ["--sensitivity, --perturbation and --mixed-bits only apply"]),
    (["--method", "hqq", "--target-bits", "-3"], ["target-bits"]),
    (["--method", "gptq", "--target-bits", "5", "--mixed-bits", "4,7"], ["--mixed-bits 4,7", "2,3,4,5,6,8"]),
    (["--method", "awq", "--target-bits", "5", "--mixed-bits", "4,5"], ["--mixed-bits 4,5", "awq", "2,3,4,8"]),
    (["--method", "gptq", "--target-bits", "4", "--mixed-bits", "4,8"], ["cannot meet 4 bits/weight", "4 to 8 bits"]),
    (["--method", "gptq", "--mixed-bits", "4,8"], ["and --mixed-bits only apply"]),
    (["--method", "gptq", "--target-bits", "4.5", "--mixed-bits", "5"], ["its only plan is", "(every layer at 5 bits)"]),
    (["--method", "gptq", "--target-bits", "4.5", "--mixed-bits="], ["empty value for --mixed-bits", "3,4,8"]),
    (["--method", "gptq", "--target-bits", "4.5", "--mixed-bits", "3,,4"], ["--mixed-bits takes comma-separated"]),
    (["--method", "hqq", "--target-size", "1000"], ["cannot meet 1,000 bytes"]),
    (["--method", "hqq", "--target-bits", "nan"], ["--target-bits", "finite number"]),
])
def test_bad_budgets_are_one_line_errors_before_loading(args, needles, tiny_llama, tmp_path):
    out = tmp_path / "out"
    proc = qtool_in_process("quantize", *args, "--group-size", "32", "--device", "cpu", "--quiet", tiny_llama, out)
    assert_one_line_error(proc, *needles)
    assert not out.exists()


def test_compare_cells_take_a_target_and_the_report_draws_the_curve(tiny_llama, wikitext_test, tmp_path):
    from qtool.compare import load_compare_recipe, read_results, run_compare
    from qtool.report import write_report

    recipe_path = tmp_path / "compare.yaml"
    recipe_path.write_text(f"""\
compare:
  name: tiny-mixed
  model: {tiny_llama}
  device: cpu
  calib: builtin
  nsamples: 4
  seqlen: 64
  eval: {{text: {wikitext_test}, ctx: 64, max_tokens: 256}}
  cells:
    - {{method: rtn, bits: [3, 4], group_size: 32}}
    - {{method: rtn, target_bits: [3.6, 4.4], group_size: 32}}
    - {{method: rtn, target_bits: 5.5, group_size: 32, mixed_bits: [4, 8]}}
""")
    recipe = load_compare_recipe(str(recipe_path))
    assert [c.id for c in recipe.cells] == ["base", "rtn-b3-g32", "rtn-b4-g32", "rtn-t3.6-g32", "rtn-t4.4-g32",
                                            "rtn-t5.5-g32-widths4_8"]
    out = tmp_path / "report"
    run_compare(recipe, out, progress=False, log=lambda _m: None)
    results = read_results(out)
    assert all(r["status"] == "ok" for r in results.values()), results
    mixed = results["rtn-t3.6-g32"]["quantization"]
    assert mixed["mixed_precision"]["average_bits"] <= 3.6 and "groups" not in mixed["mixed_precision"]
    assert results["rtn-t3.6-g32"]["quantization"]["effective_bits_per_weight"] <= 3.6
    assert results["rtn-t5.5-g32-widths4_8"]["quantization"]["mixed_precision"]["candidates"] == [4, 8]
    assert results["rtn-t4.4-g32"]["quantization"]["mixed_precision"]["candidates"] != [4, 8]
    write_report(results, out)
    assert (out / "quality_vs_size.png").stat().st_size > 0


def test_rotated_gptq_measures_costs_on_the_rotated_model(tiny_llama, tmp_path):
    plain = qtool.quantize(str(tiny_llama), tmp_path / "plain", "gptq", group_size=32, device="cpu",
                           target_bits=3.6, **CALIB, **CHEAP_COSTS)["mixed_precision"]
    rotated = qtool.quantize(str(tiny_llama), tmp_path / "rot", "gptq", group_size=32, device="cpu",
                             options={"rotate": True}, target_bits=3.6, **CALIB, **CHEAP_COSTS)["mixed_precision"]
    assert "rotated" in rotated["sensitivity"]["model"] and "model" not in plain["sensitivity"]
    assert [g["cost"] for g in rotated["groups"]] != [g["cost"] for g in plain["groups"]]
    assert rotated["average_bits"] <= 3.6
    assert abs(rotated["size_error"]) < 0.01  # the untied output head is counted


def test_compare_refuses_an_unreachable_budget_before_the_first_cell(tiny_llama, wikitext_test, tmp_path):
    from qtool.compare import check_recipe, load_compare_recipe

    recipe_path = tmp_path / "compare.yaml"
    recipe_path.write_text(f"""\
compare:
  model: {tiny_llama}
  device: cpu
  eval: {{text: {wikitext_test}, ctx: 64, max_tokens: 256}}
  cells:
    - {{method: rtn, target_bits: [4.0, 1.0], group_size: 32}}
""")
    with pytest.raises(SpecError, match="cell rtn-t1-g32: rtn cannot meet 1 bits/weight"):
        check_recipe(load_compare_recipe(str(recipe_path)), "cpu")
    recipe_path.write_text(recipe_path.read_text().replace("[4.0, 1.0], group_size: 32", "4.0, mixed_bits: [4, 7]"))
    with pytest.raises(SpecError, match="cell rtn-t4-widths4_7: --mixed-bits 4,7: rtn gives a layer one of"):
        check_recipe(load_compare_recipe(str(recipe_path)), "cpu")


def test_method_perturbation_measures_the_methods_own_error(tiny_llama, tmp_path):
    """With perturbation=method the costs come from gptq's own error at each width: measured on the
    layers' outputs, smaller than round-to-nearest's at 2 bits for most groups (GPTQ minimises the
    output error on the calibration inputs), and recorded."""
    runs = {kind: qtool.quantize(str(tiny_llama), tmp_path / kind, "gptq", group_size=32, device="cpu",
                                 options={"sym": False}, target_bits=3.6, sensitivity="output", perturbation=kind,
                                 **CALIB)["mixed_precision"]
            for kind in ("rtn", "method")}
    assert "gptq itself" in runs["method"]["sensitivity"]["perturbation"]
    at2 = {kind: [g["cost"]["2"] for g in run["groups"]] for kind, run in runs.items()}
    assert at2["method"] != at2["rtn"]
    assert sum(m < r for m, r in zip(at2["method"], at2["rtn"], strict=True)) > len(at2["rtn"]) / 2
    assert runs["method"]["average_bits"] <= 3.6


@pytest.mark.parametrize("widths, target", [([4, 8], 5.6), ([4, 6], 5.0)])
def test_a_plan_keeps_to_the_widths_asked_for(widths, target, tiny_llama, tmp_path):
    record = qtool.quantize(str(tiny_llama), tmp_path / "out", "gptq", group_size=32, device="cpu", target_bits=target,
                            mixed_bits=widths, **CALIB, **CHEAP_COSTS)
    mixed = record["mixed_precision"]
    assert mixed["candidates"] == widths and set(mixed["layers_per_bits"]) == set(map(str, widths))
    assert record["spec"]["target"]["candidates"] == widths
    assert abs(mixed["size_error"]) < 0.01
    loaded = qtool.load(tmp_path / "out", device="cpu")
    assert {g["bits"] for g in mixed["groups"]} == {loaded.model.get_submodule(m).bits
                                                     for g in mixed["groups"] for m in g["modules"]}


def test_a_quantized_model_is_refused_by_plan_too(tiny_llama, tmp_path):
    out = tmp_path / "rtn"
    qtool.quantize(str(tiny_llama), out, "rtn", bits=4, group_size=32, device="cpu")
    proc = qtool_in_process("plan", "--method", "rtn", "--group-size", "32", "--target-bits", "4", "--device", "cpu", out)
    assert_one_line_error(proc, "already quantized (rtn)")
    assert_one_line_error(qtool_in_process("plan", "--method", "hqq", "--calib", "builtin", tiny_llama),
                          "a plan needs a budget")


def test_gptq_refuses_5_and_6_bits_for_widths_its_planar_packing_cannot_hold():
    """GPTQModel packs 5/6-bit layers in blocks of 32 codes: a layer width of 48 is refused before
    any work, for --bits 5 and for a plan that may use 6 bits; 4 bits and a 2/3/4/8 plan are not."""
    from torch import nn

    from qtool import backends
    from qtool.mixed.target import MixedTarget

    gptq = backends.get("gptq")
    linears = {"model.layers.0.mlp.up_proj": nn.Linear(64, 48)}
    for bits, target in ((5, None), (None, MixedTarget(bits=4.5, candidates=(4, 6)))):
        spec = gptq.make_spec(bits, 16, {}, 0, None, target)
        with pytest.raises(SpecError, match=r"gptq (5|6)-bit layers .* divisible by 32; this model has 48"):
            gptq.check_layers(spec, linears)
    for bits, target in ((4, None), (None, MixedTarget(bits=4.5))):
        gptq.check_layers(gptq.make_spec(bits, 16, {}, 0, None, target), linears)


@pytest.mark.parametrize(("flag", "low"), [("--target-bits", "1.5"), ("--target-size", "1000")])
def test_the_least_budget_a_refusal_names_is_met(flag, low, tiny_llama):
    """A budget below every plan is refused with the least one that works, rounded up: asking for
    that is then accepted."""
    common = ["plan", "--method", "hqq", "--group-size", "32", "--device", "cpu", "--quiet", tiny_llama]
    least = re.search(r"ask for at least ([0-9.]+) (bits/weight|MiB)", qtool_in_process(*common, flag, low).stderr)
    assert least, "the refusal names no least budget"
    value = least.group(1) if flag == "--target-bits" else f"{least.group(1)}MiB"
    proc = qtool_in_process(*common, flag, value)
    assert proc.returncode == 0, proc.stderr


def test_plan_table_columns_line_up(tiny_llama):
    """`qtool plan`'s table: every row's bits and costs start where the header's do, whatever a group's name."""
    proc = qtool_in_process("plan", "--method", "rtn", "--group-size", "32", "--target-bits", "4.5", "--calib", "builtin",
                            "--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--quiet", tiny_llama)
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout[proc.stdout.index("  group"):].splitlines()
    header, rows = table[0], table[1:]
    assert len(rows) == 8 and any("+" in row for row in rows)  # 2 layers x 4 groups, fused names the longest
    bits = slice(header.index("bits"), header.index("bits") + len("bits"))
    assert {len(row) for row in rows} == {len(header)}
    assert all(row[bits].strip() in {"2", "3", "4", "8"} for row in rows), table
