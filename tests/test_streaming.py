"""Streaming quantization (qtool.streaming): the same checkpoint as in memory, under a memory cap."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import REPO, run_qtool

STREAMING = ("rtn", "eetq", "hqq")


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state |= load_file(str(file))
    return state


def _in_memory(method: str, model: Path, out: Path, spec=None) -> None:
    from qtool import backends
    from qtool.models import resolve_model

    backend = backends.get(method)
    out.mkdir()
    backend.save(backend.quantize(resolve_model(str(model)), spec or backend.make_spec(), "cpu"), out)


@pytest.mark.parametrize("method", STREAMING)
def test_streamed_shards_hold_what_the_in_memory_path_writes(method, tiny_llama, tmp_path):
    from qtool import api

    record = api.quantize(str(tiny_llama), tmp_path / "streamed", method, device="cpu", max_shard_size="4MiB")
    streaming = record["streaming"]
    assert streaming["mode"] == "per tensor from safetensors" and streaming["shards"] >= 2
    for shard in (tmp_path / "streamed").glob("*.safetensors"):  # at most 4 MiB, or one larger tensor alone
        held = load_file(str(shard))
        assert len(held) == 1 or sum(t.numel() * t.element_size() for t in held.values()) <= 4 * 2**20
    _in_memory(method, tiny_llama, tmp_path / "memory")

    streamed, memory = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "memory")
    assert streamed.keys() == memory.keys()
    for name, tensor in memory.items():
        assert streamed[name].dtype == tensor.dtype and torch.equal(streamed[name], tensor), name
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "streamed" / name).read_text()) == json.loads((tmp_path / "memory" / name).read_text())
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(streamed)

    ids = torch.tensor([[1, 422, 1029, 314, 3304, 28]])
    loaded = api.load(tmp_path / "streamed", device="cpu")
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert torch.isfinite(logits).all()
    if method == "rtn":  # dense: plain transformers reads the shards through the index
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=torch.float32)
        with torch.no_grad():
            assert torch.equal(plain(ids).logits, logits)


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_per_layer_bits_stream_too(method, tiny_llama, tmp_path):
    """A mixed-precision plan's per-layer bits reach every layer in the streamed run as in memory."""
    from qtool import backends
    from qtool.models import resolve_model
    from qtool.runtime import compute_dtype
    from qtool.streaming import stream_quantize

    backend = backends.get(method)
    spec = dataclasses.replace(backend.make_spec(4, 32), layer_bits={"model.layers.0.mlp.down_proj": 2,
                                                                      "model.layers.1.self_attn.q_proj": 8})
    source = resolve_model(str(tiny_llama))
    (tmp_path / "streamed").mkdir()
    stream_quantize(source, backend, spec, tmp_path / "streamed", "cpu", compute_dtype("cpu"))
    _in_memory(method, tiny_llama, tmp_path / "memory", spec)
    streamed, memory = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "memory")
    assert streamed.keys() == memory.keys() and all(torch.equal(streamed[k], memory[k]) for k in memory)
    uniform = tmp_path / "uniform"
    _in_memory(method, tiny_llama, uniform, backend.make_spec(4, 32))
    changed = {k for k, v in _tensors(uniform).items() if not torch.equal(v, streamed[k])}
    assert any("layers.0.mlp.down_proj" in k for k in changed) and any("layers.1.self_attn.q_proj" in k for k in changed)
    assert not any("layers.0.self_attn.q_proj" in k for k in changed)


def test_a_source_whose_names_transformers_converts_is_quantized_in_memory(tiny_llama, tmp_path):
    """Old Llama checkpoints carry rotary inv_freq tensors transformers drops on load: not the model's
    own names, so qtool does not stream them and says why in qtool.json."""
    source = tmp_path / "legacy"
    shutil.copytree(tiny_llama, source)
    state = load_file(str(source / "model.safetensors"))
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, str(source / "model.safetensors"), metadata={"format": "pt"})
    result = run_qtool("quantize", "--method", "rtn", str(source), str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["streaming"]["mode"] == "in memory"
    assert "rotary_emb.inv_freq" in record["streaming"]["why"]


def test_a_bad_shard_size_is_one_line(tiny_llama, tmp_path):
    result = run_qtool("quantize", "--method", "rtn", "--max-shard-size", "0", str(tiny_llama), str(tmp_path / "out"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["qtool: error: --max-shard-size takes a size such as 500MB, 2GiB "
                                                  "or 1000000 (bytes), got '0'"]
    assert not (tmp_path / "out").exists()


# ---- a model three times larger than the memory the process may use ---------------------------------------

CAP = 2**30  # bytes of data (heap, anonymous and private writable mappings) the quantizing process may have


@pytest.fixture(scope="module")
def model_over_cap(tmp_path_factory, smollm2):
    """A random Llama (hidden 1024, 59 layers) of 3.01 GiB of fp32 weights: over three times CAP."""
    from qtool.synthetic import llama_config, write_random_model

    folder = tmp_path_factory.mktemp("over-cap") / "model"
    size = write_random_model(folder, llama_config(59, 1024, 2816), smollm2.load_tokenizer())
    assert size >= 3 * CAP
    yield folder
    shutil.rmtree(folder.parent, ignore_errors=True)  # 3 GiB: not left for pytest's kept temporary folders


def _capped_qtool(*args: str) -> tuple[subprocess.CompletedProcess, int]:
    """The CLI in a process limited to CAP bytes of data (RLIMIT_DATA: the kernel refuses more), and
    its peak resident set in bytes, from the kernel."""
    from qtool.evaluate.memory import run_with_peak

    return run_with_peak([sys.executable, "-m", "qtool.cli", *args], data_limit=CAP, cwd=REPO, timeout=900,
                         env={**os.environ, "TQDM_DISABLE": "1"})


def test_the_cap_is_real_loading_the_model_whole_fails_in_one_line(model_over_cap):
    result, _ = _capped_qtool("generate", str(model_over_cap), "Hello", "--max-new-tokens", "1")
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("qtool: error: ") and "out of memory (host RAM)" in line


@pytest.mark.parametrize("method", [
    "eetq",
    pytest.param("rtn", marks=pytest.mark.slow),  # writes 3 GiB of dense weights back: ~1 min
    pytest.param("hqq", marks=pytest.mark.slow),  # ~1.5 min with optimize=false, far more with HQQ's solver
])
def test_a_model_three_times_the_cap_quantizes_within_it(method, model_over_cap, tmp_path):
    out = tmp_path / method
    options = ["--opt", "optimize=false"] if method == "hqq" else []
    result, peak = _capped_qtool("quantize", "--method", method, *options, "--max-shard-size", "256MiB",
                                 str(model_over_cap), str(out), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout)
    assert record["streaming"]["mode"] == "per tensor from safetensors"
    assert peak <= CAP and record["peak_memory_mib"] * 2**20 <= CAP
    assert any(name.startswith("model.layers.58.mlp.down_proj.") for name in _tensors(out))  # the last layer too
    shutil.rmtree(out)
