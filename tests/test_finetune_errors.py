"""Fine-tuning inputs a user can get wrong: chat without a template, bad ShareGPT rows, empty data,
adapters of another base, a failed qlora validation. Real tokenizers, real PEFT, the real CLI."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import qtool
from qtool.errors import DatasetError
from qtool.finetune.dataset import build_examples
from qtool.finetune.recipe import DatasetSection
from tests.conftest import REPO, assert_one_line_error, run_qtool

IDENTITY = REPO / "recipes" / "data" / "identity.jsonl"
GOOD_TURNS = [{"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": "I am Qwill."}]


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.load_tokenizer()


@pytest.fixture(scope="module")
def no_template_llama(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama with its tokenizer saved without a chat template (as a base model's is)."""
    folder = tmp_path_factory.mktemp("no-template") / "tiny"
    shutil.copytree(tiny_llama, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _lines(path: Path, *rows: object) -> Path:
    path.write_text("".join("\n" if row is None else json.dumps(row) + "\n" for row in rows))
    return path


def _build(path: Path, tokenizer: object, fmt: str = "sharegpt", **section: object):
    return build_examples(DatasetSection(path=str(path), format=fmt, **section), path, tokenizer, 0)


# -- 1. chat without a chat template -------------------------------------------------------------

def test_chat_without_a_chat_template_chats_as_plain_completion(no_template_llama):
    chat = subprocess.run([sys.executable, "-m", "qtool.cli", "chat", str(no_template_llama), "--max-new-tokens", "3"],
                          input="Hello there\nAnd again\n", capture_output=True, text=True, cwd=REPO, timeout=300)
    assert chat.returncode == 0, chat.stderr
    notes = [line for line in chat.stderr.splitlines() if "chat template" in line]
    assert notes == [f"qtool: {no_template_llama} has no chat template; chatting as plain completion"], chat.stderr
    assert chat.stdout.count("assistant[base]> ") == 2


def test_plain_completion_chat_answers_as_generate_does(no_template_llama):
    from qtool.chat import Chat

    loaded = qtool.load(no_template_llama, device="cpu")
    chat = Chat(loaded.model, loaded.tokenizer, loaded.device, [], max_new_tokens=5)
    assert chat.plain
    reply = chat.answer("The river", io.StringIO())
    assert reply == qtool.generate(loaded, "The river", max_new_tokens=5, chat=False)


# -- 2. ShareGPT rows and JSON errors name the file, the line and the problem ---------------------

@pytest.mark.parametrize(("turns", "problem"), [
    ([{"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Hi"}],
     "turn 1: the conversation opens with the assistant ('gpt')"),
    ([{"from": "system", "value": "Be brief."}, {"from": "gpt", "value": "Hello"}],
     "turn 2: the conversation opens with the assistant ('gpt')"),
    ([{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Yes"}],
     "turn 2: two user turns in a row ('user' then 'user')"),
    ([*GOOD_TURNS, {"from": "gpt", "value": "Also this."}], "turn 3: two assistant turns in a row ('gpt' then 'gpt')"),
    ([{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}], "turn 2: unknown role 'bot'"),
    ([*GOOD_TURNS, {"from": "system", "value": "Now be rude."}], "turn 3: a system turn may only open the conversation"),
])
def test_sharegpt_turn_order_errors_name_file_line_and_problem(tmp_path, tokenizer, turns, problem):
    data = _lines(tmp_path / "chats.jsonl", {"conversations": GOOD_TURNS}, None, {"conversations": turns})
    with pytest.raises(DatasetError) as err:
        _build(data, tokenizer)
    assert f"dataset chats.jsonl, line 3, {problem}" in str(err.value)  # line 3: the blank line 2 counts


def test_json_list_errors_name_the_example_index(tmp_path, tokenizer):
    data = tmp_path / "chats.json"
    data.write_text(json.dumps([{"conversations": GOOD_TURNS}, {"conversations": list(reversed(GOOD_TURNS))}], indent=2))
    with pytest.raises(DatasetError, match=r"dataset chats\.json, example 2, turn 1: the conversation opens with the assistant"):
        _build(data, tokenizer)


def test_jsonl_parse_errors_give_the_file_line(tmp_path, tokenizer):
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"conversations": GOOD_TURNS}) + "\n\n" + json.dumps({"conversations": GOOD_TURNS}) + "\n"
                    + '{"conversations": [{"from": "human" "value": "Hi"}]}\n')
    with pytest.raises(DatasetError) as err:
        _build(data, tokenizer)
    assert f"dataset {data}, line 4 is not valid JSON: Expecting ',' delimiter" in str(err.value)
    assert "line 1 column" not in str(err.value)  # json's own position counts lines of the one line it was given


# -- 5. empty data and data the cutoff empties say which -----------------------------------------

@pytest.mark.parametrize(("name", "text", "fmt"), [
    ("blank.jsonl", "\n  \n", "sharegpt"),
    ("list.json", "[]", "alpaca"),
    ("empty.txt", "", "text"),
])
def test_an_empty_dataset_says_it_has_no_examples(tmp_path, tokenizer, name, text, fmt):
    data = tmp_path / name
    data.write_text(text)
    with pytest.raises(DatasetError, match=f"dataset {data} has no examples"):
        _build(data, tokenizer, fmt)


def test_a_cutoff_that_removes_every_answer_says_so(tmp_path, tokenizer):
    data = _lines(tmp_path / "long.jsonl", {"instruction": "Describe rivers. " * 20, "output": "Water."})
    with pytest.raises(DatasetError) as err:
        _build(data, tokenizer, "alpaca", cutoff_len=16)
    assert str(err.value) == (f"dataset {data}: no example keeps a target token after cutoff_len 16: raise cutoff_len "
                              "or shorten prompts")
    assert len(_build(data, tokenizer, "alpaca", cutoff_len=256).train) == 1  # the same row fits a longer cutoff


# -- 5. an adapter of another base ---------------------------------------------------------------

def test_an_adapter_of_another_base_fails_naming_both(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    other = tmp_path / "narrow-llama"
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    shutil.copy(tiny_llama / "tokenizer.json", other)
    shutil.copy(tiny_llama / "tokenizer_config.json", other)

    chat = subprocess.run([sys.executable, "-m", "qtool.cli", "chat", str(other), "--adapter", f"me={adapter}"],
                          input="Hi\n", capture_output=True, text=True, cwd=REPO, timeout=300)
    assert_one_line_error(chat, f"adapter me ({adapter}) was trained on {tiny_llama}", f"does not fit {other}",
                          "q_proj.lora_A.me.weight is [4, 64] in the adapter but [4, 32] in the model")
    assert "Error(s) in loading state_dict" not in chat.stderr


# -- 4. OUT appears only after validation; a failed one leaves nothing -----------------------------

def _recipe(tmp_path: Path, model: Path, data: Path, fmt: str, quantization: str = "{method: rtn, bits: 4, group_size: 32}",
            lora: str = "{r: 4, alpha: 8}") -> Path:
    path = tmp_path / "qlora.yaml"
    quantized = f"  quantization: {quantization}\n" if quantization else ""
    path.write_text(f"""\
qlora:
  model: {model}
{quantized}  dataset: {{path: {data}, format: {fmt}, cutoff_len: 96}}
  lora: {lora}
  train: {{learning_rate: 1.0e-3, max_steps: 1, batch_size: 2, save_steps: 1}}
  device: cpu
""")
    return path


def _bad_data(tmp_path: Path, tiny_llama: Path) -> tuple[Path, str, Callable[[], object]]:
    """A quantized run (OUT/base comes first) whose ShareGPT data opens a conversation with the assistant."""
    data = _lines(tmp_path / "chats.jsonl", {"conversations": GOOD_TURNS}, {"conversations": list(reversed(GOOD_TURNS))})
    message = "dataset chats.jsonl, line 2, turn 1: the conversation opens with the assistant ('gpt')"
    return _recipe(tmp_path, tiny_llama, data, "sharegpt"), message, \
        lambda: _lines(data, {"conversations": GOOD_TURNS}, {"conversations": GOOD_TURNS})


def _bad_targets_on_full_precision(tmp_path: Path, tiny_llama: Path) -> tuple[Path, str, Callable[[], object]]:
    """A run on the full-precision model (loaded before OUT exists) naming a module it lacks."""
    recipe = _recipe(tmp_path, tiny_llama, IDENTITY, "alpaca", quantization="",
                     lora="{r: 4, alpha: 8, target_modules: [q_proj, qkv_proj]}")
    return recipe, "'qkv_proj' is not a module", lambda: recipe.write_text(recipe.read_text().replace(", qkv_proj", ""))


@pytest.mark.parametrize("case", [_bad_data, _bad_targets_on_full_precision])
def test_a_failed_validation_leaves_no_out_and_the_corrected_command_runs(tiny_llama, tmp_path, case):
    recipe, message, correct = case(tmp_path, tiny_llama)
    out = tmp_path / "run"
    assert_one_line_error(run_qtool("qlora", recipe, "--out", out, "--quiet"), message)
    assert not out.exists()

    correct()
    proc = run_qtool("qlora", recipe, "--out", out, "--quiet")  # no --force, no --resume
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "qtool.json").read_text())["steps"] == 1

    case(tmp_path, tiny_llama)  # broken again: --force must not remove the finished run before validating
    assert_one_line_error(run_qtool("qlora", recipe, "--out", out, "--force"), message)
    assert (out / "qtool.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()


def test_examples_are_identical_with_the_original_and_the_quantized_tokenizer(tiny_llama, tmp_path):
    """qlora tokenises the data with the original's tokenizer before quantizing into OUT/base."""
    out = tmp_path / "rtn"
    qtool.quantize(str(tiny_llama), out, "rtn", bits=4, group_size=32, device="cpu")
    section = DatasetSection(path=str(IDENTITY), cutoff_len=96, val_size=4)
    before = build_examples(section, IDENTITY, qtool.load(tiny_llama, device="cpu").tokenizer, 0)
    after = build_examples(section, IDENTITY, qtool.load(out, device="cpu").tokenizer, 0)
    assert before == after


@pytest.mark.parametrize("output, advice", [("adapter", "its base with --adapter NAME="), ("model", "/model (a plain model folder)")])
def test_a_run_folder_given_as_a_model_says_what_to_use(tmp_path, output, advice):
    from tests.conftest import qtool_in_process

    run = tmp_path / "run"
    run.mkdir()
    (run / "qtool.json").write_text(json.dumps({"qtool_format": 1, "kind": "qlora", "output": output}))
    for command in (["chat", str(run)], ["eval", str(run), "--ppl", "builtin"], ["generate", str(run), "Hi"]):
        result = qtool_in_process(*command)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"qtool: error: {run} is a qtool qlora run folder, not a model: use ")
        assert advice in lines[0]
