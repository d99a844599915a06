"""Multi-process fine-tuning and finetuning_type, on the tiny Llama, on CPU (gloo), for real.

The 2-process runs use `qtool qlora --nproc 2` (torch's elastic launcher, 1 OpenMP thread per
rank). Each rank writes its own view (the losses it logged, a sha256 of its trainable weights)
through QTOOL_RANK_LOG_DIR; the tests compare the ranks' views with each other and with the one
adapter that rank 0 saved.
"""

from __future__ import annotations

import hashlib
import json
import math
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    REPO,
    assert_one_line_error,
    interrupt_qtool_when,
    qtool_in_process,
    run_qtool,
)

IDENTITY = REPO / "recipes" / "data" / "identity.jsonl"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _recipe(tmp_path: Path, model: Path, name: str = "qlora.yaml", head: str = "",
            quantization: str | None = "{method: rtn, bits: 4, group_size: 32}",
            train: str = "{learning_rate: 1.0e-3, max_steps: 4, batch_size: 2, save_steps: 2}",
            lora: str = "{r: 4, alpha: 8}") -> Path:
    path = tmp_path / name
    path.write_text(f"""\
qlora:
  model: {model}
{head}{f"  quantization: {quantization}" + chr(10) if quantization else ""}\
  dataset: {{path: {IDENTITY}, format: alpaca, cutoff_len: 96, val_size: 4}}
  lora: {lora}
  train: {train}
  device: cpu
""")
    return path


def _rank_views(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]


def _adapter_sha256(adapter: Path) -> str:
    """The saved adapter's weights hashed as write_rank_view hashes a rank's trainable weights
    (PEFT drops the adapter name 'default' from the tensor names when it saves)."""
    from safetensors.torch import load_file

    tensors = {name.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): t
               for name, t in load_file(adapter / "adapter_model.safetensors").items()}
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_two_process_ddp_qlora_agrees_across_ranks_writes_once_and_resumes(tiny_llama, tmp_path):
    recipe = _recipe(tmp_path, tiny_llama, quantization="{method: hqq, bits: 4, group_size: 32}",
                     train="{learning_rate: 1.0e-2, max_steps: 10, batch_size: 2, save_steps: 2}")
    out, ranks = tmp_path / "run", tmp_path / "ranks"
    env = {**ONE_THREAD, "QTOOL_RANK_LOG_DIR": str(ranks)}
    saved = out / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    code, stderr = interrupt_qtool_when(["qlora", recipe, "--out", out, "--nproc", "2", "--quiet"], saved.exists)
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1].endswith(f"--out {out} --nproc 2 --resume") and "Traceback" not in stderr
    assert not (out / "qtool.json").exists()

    proc = run_qtool("qlora", recipe, "--out", out, "--nproc", "2", "--resume", "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1 and "10 steps x 2 processes (ddp)" in proc.stdout  # rank 0 speaks
    record = json.loads((out / "qtool.json").read_text())
    assert record["steps"] == 10 and int(record["resumed_from"].split("-")[1]) >= 4
    assert record["distributed"] == {"world_size": 2, "backend": "gloo", "mode": "ddp", "per_device_batch_size": 2,
                                     "gradient_accumulation_steps": 1, "global_batch_size": 4,
                                     "launcher": "qtool --nproc (torch elastic)"}
    views = _rank_views(ranks)
    assert [v["rank"] for v in views] == [0, 1]
    assert views[0]["losses"] == views[1]["losses"] and len(views[0]["losses"]) == 10
    assert all(math.isfinite(loss) for loss in views[0]["losses"])
    assert views[0]["losses"][-1] < views[0]["losses"][0]  # the loss falls
    assert views[0]["trainable_sha256"] == views[1]["trainable_sha256"] == _adapter_sha256(out / "adapter")
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 11))  # one log, every step once: rank 1 wrote none
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qlora.yaml", "ranks", "run"]  # exactly one run folder
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "base", "checkpoints", "loss.png", "qtool.json",
                                                    "train_log.jsonl"]


def test_multi_process_errors_are_one_line_and_leave_nothing(tiny_llama, tmp_path):
    # a bad LoRA target fails on both ranks, after the launch: the ranks agree, rank 0 says it once
    bad = _recipe(tmp_path, tiny_llama, lora="{r: 4, alpha: 8, target_modules: [nope]}")
    assert_one_line_error(run_qtool("qlora", bad, "--out", tmp_path / "bad", "--nproc", "2", env=ONE_THREAD),
                          "lora.target_modules: 'nope' is not a module")
    assert not (tmp_path / "bad").exists()
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "qtool.json").write_text("{}")
    good = _recipe(tmp_path, tiny_llama, name="good.yaml")
    assert_one_line_error(qtool_in_process("qlora", good, "--out", tmp_path / "done", "--nproc", "2"),
                          "holds a finished run", "--force")
    assert_one_line_error(qtool_in_process("qlora", good, "--nproc", "0"), "--nproc takes a positive number")


def test_fsdp_on_cpu_is_refused_with_the_reason(tiny_llama, tmp_path):
    # measured: accelerate 1.15 switches to FSDP only for multi-accelerator runs; on CPU the Trainer
    # silently ran plain DDP (distributed type MULTI_CPU) with fsdp="full_shard" set
    recipe = _recipe(tmp_path, tiny_llama, train="{max_steps: 2, distributed: fsdp}")
    for extra in ([], ["--nproc", "2"]):
        assert_one_line_error(qtool_in_process("qlora", recipe, "--out", tmp_path / "run", *extra),
                              "train.distributed: fsdp needs GPUs", "plain DDP on CPU")
    assert not (tmp_path / "run").exists()


def test_deepspeed_config_is_checked_before_any_work(tiny_llama, tmp_path):
    cases = {"missing.json": (None, "not found"), "text.json": ("{not json", "is not readable JSON"),
             "list.json": ("[]", "is not a JSON object"),
             "zero1.json": ('{"zero_optimization": {"stage": 1}}', "zero_optimization.stage 1")}
    for name, (body, needle) in cases.items():
        if body is not None:
            (tmp_path / name).write_text(body)
        recipe = _recipe(tmp_path, tiny_llama, train=f"{{max_steps: 2, deepspeed: {name}}}")  # beside the recipe
        assert_one_line_error(qtool_in_process("qlora", recipe, "--out", tmp_path / "run", "--nproc", "2"),
                              f"train.deepspeed: {'' if body is None else tmp_path}", needle)
    both = _recipe(tmp_path, tiny_llama, train="{deepspeed: zero1.json, distributed: fsdp}")
    assert_one_line_error(qtool_in_process("qlora", both, "--out", tmp_path / "run"), "exclude each other")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(find_spec("deepspeed") is not None, reason="deepspeed is installed: the real run is tested instead")
def test_deepspeed_config_without_deepspeed_is_one_line(tiny_llama, tmp_path):
    (tmp_path / "zero2.json").write_text('{"zero_optimization": {"stage": 2}}')
    recipe = _recipe(tmp_path, tiny_llama, train="{max_steps: 2, deepspeed: zero2.json}")
    assert_one_line_error(qtool_in_process("qlora", recipe, "--out", tmp_path / "run", "--nproc", "2"),
                          "needs the deepspeed package")


def test_a_checked_deepspeed_config_reaches_the_trainer(tiny_llama, tmp_path):
    from qtool.finetune.distributed import check_deepspeed_config
    from qtool.finetune.recipe import load_qlora_recipe
    from qtool.finetune.train import distributed_args

    (tmp_path / "zero3.json").write_text('{"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}')
    recipe = load_qlora_recipe(str(_recipe(tmp_path, tiny_llama, train="{deepspeed: zero3.json}")))
    path = check_deepspeed_config(recipe.train.deepspeed, recipe.path)
    assert path == str((tmp_path / "zero3.json").resolve())
    assert distributed_args(recipe, "cpu", path, True, "gloo") == {"ddp_backend": "gloo", "ddp_find_unused_parameters": False,
                                                                   "deepspeed": path}
    assert distributed_args(recipe, "cpu", None, False, "gloo") == {}


@pytest.mark.slow
@pytest.mark.skipif(find_spec("deepspeed") is None,
                    reason="deepspeed is not installed in this venv (measured: 0.19.8 installs with pip --target "
                           "--no-build-isolation beside torch 2.13+cpu and runs ZeRO-2 and ZeRO-3 on gloo; its first run JIT-builds "
                           "an op for ~2 min)")
@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_deepspeed_zero_qlora(tiny_llama, tmp_path, stage):
    (tmp_path / "zero.json").write_text(json.dumps({
        "zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}))
    recipe = _recipe(tmp_path, tiny_llama, quantization=None,
                     train="{learning_rate: 1.0e-2, max_steps: 4, batch_size: 2, save_steps: 4, deepspeed: zero.json}")
    out, ranks = tmp_path / "run", tmp_path / "ranks"
    proc = run_qtool("qlora", recipe, "--out", out, "--nproc", "2", "--quiet",
                     env={**ONE_THREAD, "QTOOL_RANK_LOG_DIR": str(ranks)})
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "qtool.json").read_text())
    assert record["distributed"]["mode"] == "deepspeed" and record["steps"] == 4
    views = _rank_views(ranks)
    assert views[0]["losses"] == views[1]["losses"] and all(math.isfinite(x) for x in views[0]["losses"])
    assert views[0]["trainable_sha256"] == views[1]["trainable_sha256"] == _adapter_sha256(out / "adapter")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_freeze_trains_only_the_last_layers_and_writes_a_model(tiny_llama, tmp_path):
    recipe = _recipe(tmp_path, tiny_llama, quantization=None, head="  finetuning_type: freeze\n  freeze_trainable_layers: 1\n",
                     train="{learning_rate: 1.0e-2, max_steps: 3, batch_size: 2, save_steps: 3}")
    out = tmp_path / "run"
    proc = run_qtool("qlora", recipe, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "freeze-tuned model" in proc.stdout
    record = json.loads((out / "qtool.json").read_text())
    before, after = _weights(tiny_llama), _weights(out / "model")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    last = {name for name in before if name.startswith("model.layers.1.")}
    assert changed == last  # layer 1 entirely (its norms too), nothing of layer 0, the embeddings or the final norm
    assert record["finetuning_type"] == "freeze" and record["trainable_layers"] == 1 and record["lora_targets"] is None
    assert record["trainable_parameters"] == sum(before[n].numel() for n in last)
    assert not (out / "adapter").exists() and (out / "model" / "tokenizer.json").exists()

    # the model folder is a model to qtool; where an adapter is expected, the run is refused in one line
    from qtool import api

    assert torch.equal(api.load(str(out / "model"), device="cpu").model.state_dict()["model.layers.1.mlp.up_proj.weight"],
                       after["model.layers.1.mlp.up_proj.weight"])
    proc = qtool_in_process("quantize", out / "model", tmp_path / "q", "--method", "rtn", "--bits", "4",
                            "--group-size", "32", "--quiet")
    assert proc.returncode == 0, proc.stderr
    for argv in (["chat", tiny_llama, "--adapter", f"me={out}"], ["merge", tiny_llama, out, tmp_path / "m"]):
        assert_one_line_error(qtool_in_process(*argv), "is a freeze fine-tuning run", f"{out / 'model'}")


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_full_fine_tuning_changes_every_weight(tiny_llama, tmp_path, nproc):
    recipe = _recipe(tmp_path, tiny_llama, quantization=None, head="  finetuning_type: full\n",
                     train="{learning_rate: 1.0e-2, max_steps: 3, batch_size: 2, save_steps: 3}")
    out, ranks = tmp_path / "run", tmp_path / "ranks"
    proc = run_qtool("qlora", recipe, "--out", out, "--nproc", str(nproc), "--quiet",
                     env={**ONE_THREAD, "QTOOL_RANK_LOG_DIR": str(ranks)})
    assert proc.returncode == 0, proc.stderr
    before, after = _weights(tiny_llama), _weights(out / "model")
    assert all(not torch.equal(before[name], after[name]) for name in before)
    record = json.loads((out / "qtool.json").read_text())
    assert record["trainable_parameters"] == record["base_parameters"] == sum(t.numel() for t in before.values())
    assert record["distributed"]["world_size"] == nproc
    views = _rank_views(ranks)
    assert len(views) == nproc and all(v["trainable_sha256"] == views[0]["trainable_sha256"] for v in views)
    assert all(v["losses"] == views[0]["losses"] for v in views)


def test_freeze_and_full_refuse_a_quantized_base_before_loading(tiny_llama, tmp_path):
    from qtool import api

    recipe = _recipe(tmp_path, tiny_llama, head="  finetuning_type: full\n")
    assert_one_line_error(qtool_in_process("qlora", recipe, "--out", tmp_path / "run"),
                          "finetuning_type full trains the base's own weights", "drop 'quantization'")
    quantized = tmp_path / "rtn4"
    api.quantize(str(tiny_llama), quantized, method="rtn", bits=4, group_size=32)
    recipe = _recipe(tmp_path, quantized, quantization=None, head="  finetuning_type: freeze\n")
    assert_one_line_error(qtool_in_process("qlora", recipe, "--out", tmp_path / "run"),
                          f"{quantized} is rtn-quantized", "full-precision")
    recipe = _recipe(tmp_path, tiny_llama, quantization=None, head="  finetuning_type: freeze\n  freeze_trainable_layers: 3\n")
    assert_one_line_error(qtool_in_process("qlora", recipe, "--out", tmp_path / "run"), "has 2 decoder layers")
    recipe = _recipe(tmp_path, tiny_llama, quantization=None, head="  freeze_trainable_layers: 1\n")
    assert_one_line_error(qtool_in_process("qlora", recipe, "--out", tmp_path / "run"), "is for finetuning_type: freeze")
    assert not (tmp_path / "run").exists()
