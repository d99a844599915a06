"""One prepared check on a CUDA GPU: qtool's backends on real weights, 7B-shaped decode and QLoRA.

Run through `benchmarks/gpu_check.sh` (which installs the carried packages first); each part runs
in its own process under its own time limit and writes one JSON file into --out, rewritten after
every row so that a part cut off by its limit still leaves what it measured:

  smollm2  every qtool backend that can run here: quantize SmolLM2-135M on the device -> save ->
           qtool.load -> token PPL (ctx 512, first 16,384 tokens of WikiText-2 test), with the
           layer classes that ran, next to the CPU figures committed in reports/.
  decode   a Llama-2-7B-shaped model with random weights (fp16, bnb nf4, hqq 4-bit g64 on two hqq
           backends): decode tokens/s at batch 1 and 16 over a static KV cache, eager and as one
           CUDA graph per step (qtool.evaluate.speed.StaticDecoder), peak VRAM, and the share of
           the memory-bandwidth roofline, the bandwidth measured in the same process.
  qlora    LoRA (qtool's default r/alpha/dropout, every linear) on the nf4 7B shape: 20 steps at
           sequence length 512, batch 1, with and without gradient checkpointing: s/step, peak VRAM.

`--dry-run` runs the same code on the CPU with a tiny Llama and a few tokens (tests run it): it
checks the plumbing, not the numbers. Random weights are enough for speed and memory: they have
the real shapes and dtypes; quality is measured only on the real SmolLM2 weights.

The roofline: one decode step must read every weight once plus the KV cache written so far, so
tokens/s <= batch * bandwidth / bytes read per step (decode_bytes_per_step, from the shapes and
each format's bits per weight). Bandwidth is a device-to-device copy of 2 GiB (read + write bytes
/ time), measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512)
CPU_REPORTS = {  # this part's cell -> (committed CPU results file, its cell) at the same protocol
    "base": ("reports/smollm2-cpu/results.jsonl", "base"),
    "rtn-4-g64": ("reports/smollm2-cpu/results.jsonl", "rtn-b4-g64"),
    "hqq-4-g64": ("reports/smollm2-cpu/results.jsonl", "hqq-b4-g64"),
    "bnb-nf4": ("reports/smollm2-cpu/results.jsonl", "bnb-b4"),
    "eetq-int8": ("reports/smollm2-cpu/results.jsonl", "eetq-b8"),
    "gptq-4-g64": ("reports/smollm2-cpu/results.jsonl", "gptq-b4-g64-sym=False"),
    "awq-4-g64": ("reports/smollm2-cpu/results.jsonl", "awq-b4-g64"),
    "aqlm-2x8": ("reports/smollm2-cpu-2bit/results.jsonl", "aqlm-b2-codebooks=2-in_group=8-nbits=8"),
}


# ---- shared ------------------------------------------------------------------------------------
def environment(device: str) -> dict[str, Any]:
    from qtool.runtime import package_versions

    env: dict[str, Any] = {"device": device, "versions": package_versions(), "platform": platform.platform(),
                           "cpu_count": os.cpu_count()}
    env["versions"]["torch_cuda"] = torch.version.cuda
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
    return env


class Part:
    """One part's JSON file, rewritten after every row."""

    def __init__(self, out: Path, name: str, device: str, settings: dict[str, Any]) -> None:
        self.path = out / f"{name}.json"
        self.started = time.perf_counter()
        self.data: dict[str, Any] = {"part": name, "settings": settings, "environment": environment(device),
                                     "rows": [], "finished": False}
        self.save()

    def add(self, row: dict[str, Any]) -> None:
        self.data["rows"].append(row)
        self.save()
        print(json.dumps(row)[:400], flush=True)

    def finish(self) -> None:
        self.data["finished"], self.data["seconds"] = True, round(time.perf_counter() - self.started, 1)
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")


def failure(exc: BaseException) -> dict[str, Any]:
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"status": "failed", "error": f"{type(exc).__name__}: {str(exc)[:500]}", "where": "".join(lines[-4:])[-1500:]}


def free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def layer_classes(model: nn.Module) -> list[str]:
    """Classes of the modules that hold the decoder's projection weights (the kernels that ran)."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return sorted({type(m).__name__ for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names})


def tiny_llama_folder(root: Path) -> Path:
    """The tests' tiny random Llama, with SmolLM2's tokenizer (for --dry-run)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qtool.models import resolve_model

    folder = root / "tiny-llama"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(**TINY, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        resolve_model("smollm2-135m").load_tokenizer().save_pretrained(folder)
    return folder


# ---- part 1: SmolLM2 through every backend -------------------------------------------------------
def smollm2_cells(calib: str, nsamples: int, seqlen: int) -> list[dict[str, Any]]:
    calibrated = {"calib": calib, "nsamples": nsamples, "seqlen": seqlen}
    return [
        {"cell": "base"},
        {"cell": "rtn-4-g64", "method": "rtn", "bits": 4, "group_size": 64},
        {"cell": "hqq-4-g64", "method": "hqq", "bits": 4, "group_size": 64},
        {"cell": "bnb-nf4", "method": "bnb", "bits": 4},
        {"cell": "bnb-int8", "method": "bnb", "bits": 8},
        {"cell": "eetq-int8", "method": "eetq", "bits": 8},
        {"cell": "gptq-4-g64", "method": "gptq", "bits": 4, "group_size": 64, "options": {"sym": "false"}, **calibrated},
        {"cell": "awq-4-g64", "method": "awq", "bits": 4, "group_size": 64, **calibrated},
        {"cell": "autoround-4-g64", "method": "autoround", "bits": 4, "group_size": 64, **calibrated, "slow": True},
        {"cell": "aqlm-2x8", "method": "aqlm", "bits": 2, "options": {"codebooks": "2", "nbits": "8", "in_group": "8"},
         **calibrated, "slow": True},
    ]


def cpu_reference(cell: str) -> dict[str, Any] | None:
    if cell not in CPU_REPORTS:
        return None
    path, name = CPU_REPORTS[cell]
    for line in (REPO / path).read_text().splitlines():
        row = json.loads(line)
        if row["cell"] == name and row.get("perplexity"):
            return {"report": path, "cell": name, "ppl": row["perplexity"]["ppl"],
                    "tokens_scored": row["perplexity"]["tokens_scored"],
                    "quantize_s": ((row.get("quantization") or {}).get("timings_s") or {}).get("quantize")}
    return None


def run_smollm2(args: argparse.Namespace) -> None:

    device = "cpu" if args.dry_run else "cuda"
    work = Path(tempfile.mkdtemp(prefix="qtool-gpu-check-"))
    model = str(tiny_llama_folder(work)) if args.dry_run else "smollm2-135m"
    ctx, max_tokens = (128, 1024) if args.dry_run else (512, 16384)
    nsamples, seqlen = (8, 64) if args.dry_run else (16, 256)
    settings = {"model": model, "ctx": ctx, "max_tokens": max_tokens, "text": args.text, "calib": args.calib,
                "nsamples": nsamples, "seqlen": seqlen, "protocol": "token-ppl, non-overlapping windows, no BOS"}
    part = Part(args.out, "smollm2", device, settings)
    try:
        smollm2_rows(args, part, work, model, device, ctx, max_tokens, nsamples, seqlen)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    part.finish()


def smollm2_rows(args: argparse.Namespace, part: Part, work: Path, model: str, device: str, ctx: int,
                 max_tokens: int, nsamples: int, seqlen: int) -> None:
    import qtool
    from qtool import backends

    deadline = time.perf_counter() + args.budget_s
    for cell in smollm2_cells(args.calib, nsamples, seqlen):
        if args.cells and cell["cell"] not in args.cells:
            continue
        row: dict[str, Any] = {"cell": cell["cell"], "cpu_reference": cpu_reference(cell["cell"])}
        method = cell.get("method")
        reason = backends.get(method).unavailable_reason(device) if method else None
        left = deadline - time.perf_counter()
        if reason:
            part.add({**row, "status": "skipped", "reason": reason})
            continue
        if cell.get("slow") and args.dry_run:
            part.add({**row, "status": "skipped", "reason": "dry run: slow cells are left out (their path is the other calibrated cells')"})
            continue
        if cell.get("slow") and left < args.slow_cell_s:
            part.add({**row, "status": "skipped", "reason": f"time budget: {left:.0f} s left, this cell needs ~{args.slow_cell_s} s"})
            continue
        try:
            start = time.perf_counter()
            if method:
                folder = work / cell["cell"]
                record = qtool.quantize(model, folder, method, cell.get("bits"), cell.get("group_size"),
                                        cell.get("options"), device=device, force=True, calib=cell.get("calib"),
                                        nsamples=cell.get("nsamples"), seqlen=cell.get("seqlen"))
                row.update(kernel=record.get("kernel"), timings_s=record.get("timings_s"),
                           peak_memory_mib=record.get("peak_memory_mib"), peak_memory_kind=record.get("peak_memory_kind"),
                           effective_bits=record.get("effective_bits_per_weight"), weights_bytes=record.get("weights_bytes"))
                loaded = qtool.load(folder, device=device)
            else:
                loaded = qtool.load(model, device=device)
            ppl = qtool.evaluate_perplexity(loaded, args.text, ctx=ctx, max_tokens=max_tokens, progress=False)
            row.update(status="ok", layer_classes=layer_classes(loaded.model),
                       dtype=str(next(loaded.model.parameters()).dtype), ppl=ppl.ppl, tokens_scored=ppl.tokens_scored,
                       ppl_seconds=round(ppl.seconds, 2) if hasattr(ppl, "seconds") else None,
                       cell_seconds=round(time.perf_counter() - start, 1))
            reference = row["cpu_reference"]
            if reference:
                row["ppl_vs_cpu_pct"] = round(100 * (ppl.ppl / reference["ppl"] - 1), 2)
            del loaded
        except Exception as exc:  # one broken backend must not hide the others' numbers
            row.update(failure(exc))
        part.add(row)
        free(device)


# ---- part 2: 7B-shaped decode --------------------------------------------------------------------
def random_llama(shape: dict[str, int], dtype: torch.dtype, device: str) -> nn.Module:
    """A Llama with the given shape and random weights, built directly on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


def decoder_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) for every nn.Linear inside the decoder blocks (the head excluded)."""
    return [(parent, name, child) for parent in model.model.layers.modules()
            for name, child in parent.named_children() if isinstance(child, nn.Linear)]


def to_bnb_nf4(model: nn.Module, compute_dtype: torch.dtype, device: str) -> nn.Module:
    """Replace the decoder's linears by bitsandbytes Linear4bit (NF4, double quant, blocks of 64), in place.

    The same layer transformers' BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True) builds, made from weights already in memory.
    """
    import bitsandbytes as bnb

    for parent, name, linear in decoder_linears(model):
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", module=layer)._quantize(device)
        setattr(parent, name, layer)
    free(device)
    return model


def to_hqq(model: nn.Module, compute_dtype: torch.dtype, device: str, backend: str) -> nn.Module:
    """hqq 4-bit g64 (hqq's own API, as qtool's hqq backend), then hqq's inference backend `backend`.

    backend "pytorch": hqq's default (dequantize, then a dense matmul); "torchao_int4": hqq's
    patch onto PyTorch's tinygemm int4 kernel (aten._weight_int4pack_mm, bf16 only).
    """
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    config = BaseQuantizeConfig(nbits=4, group_size=64, quant_zero=False, quant_scale=False,
                                axis=1 if backend == "torchao_int4" else 0)
    AutoHQQHFModel.quantize_model(model, quant_config=config, compute_dtype=compute_dtype, device=device)
    if backend != "pytorch":
        from hqq.utils.patching import prepare_for_inference

        # hqq 0.2.8 picks the int4pack input layout with float(torch.__version__[:3]) >= 2.5, which
        # reads torch 2.11 as 2.1 and takes the pre-2.5 layout; the version is shown as 2.9 meanwhile.
        version = torch.__version__
        torch.__version__ = "2.9"  # type: ignore[assignment]
        try:
            prepare_for_inference(model, backend=backend)
        finally:
            torch.__version__ = version  # type: ignore[assignment]
    free(device)
    return model


def copy_bandwidth_gbs(device: str, gib: float) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written (GB/s)."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    times = []
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del src, dst
    return 2 * gib * 2**30 / statistics.median(times) / 1e9


# Storage bits per quantized weight, scales and zeros included (the decoder's linears only).
BITS_PER_WEIGHT = {
    "fp16": 16.0,
    "bnb-nf4": 4 + 8 / 64 + 32 / (64 * 256),  # 4-bit codes; int8 absmax per 64; fp32 per 256 absmax (double quant)
    "hqq-4-g64-tinygemm": 4 + 2 * 16 / 64,  # int4 codes; bf16 scale and zero per group of 64
    "hqq-4-g64-pytorch": 4 + 2 * 16 / 64,
}


def decode_bytes_per_step(shape: dict[str, int], bits_per_weight: float, batch: int, context: int) -> float:
    """Bytes one decode step must read from memory, from the shapes (16-bit embedding, head, norms, KV).

    The decoder's linears at `bits_per_weight`, the head in full, one embedding row per sequence,
    the norms, and the K and V of `context` earlier tokens per sequence and layer. Counting from
    shapes, not from the tensors a model holds: bnb and hqq keep their scales outside the module's
    parameters and buffers, where a tensor walk does not see them.
    """
    hidden, inter, layers, vocab = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    head_dim = hidden // shape["num_attention_heads"]
    kv_width = shape["num_key_value_heads"] * head_dim
    linear = layers * (2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * inter)
    dense16 = vocab * hidden + batch * hidden + (2 * layers + 1) * hidden  # head, embedding rows, norms
    kv = 2 * layers * batch * context * kv_width
    return linear * bits_per_weight / 8 + 2 * (dense16 + kv)


def run_decode(args: argparse.Namespace) -> None:
    from qtool.evaluate.speed import measure_static_decode

    device = "cpu" if args.dry_run else "cuda"
    shape = TINY if args.dry_run else LLAMA_7B
    batches = [1, 2] if args.dry_run else [1, 16]
    prompt_len, new_tokens, repeats = (16, 8, 1) if args.dry_run else (128, 48, 2)
    bandwidth = copy_bandwidth_gbs(device, 0.01 if args.dry_run else 2.0)
    settings = {"shape": shape, "batches": batches, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
                "repeats": repeats, "attention": "sdpa", "kv_cache": "transformers StaticCache",
                "copy_bandwidth_gb_s": round(bandwidth, 1)}
    part = Part(args.out, "decode", device, settings)
    deadline = time.perf_counter() + args.budget_s
    prompt = torch.randint(0, shape["vocab_size"], (prompt_len,), generator=torch.Generator().manual_seed(0))
    variants = [  # name, weight dtype, compute dtype, conversion
        ("fp16", torch.float16, lambda m: m, "dense fp16 matmul (cuBLAS)"),
        ("bnb-nf4", torch.float16, lambda m: to_bnb_nf4(m, torch.float16, device), "bitsandbytes Linear4bit nf4 (gemv at batch 1)"),
        ("hqq-4-g64-tinygemm", torch.bfloat16, lambda m: to_hqq(m, torch.bfloat16, device, "torchao_int4"),
         "hqq patched onto PyTorch tinygemm (aten._weight_int4pack_mm)"),
        ("hqq-4-g64-pytorch", torch.bfloat16, lambda m: to_hqq(m, torch.bfloat16, device, "pytorch"),
         "hqq pytorch backend (dequantize + dense matmul)"),
    ]
    for name, dtype, convert, kernel in variants:
        if time.perf_counter() > deadline:
            part.add({"variant": name, "status": "skipped", "reason": "time budget"})
            continue
        try:
            start = time.perf_counter()
            before = torch.cuda.memory_allocated() if device == "cuda" else 0
            model = convert(random_llama(shape, dtype, device))
            setup_s = time.perf_counter() - start
            resident = torch.cuda.memory_allocated() - before if device == "cuda" else None
            row: dict[str, Any] = {"variant": name, "kernel": kernel, "dtype": str(dtype),
                                   "bits_per_weight": BITS_PER_WEIGHT[name], "layer_classes": layer_classes(model),
                                   "weights_resident_bytes": resident,
                                   "setup_s": round(setup_s, 1), "runs": []}
            for batch in batches:
                for graph in (True, False) if device == "cuda" else (False,):
                    if time.perf_counter() > deadline:
                        row["runs"].append({"batch": batch, "cuda_graph": graph, "status": "skipped: time budget"})
                        continue
                    try:
                        result = measure_static_decode(model, prompt, batch, new_tokens, repeats, cuda_graph=graph)
                        run = result.as_dict()
                        step_bytes = decode_bytes_per_step(shape, BITS_PER_WEIGHT[name], batch, prompt_len + new_tokens // 2)
                        roofline = batch * bandwidth * 1e9 / step_bytes
                        run.update(cuda_graph_requested=graph, roofline_tokens_per_s=round(roofline, 1),
                                   pct_of_roofline=round(100 * result.decode_tokens_per_s.median / roofline, 1))
                    except Exception as exc:
                        run = {"batch": batch, "cuda_graph_requested": graph, **failure(exc)}
                    row["runs"].append(run)
            row["status"] = "ok"
            del model
        except Exception as exc:
            row = {"variant": name, **failure(exc)}
        part.add(row)
        free(device)
    part.finish()


# ---- part 3: QLoRA on the nf4 7B shape ----------------------------------------------------------
def run_qlora(args: argparse.Namespace) -> None:
    from peft import LoraConfig, get_peft_model

    from qtool.finetune.recipe import LoraSection

    device = "cpu" if args.dry_run else "cuda"
    shape = TINY if args.dry_run else LLAMA_7B
    steps, seqlen = (3, 32) if args.dry_run else (20, 512)
    lora = LoraSection()
    settings = {"shape": shape, "steps": steps, "seqlen": seqlen, "batch": 1, "base": "bnb nf4, double quant",
                "compute_dtype": "bfloat16", "lora": {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
                                                      "targets": "every decoder linear"},
                "optimizer": "torch AdamW lr 2e-4 on the LoRA weights", "data": "random token ids (random weights)"}
    part = Part(args.out, "qlora", device, settings)
    for checkpointing in (True, False):
        row: dict[str, Any] = {"gradient_checkpointing": checkpointing}
        try:
            model = to_bnb_nf4(random_llama(shape, torch.bfloat16, device), torch.bfloat16, device)
            model.is_loaded_in_4bit = True  # PEFT then wraps the layers with its bnb 4-bit LoRA class
            model.config.use_cache = False
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
            config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
            peft_model = get_peft_model(model, config)
            peft_model.train()
            trainable = [p for p in peft_model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=2e-4)
            data = torch.randint(0, shape["vocab_size"], (steps, 1, seqlen), generator=torch.Generator().manual_seed(0))
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times, losses = [], []
            for step in range(steps):
                ids = data[step].to(device)
                start = time.perf_counter()
                loss = peft_model(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
                losses.append(round(loss.item(), 4))
            row.update(status="ok", trainable_parameters=sum(p.numel() for p in trainable),
                       layer_classes=layer_classes(model), s_per_step_median=round(statistics.median(times[1:] or times), 4),
                       s_first_step=round(times[0], 3), losses=losses)
            if device == "cuda":
                row.update(peak_vram_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                           peak_vram_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2))
            del peft_model, model, optimizer
        except Exception as exc:
            row.update(failure(exc))
        part.add(row)
        free(device)
    part.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["smollm2", "decode", "qlora"])
    parser.add_argument("--out", type=Path, required=True, help="folder for <part>.json")
    parser.add_argument("--dry-run", action="store_true", help="the same code on CPU with a tiny model")
    parser.add_argument("--text", default=str(REPO.parent / "shared/data/wikitext-2/test.txt"), help="evaluation text")
    parser.add_argument("--calib", default=str(REPO.parent / "shared/data/wikitext-2/valid.txt"), help="calibration text")
    parser.add_argument("--budget-s", type=float, default=150, help="start no new row after this many seconds")
    parser.add_argument("--slow-cell-s", type=float, default=60, help="seconds a slow cell (aqlm) needs to be started")
    parser.add_argument("--cells", nargs="*", help="smollm2 part: only these cells (default: all)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    {"smollm2": run_smollm2, "decode": run_decode, "qlora": run_qlora}[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
