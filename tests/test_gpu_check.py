"""benchmarks/gpu_check.sh --dry-run: the GPU check's code paths on the CPU with a tiny Llama.

The numbers are meaningless on a tiny random model; what is checked is that every part runs to
the end and writes the JSON the report reads, with the kernels it names actually in the model.
"""

import json
import subprocess
import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_check import BITS_PER_WEIGHT, LLAMA_7B, decode_bytes_per_step  # noqa: E402


def test_dry_run_writes_every_part(tmp_path, wikitext_test):  # wikitext_test: skips where ../shared is absent
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("smollm2", "decode", "qlora")}
    assert all(part["finished"] for part in parts.values())

    cells = {row["cell"]: row for row in parts["smollm2"]["rows"]}
    expected_classes = {"base": "Linear", "hqq-4-g64": "HQQLinear", "bnb-nf4": "Linear4bit",
                        "bnb-int8": "Linear8bitLt", "eetq-int8": "Int8WeightOnlyLinear"}
    for cell, layer in expected_classes.items():
        assert cells[cell]["status"] == "ok", cells[cell]
        assert cells[cell]["layer_classes"] == [layer] and cells[cell]["ppl"] > 1
    assert cells["base"]["cpu_reference"]["ppl"] > 1  # the committed CPU figure it is compared with
    assert all(row["status"] in ("ok", "skipped") for row in cells.values()), cells

    variants = {row["variant"]: row for row in parts["decode"]["rows"]}
    # PyTorch's tinygemm int4 kernel exists on CUDA only: on the CPU that variant fails, in its row.
    assert "NotImplementedError" in variants.pop("hqq-4-g64-tinygemm")["error"]
    tokens = set()
    for row in variants.values():
        assert row["status"] == "ok", row
        for run in row["runs"]:
            assert run["mode"] == "eager" and run["decode_tokens_per_s"]["median"] > 0
            tokens.add(tuple(run["tokens"]) if row["variant"] == "fp16" else ())
    assert len(tokens - {()}) == 1  # fp16 greedy tokens agree across batch sizes

    for row in parts["qlora"]["rows"]:
        assert row["status"] == "ok" and row["layer_classes"] == ["Linear4bit"], row
        assert len(row["losses"]) == parts["qlora"]["settings"]["steps"]
    with_checkpointing, without = parts["qlora"]["rows"]
    assert with_checkpointing["losses"] == without["losses"]  # recomputing activations changes no number


def test_roofline_bytes_match_the_7b_shape():
    # Llama-2-7B: 6.48e9 parameters in the decoder's linears, a 32000 x 4096 head and embedding.
    fp16 = decode_bytes_per_step(LLAMA_7B, BITS_PER_WEIGHT["fp16"], batch=1, context=0)
    assert abs(fp16 - 2 * (6_476_005_376 + 32000 * 4096 + 4096 + 65 * 4096)) < 1
    kv_per_token = decode_bytes_per_step(LLAMA_7B, 16, 1, 1) - fp16
    assert kv_per_token == 2 * 2 * 32 * 4096  # K and V, 32 layers, 4096 wide, 2 bytes
    nf4 = decode_bytes_per_step(LLAMA_7B, BITS_PER_WEIGHT["bnb-nf4"], 1, 0)
    assert 3.6e9 < nf4 < 3.8e9
