"""quantize -> save -> reload -> generate/perplexity, through the real CLI and backends."""

import json

import pytest
import torch

import qtool
from qtool import backends
from qtool.models import resolve_model
from tests.conftest import run_qtool

PPL_ARGS = ["--ctx", "512", "--max-tokens", "4096"]
PROMPT = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def base_ppl(wikitext_test, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "ppl.json"
    proc = run_qtool("eval", "smollm2-135m", "--ppl", wikitext_test, *PPL_ARGS, "--json", out)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())["perplexity"]["ppl"]


@pytest.mark.parametrize(
    ("method", "args", "layer_type"),
    [
        ("hqq", ["--bits", "4", "--group-size", "64"], "HQQLinear"),
        # bnb's save/reload is exact on the tiny model in the default suite; its real-model quality run (~40 s) is slow
        pytest.param("bnb", ["--bits", "4"], "Linear4bit", marks=pytest.mark.slow),
        # rtn's save/reload runs on the tiny model in the default suite (and in every rtn mixed-precision test)
        pytest.param("rtn", ["--bits", "4", "--group-size", "64"], "Linear", marks=pytest.mark.slow),
    ],
)
def test_4bit_methods_on_the_real_model(method, args, layer_type, base_ppl, wikitext_test, tmp_path):
    out = tmp_path / method
    proc = run_qtool("quantize", "--method", method, *args, "smollm2-135m", out)
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.glob(".*qtool-tmp*")), "temporary folder left behind"

    record = json.loads((out / "qtool.json").read_text())
    assert record["method"] == method and record["spec"]["bits"] == 4
    assert record["source"]["name"] == "smollm2-135m"
    assert {"torch", "transformers", "python"} <= set(record["versions"])
    assert record["timings_s"]["quantize"] > 0 and record["peak_memory_mib"] > 0
    assert record["size_on_disk_bytes"] >= record["weights_bytes"] > 0

    loaded = qtool.load(out, device="cpu")
    assert type(loaded.model.model.layers[3].mlp.down_proj).__name__ == layer_type
    assert "Paris" in qtool.generate(loaded, PROMPT, max_new_tokens=24)

    ppl_file = tmp_path / "ppl.json"
    proc = run_qtool("eval", out, "--ppl", wikitext_test, *PPL_ARGS, "--json", ppl_file)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(ppl_file.read_text())
    ppl = payload["perplexity"]["ppl"]
    assert payload["perplexity"]["protocol"] == "token-ppl" and payload["perplexity"]["ctx"] == 512
    assert payload["quantization"]["method"] == method
    assert base_ppl < ppl < 1.25 * base_ppl, (method, ppl, base_ppl)


def test_bnb_checkpoint_loads_in_plain_transformers(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bnb"
    qtool.quantize(str(tiny_llama), out, "bnb", bits=4, device="cpu")
    ours = qtool.load(out, device="cpu").model
    plain = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32)
    x = torch.arange(40).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(ours(x).logits, plain(x).logits)


@pytest.mark.parametrize(
    ("method", "bits", "group", "options"),
    [
        ("bnb", 4, 64, {"quant_type": "fp4", "double_quant": "false"}),
        ("bnb", 4, 64, {"quant_type": "nf4"}),
        ("bnb", 8, -1, {}),
        ("hqq", 2, 32, {}),
        ("hqq", 3, 64, {}),
        ("hqq", 8, -1, {"optimize": "false"}),
        ("eetq", 8, -1, {}),
    ],
)
def test_save_and_reload_give_identical_logits(method, bits, group, options, tiny_llama, tmp_path):
    backend = backends.get(method)
    spec = backend.make_spec(bits, group, options)
    model = backend.quantize(resolve_model(str(tiny_llama)), spec, "cpu")
    backend.save(model, tmp_path)
    reloaded = backend.load(tmp_path, "cpu")
    x = torch.arange(1, 60).unsqueeze(0)
    with torch.no_grad():
        expected, got = model(x).logits, reloaded(x).logits
    assert torch.equal(expected, got)
    fp = resolve_model(str(tiny_llama)).load_model("cpu", torch.float32)
    with torch.no_grad():
        assert not torch.equal(fp(x).logits, got), "quantization changed nothing"


def test_force_replaces_an_existing_output(tiny_llama, tmp_path):
    out = tmp_path / "out"
    qtool.quantize(str(tiny_llama), out, "rtn", bits=4, group_size=32, device="cpu")
    qtool.quantize(str(tiny_llama), out, "rtn", bits=2, group_size=32, device="cpu", force=True)
    assert json.loads((out / "qtool.json").read_text())["spec"]["bits"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_eetq_int8_is_within_1_percent_of_base(base_ppl, wikitext_test, tmp_path):
    out = tmp_path / "eetq"
    proc = run_qtool("quantize", "--method", "eetq", "smollm2-135m", out)
    assert proc.returncode == 0, proc.stderr
    loaded = qtool.load(out, device="cpu")
    assert type(loaded.model.model.layers[0].self_attn.q_proj).__name__ == "Int8WeightOnlyLinear"
    assert loaded.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.int8
    assert "Paris" in qtool.generate(loaded, PROMPT, max_new_tokens=24)
    ppl = qtool.evaluate_perplexity(loaded, str(wikitext_test), ctx=512, max_tokens=4096, progress=False).ppl
    assert abs(ppl / base_ppl - 1) < 0.01, (ppl, base_ppl)
