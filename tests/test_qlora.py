"""qtool qlora / chat / merge on the tiny Llama: real PEFT training on real quantized layers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qtool
from qtool.finetune.dataset import IGNORE, build_examples
from qtool.finetune.recipe import DatasetSection
from tests.conftest import REPO, assert_one_line_error, interrupt_qtool_when, run_qtool

IDENTITY = REPO / "recipes" / "data" / "identity.jsonl"


def _recipe(tmp_path: Path, model: Path, quantization: str = "{method: hqq, bits: 4, group_size: 32}",
            train: str = "{learning_rate: 1.0e-3, max_steps: 4, batch_size: 4, save_steps: 2}", extra: str = "") -> Path:
    path = tmp_path / "qlora.yaml"
    path.write_text(f"""\
qlora:
  model: {model}
  quantization: {quantization}
  dataset: {{path: {IDENTITY}, format: alpaca, cutoff_len: 96, val_size: 4}}
  lora: {{r: 4, alpha: 8{extra}}}
  train: {train}
  device: cpu
""")
    return path


def test_chat_template_examples_train_only_on_answers(smollm2):
    tok = smollm2.load_tokenizer()
    examples = build_examples(DatasetSection(path=str(IDENTITY), cutoff_len=256, val_size=4), IDENTITY, tok, seed=0)
    assert len(examples.train) == 28 and len(examples.validation) == 4
    first = examples.train[0]
    target = [t for t, label in zip(first["input_ids"], first["labels"], strict=True) if label != IGNORE]
    text = tok.decode(target)
    assert "Qwill" in text or "qtool" in text
    assert "<|im_start|>user" not in text  # the prompt is masked
    prompt = tok.decode([t for t, label in zip(first["input_ids"], first["labels"], strict=True) if label == IGNORE])
    assert "<|im_start|>user" in prompt


def test_sharegpt_and_text_formats(tmp_path, smollm2):
    tok = smollm2.load_tokenizer()
    share = tmp_path / "s.jsonl"
    share.write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there"},
                                                   {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye"}]}) + "\n")
    ex = build_examples(DatasetSection(path=str(share), format="sharegpt"), share, tok, 0).train[0]
    answer = tok.decode([t for t, label in zip(ex["input_ids"], ex["labels"], strict=True) if label != IGNORE])
    assert "Hello there" in answer and "Goodbye" in answer and "Bye<" not in answer
    text = tmp_path / "t.txt"
    text.write_text("rivers and bridges " * 200)
    blocks = build_examples(DatasetSection(path=str(text), format="text", cutoff_len=64), text, tok, 0).train
    assert blocks and all(len(b["input_ids"]) == 64 and b["labels"] == b["input_ids"] for b in blocks)


def test_qlora_on_hqq_trains_saves_and_chats_with_adapter_switching(tiny_llama, tmp_path):
    out = tmp_path / "run"
    proc = run_qtool("qlora", _recipe(tmp_path, tiny_llama), "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "qtool.json").read_text())
    assert record["base"]["method"] == "hqq" and record["steps"] == 4
    assert record["lora_targets"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert record["train_loss_last"] < record["train_loss_first"]
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "loss.png").stat().st_size > 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log if "loss" in h] == [1, 2, 3, 4]
    assert any("eval_loss" in h for h in log)

    script = "Who are you?\n/base\nWho are you?\n/adapter nope\n/adapter me\n/adapters\n/quit\nnever read\n"
    chat = subprocess.run([sys.executable, "-m", "qtool.cli", "chat", str(out / "base"), "--adapter", f"me={out}",
                           "--max-new-tokens", "3"], input=script, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert chat.returncode == 0, chat.stderr
    lines = chat.stdout.splitlines()
    assert lines[0].startswith("assistant[me]> ")
    assert "[adapters off: answering with the base model]" in lines
    assert any(line.startswith("assistant[base]> ") for line in lines)
    assert "[no adapter 'nope'; loaded: me]" in lines and "[adapter me on]" in lines
    assert "[adapters: me (active: me)]" in lines and "GPT-QModel" not in chat.stdout

    merged = tmp_path / "merged"
    proc = run_qtool("merge", out / "base", out, merged, "--requantize", "hqq", "--bits", "4", "--group-size", "32")
    assert proc.returncode == 0, proc.stderr
    info = json.loads((merged / "qtool.json").read_text())
    assert info["method"] == "hqq" and info["merge"]["full_precision_source"] == str(tiny_llama.resolve())


def test_eetq_layers_are_refused_in_one_line(tiny_llama, tmp_path):
    recipe = _recipe(tmp_path, tiny_llama, quantization="{method: eetq, bits: 8, group_size: -1}")
    assert_one_line_error(run_qtool("qlora", recipe, "--out", tmp_path / "run"), "PEFT cannot train LoRA on eetq layers")
    assert not (tmp_path / "run").exists()  # shown only once OUT/base was quantized; OUT is removed again


def test_interrupted_training_resumes_from_the_last_checkpoint(tiny_llama, tmp_path):
    recipe = _recipe(tmp_path, tiny_llama, quantization="{method: rtn, bits: 4, group_size: 32}",
                     train="{learning_rate: 1.0e-3, max_steps: 40, batch_size: 2, save_steps: 2, logging_steps: 1}")
    out = tmp_path / "run"
    saved = out / "checkpoints" / "checkpoint-4" / "trainer_state.json"  # written last: checkpoint 4 is complete
    code, stderr = interrupt_qtool_when(["qlora", recipe, "--out", out, "--quiet"], saved.exists)
    assert code == 130, stderr
    assert "--resume" in stderr and not (out / "qtool.json").exists()
    assert_one_line_error(run_qtool("qlora", recipe, "--out", out), "unfinished run", "--resume")

    proc = run_qtool("qlora", recipe, "--out", out, "--resume", "--quiet")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "qtool.json").read_text())
    assert record["steps"] == 40 and record["resumed_from"].startswith("checkpoint-")
    assert int(record["resumed_from"].split("-")[1]) >= 4
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 41))  # every step logged once, none lost or repeated
    assert_one_line_error(run_qtool("qlora", recipe, "--out", out), "finished run", "--force")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.replace("  device: cpu", "  colour: red"), "unknown key 'colour'"),
    (lambda t: t.replace("r: 4,", "rank: 4,"), "unknown key 'lora.rank'"),
    (lambda t: t.replace(str(IDENTITY), "/nowhere/data.jsonl"), "dataset /nowhere/data.jsonl not found"),
    (lambda t: t.replace("format: alpaca", "format: sharegpt"), "sharegpt rows need"),
    (lambda t: t.replace("alpha: 8", "alpha: 8, target_modules: [q_proj, qkv_proj]"), "'qkv_proj' is not a module"),
])
def test_bad_recipes_are_one_line_errors(tiny_llama, tmp_path, edit, message):
    recipe = _recipe(tmp_path, tiny_llama, quantization="{method: rtn, bits: 4, group_size: 32}")
    recipe.write_text(edit(recipe.read_text()))
    assert_one_line_error(run_qtool("qlora", recipe, "--out", tmp_path / "run"), message)
    assert not (tmp_path / "run").exists()  # else the corrected rerun would meet "holds an unfinished run"


def test_alpaca_rows_with_wrong_fields_name_them(tiny_llama, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "response": "Hello"}) + "\n")
    recipe = _recipe(tmp_path, tiny_llama, quantization="{method: rtn, bits: 4, group_size: 32}")
    recipe.write_text(recipe.read_text().replace(str(IDENTITY), str(data)).replace("val_size: 4", "val_size: 0"))
    assert_one_line_error(run_qtool("qlora", recipe, "--out", tmp_path / "run"), "need 'instruction' and 'output'", "prompt, response")


QLORA_RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml") if "\nqlora:" in p.read_text())


@pytest.mark.parametrize("name", QLORA_RECIPES)
def test_bundled_qlora_recipes_are_valid_and_find_their_data_after_a_copy(name, tmp_path, monkeypatch):
    from qtool import backends
    from qtool.finetune.recipe import load_qlora_recipe, resolve_data_path
    from qtool.recipes import copy_recipe

    monkeypatch.chdir(tmp_path)  # neither the checkout nor the recipe's folder: the bundled data must still be found
    recipe = load_qlora_recipe(str(copy_recipe(name, str(tmp_path))))
    data = resolve_data_path(recipe)
    assert data == "builtin" if recipe.dataset.format == "text" else Path(data).is_file()
    q = recipe.quantization
    backends.get(q.method).make_spec(q.bits, q.group_size, {k: str(v) for k, v in q.options.items()}, 0)


def test_continued_pretraining_on_builtin_text(tiny_llama, tmp_path):
    recipe = _recipe(tmp_path, tiny_llama, quantization="{method: rtn, bits: 4, group_size: 32}",
                     train="{learning_rate: 1.0e-3, max_steps: 3, batch_size: 2, save_steps: 3}")
    recipe.write_text(recipe.read_text().replace(
        f"{{path: {IDENTITY}, format: alpaca, cutoff_len: 96, val_size: 4}}", "{path: builtin, format: text, cutoff_len: 64, val_size: 2}"))
    out = tmp_path / "run"
    proc = run_qtool("qlora", recipe, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "qtool.json").read_text())
    assert record["data"]["format"] == "text" and record["data"]["path"].endswith("calib_data")
    assert record["data"]["train"] > 50 and record["steps"] == 3


def test_quiet_qlora_prints_only_its_summary(tiny_llama, tmp_path):
    """--quiet: neither the Trainer's progress bars nor its log dicts; the jsonl log is still written.
    Run as a user runs it: TQDM_DISABLE (which run_qtool sets for every other test) is not set."""
    recipe = _recipe(tmp_path, tiny_llama, quantization="{method: rtn, bits: 4, group_size: 32}",
                     train="{learning_rate: 1.0e-3, max_steps: 2, batch_size: 4, save_steps: 2, logging_steps: 1}")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    proc = subprocess.run([sys.executable, "-m", "qtool.cli", "qlora", str(recipe), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [proc.stdout.strip()] and proc.stdout.startswith(f"wrote {out}/adapter: 2 steps")
    assert proc.stderr == ""
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log if "loss" in h] == [1, 2] and any("eval_loss" in h for h in log)


def test_logging_steps_beyond_the_run_still_summarises(tiny_llama, tmp_path):
    """No step's loss is logged in a run shorter than logging_steps: the summary takes the Trainer's mean loss."""
    recipe = _recipe(tmp_path, tiny_llama, quantization="{method: rtn, bits: 4, group_size: 32}",
                     train="{learning_rate: 1.0e-3, max_steps: 2, batch_size: 4, save_steps: 2, logging_steps: 10}")
    out = tmp_path / "run"
    proc = run_qtool("qlora", recipe, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert not any("loss" in h for h in log)
    mean = next(h["train_loss"] for h in log if "train_loss" in h)
    record = json.loads((out / "qtool.json").read_text())
    assert record["steps"] == 2 and record["train_loss_first"] == record["train_loss_last"] == mean
    assert f"train loss {mean:.3f} -> {mean:.3f}" in proc.stdout
    assert (out / "adapter" / "adapter_config.json").is_file()


def _random_adapter(base: Path, targets: str | list[str], folder: Path, seed: int) -> None:
    """A LoRA adapter on `base` with random, non-zero A and B (no training: the merge must be exact for any)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear", ["o_proj", "down_proj"]])
def test_merge_computes_exactly_what_the_adapter_on_its_base_computes(tiny_llama, tmp_path, targets):
    from transformers import AutoModelForCausalLM

    from qtool.finetune.adapters import attach_adapters

    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    _random_adapter(tiny_llama, targets, adapter, seed=len(targets))
    proc = run_qtool("merge", tiny_llama, adapter, merged)
    assert proc.returncode == 0, proc.stderr

    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    base = qtool.load(tiny_llama, device="cpu").model
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        with_adapter = attach_adapters(base, {"a": adapter})(input_ids=ids).logits
        out = AutoModelForCausalLM.from_pretrained(merged).eval()
        got = out(input_ids=ids).logits
    assert (with_adapter - plain).abs().max() > 0.1  # the adapter changes the model: the check below means something
    torch.testing.assert_close(got, with_adapter, atol=1e-5, rtol=1e-5)
    assert out.lm_head.weight is out.model.embed_tokens.weight  # still tied: the merge touched neither
    torch.testing.assert_close(out.model.embed_tokens.weight, base.get_input_embeddings().weight, atol=0, rtol=0)


@pytest.mark.parametrize(("targets", "module", "other"), [
    (["q_proj", "lm_head"], "lm_head", "model.embed_tokens"),
    (["embed_tokens", "v_proj"], "model.embed_tokens", "lm_head"),
])
def test_merge_refuses_lora_on_a_weight_the_base_shares(tiny_llama, tmp_path, targets, module, other):
    """tiny_llama ties lm_head to embed_tokens: merging LoRA into one would change the other too."""
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    _random_adapter(tiny_llama, targets, adapter, seed=1)
    proc = run_qtool("merge", tiny_llama, adapter, merged)
    assert_one_line_error(proc, f"puts LoRA on {module}, whose weight {tiny_llama} shares with {other}",
                          "would not compute what the adapter does", "tie_word_embeddings: false")
    assert not merged.exists()


def test_aqlm_layers_are_refused_before_quantizing(tiny_llama, tmp_path):
    recipe = _recipe(tmp_path, tiny_llama, quantization="{method: aqlm, bits: 2, nsamples: 4, seqlen: 64}")
    proc = run_qtool("qlora", recipe, "--out", tmp_path / "run")
    assert_one_line_error(proc, "PEFT cannot train LoRA on aqlm layers on cpu")
    assert not (tmp_path / "run" / "base").exists()


def test_merge_on_a_rotated_gptq_base_rotates_the_original_first(tiny_llama, tmp_path):
    """With the base's rotation kind (hadamard here; test_rotation.py's round trip is orthogonal)."""
    pytest.importorskip("gptqmodel", reason="gptq needs GPTQModel: scripts/setup-venv.sh installs it")
    from safetensors.torch import load_file

    from qtool.rotation import rotate_with_seed

    quantization = "{method: gptq, bits: 4, group_size: 32, options: {rotate: true, rotation: hadamard}, calib: builtin, nsamples: 4, seqlen: 64}"
    out = tmp_path / "run"
    proc = run_qtool("qlora", _recipe(tmp_path, tiny_llama, quantization=quantization), "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    seed = json.loads((out / "base" / "qtool.json").read_text())["rotation"]["seed"]

    merged = tmp_path / "merged"
    proc = run_qtool("merge", out / "base", out, merged)
    assert proc.returncode == 0, proc.stderr
    info = json.loads((merged / "merge.json").read_text())
    assert info["rotation_seed"] == seed and info["rotation"] == "hadamard"

    # The merged weights are the *rotated* original plus exactly the adapter's delta.
    original = qtool.load(tiny_llama, device="cpu").model
    rotate_with_seed(original, seed, "hadamard")
    weights = load_file(merged / "model.safetensors")
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    a = next(v for k, v in adapter.items() if "layers.0.self_attn.q_proj.lora_A" in k)
    b = next(v for k, v in adapter.items() if "layers.0.self_attn.q_proj.lora_B" in k)
    expected = original.model.layers[0].self_attn.q_proj.weight + scale * b @ a
    torch.testing.assert_close(weights["model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights["model.embed_tokens.weight"], original.model.embed_tokens.weight)
    assert "lm_head.weight" in weights
