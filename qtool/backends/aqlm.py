"""AQLM (Egiazarian et al., 2024): additive codebook quantization, 2 bits per weight and below.

The `aqlm` package runs AQLM checkpoints (Numba on CPU, Triton/CUDA on GPU) but cannot make
them, and no maintained library can; qtool's own quantizer is `_additive.py`. This module drives
it through the model the GPTQ way: calibration activations enter the first decoder block, every
Linear of the block is quantized against its input statistics H = X^T X, optionally the block's
codebooks and scales are fine-tuned to reproduce the full-precision block's outputs, and the
quantized block's outputs feed the next block. Only one block's activations are resident.

Each finished block is written to a resume folder beside OUT, so `qtool quantize ... --resume`
after an interruption continues at the first unfinished block and, with the same seed, ends in
the same checkpoint as an uninterrupted run.

OUT is the `aqlm` checkpoint format: codes/codebooks/scales per Linear and an `aqlm`
`quantization_config` in config.json, so `AutoModelForCausalLM.from_pretrained(OUT)` loads it
with the `aqlm` package installed. On CPU its Numba kernel must run with NUMBA_NUM_THREADS=1:
with more threads its parallel loop adds into shared outputs and returns wrong numbers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from qtool.backends import register
from qtool.backends._additive import (
    AqSettings,
    pack_codes,
    quantize_layer,
    reconstruct,
    unpack_codes,
)
from qtool.backends._blocks import block_inputs, block_linears, decoder_blocks, run_block
from qtool.backends.base import Backend, Capabilities, Quantized, QuantSpec
from qtool.calibration import CalibrationSet
from qtool.errors import QtoolError, SpecError
from qtool.models import ModelSource


@dataclass
class AqlmOptions:
    codebooks: int = field(default=2, metadata={"help": "number of additive codebooks M (2x8 is the CPU-fast kernel; 1x16 the GPU default)"})
    nbits: int = field(default=8, metadata={"help": "bits per code; each codebook holds 2**nbits vectors"})
    in_group: int = field(default=8, metadata={"help": "input weights per code group; bits/weight = codebooks * nbits / in_group"})
    rounds: int = field(default=3, metadata={"help": "alternating rounds of code search and codebook Adam per layer"})
    beam: int = field(default=4, metadata={"help": "beam width of the code search"})
    adam_steps: int = field(default=40, metadata={"help": "Adam steps on codebooks and scales per round"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate for codebooks and scales"})
    finetune_steps: int = field(default=0, metadata={"help": "Adam steps per decoder block matching the full-precision block's outputs (0: off)"})
    damp: float = field(default=0.01, metadata={"help": "added to H's diagonal, as a fraction of its mean"})


class ResumeStateError(QtoolError):
    pass


class AqLinear(nn.Module):
    """A Linear held as AQLM codes, differentiable in codebooks and scales (used while quantizing).

    Parameter names and shapes are those of aqlm.QuantizedLinear, so its state dict is the checkpoint.
    """

    def __init__(self, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, nbits: int):
        super().__init__()
        m, k, g = codebooks.shape
        self.nbits, self.in_features, self.out_features = nbits, codes.shape[1] * g, codes.shape[0]
        self.codes = nn.Parameter(pack_codes(codes, nbits), requires_grad=False)
        self.codebooks = nn.Parameter(codebooks.reshape(m, k, 1, g).clone())
        self.scales = nn.Parameter(scales.reshape(-1, 1, 1, 1).clone())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def weight(self) -> torch.Tensor:
        m, k, _, g = self.codebooks.shape
        return reconstruct(unpack_codes(self.codes, self.nbits), self.codebooks.reshape(m, k, g), self.scales.flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), self.bias)


@register
class AqlmBackend(Backend):
    name = "aqlm"
    summary = "AQLM: qtool's own additive-codebook quantizer (calibrated, ~2 bits/weight), aqlm package kernels"
    capabilities = Capabilities(
        bits=(1, 2, 3, 4),
        needs_calibration=True,
        devices=("cpu", "cuda"),
        serializable=True,
        peft_trainable=False,  # PEFT has no LoRA layer for aqlm.QuantizedLinear on CPU (FACTS)
        packages={"aqlm": "aqlm", "numba": "aqlm"},
        group_sizes=(-1,),
        format="AQLM (codes + codebooks + scales; aqlm quantization_config): transformers + aqlm, vLLM",
    )
    Options = AqlmOptions
    default_bits = 2
    default_group_size = -1
    resumable = True

    def check_spec(self, spec: QuantSpec) -> None:
        o = spec.options
        if not 1 <= o.codebooks <= 8 or not 1 <= o.nbits <= 16 or o.in_group < 1:
            raise SpecError(f"aqlm needs 1..8 codebooks, 1..16 bits per code and in_group >= 1 (got {o.codebooks}x{o.nbits}, in_group {o.in_group})")
        bits = o.codebooks * o.nbits / o.in_group
        if bits != spec.bits:
            raise SpecError(f"aqlm {o.codebooks}x{o.nbits} codebooks over groups of {o.in_group} make {bits:g} bits per weight, "
                            f"not --bits {spec.bits}; change --bits or the codebook options")
        if o.rounds < 1 or o.beam < 1 or o.adam_steps < 0 or o.finetune_steps < 0:
            raise SpecError("aqlm rounds and beam must be >= 1; adam_steps and finetune_steps >= 0")

    def check_layers(self, spec: QuantSpec, linears: dict[str, nn.Linear]) -> None:
        bad = sorted({m.in_features for m in linears.values() if m.in_features % spec.options.in_group})
        if bad:
            raise SpecError(f"aqlm in_group {spec.options.in_group} does not divide the layer width {', '.join(map(str, bad))}")

    def effective_bits(self, spec: QuantSpec) -> float:
        o = spec.options
        return o.codebooks * o.nbits / o.in_group  # codebooks and per-row scales add < 0.1 bit on 576-wide layers

    def kernel(self, device: str) -> str:
        if device == "cpu":
            return "aqlm package: Numba LUT kernel for 8-bit codebooks (one thread), dequantize + matmul otherwise"
        return "aqlm package CUDA/Triton kernels (1x16, 2x8, 1x8 have CUDA kernels), picked at load"

    def lora_unsupported_reason(self, device: str) -> str | None:
        if device == "cpu":  # measured with peft 0.21 and aqlm 1.1.7
            return ("the aqlm CPU kernel returns a view that PEFT's AqlmLoraLinear adds to in place, "
                    "which autograd forbids at the first step")
        return None

    # ---- quantize -------------------------------------------------------------------------
    def quantize(self, source: ModelSource, spec: QuantSpec, device: str, calibration: CalibrationSet | None = None,
                 workdir: Path | None = None) -> Quantized:
        assert calibration is not None
        o = spec.options
        settings = AqSettings(o.codebooks, o.nbits, o.in_group, o.rounds, o.beam, o.adam_steps, o.lr)
        model = source.load_model(device, torch.float32)
        model.config.use_cache = False
        blocks = decoder_blocks(model)
        state = ResumeState(workdir, spec, calibration) if workdir else None
        ids = torch.tensor(calibration.samples, device=device)
        hidden, kwargs = block_inputs(model, blocks[0], ids)
        losses: list[dict[str, Any]] = []
        bar = tqdm(total=len(blocks), desc="aqlm", unit="block", dynamic_ncols=True)
        for index, block in enumerate(blocks):
            saved = state.load_block(index) if state else None
            if saved is not None:
                install_layers(block, saved, o.nbits)
                losses.extend(saved_losses(state, index))
                bar.set_postfix_str(f"block {index} resumed")
            else:
                layer_losses = quantize_block(block, hidden, kwargs, settings, o, spec.seed * 1_000_003 + index * 64, bar, index)
                losses.extend(layer_losses)
                if state:
                    state.save_block(index, block, layer_losses)
            with torch.no_grad():
                hidden = run_block(block, hidden, kwargs)
            bar.update(1)
        bar.close()
        return Quantized(model, losses)

    def save(self, model: nn.Module, out: Path) -> None:
        first = next(m for m in model.modules() if isinstance(m, AqLinear))
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        m, k, _, g = first.codebooks.shape
        model.config.quantization_config = {
            "quant_method": "aqlm", "in_group_size": g, "out_group_size": 1, "num_codebooks": m,
            "nbits_per_codebook": first.nbits, "linear_weights_not_to_quantize": ["lm_head"],
        }
        model.config.use_cache = True
        model.config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)

    def load(self, path: Path, device: str) -> nn.Module:
        single_thread_numba()
        # the aqlm kernels want fp32 on CPU and run fp16/bf16 on GPU
        return ModelSource(str(path), "folder", str(path)).load_model(device, torch.float32 if device == "cpu" else torch.float16)


def single_thread_numba() -> None:
    """aqlm's Numba CPU kernel races with more than one thread (wrong outputs): run it on one.

    Before Numba is imported the environment variable does it. Once imported, Numba refuses a
    changed NUMBA_NUM_THREADS at its next compile, so only the calling thread's count is lowered.
    """
    import sys

    if "numba" not in sys.modules:
        os.environ["NUMBA_NUM_THREADS"] = "1"
        return
    import numba

    numba.set_num_threads(1)


def input_statistics(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], damp: float) -> dict[str, torch.Tensor]:
    """H = X^T X / tokens for every Linear's input in the block, plus damping."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Callable:
        def accumulate(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return accumulate

    handles = [m.register_forward_hook(hook(n)) for n, m in block_linears(block).items()]
    try:
        with torch.no_grad():
            run_block(block, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    result = {}
    for name, total in sums.items():
        h = total / counts[name]
        result[name] = h + damp * h.diagonal().mean().clamp(min=1e-8) * torch.eye(h.shape[0], device=h.device)
    return result


def quantize_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], settings: AqSettings,
                   options: AqlmOptions, seed: int, bar: Any, index: int) -> list[dict[str, Any]]:
    hessians = input_statistics(block, hidden, kwargs, options.damp)
    target = None
    if options.finetune_steps:
        with torch.no_grad():
            target = run_block(block, hidden, kwargs)
    losses = []
    for j, (name, linear) in enumerate(sorted(block_linears(block).items())):
        layer, error = quantize_layer(linear.weight, hessians[name], settings, seed + j)
        replace(block, name, AqLinear(layer.codes, layer.codebooks, layer.scales, linear.bias, settings.nbits))
        losses.append({"layer": index, "module": name, "loss": round(error, 6)})
        bar.set_postfix_str(f"block {index} {name} rel. error {error:.3g}")
    if target is not None:
        before, after = finetune_block(block, hidden, kwargs, target, options.finetune_steps, options.lr)
        losses.append({"layer": index, "module": "block finetune", "loss": round(after, 6), "before": round(before, 6)})
    return losses


def finetune_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], target: torch.Tensor,
                   steps: int, lr: float) -> tuple[float, float]:
    """Adam on the block's codebooks and scales so that it reproduces the full-precision block's outputs."""
    params = [p for m in block.modules() if isinstance(m, AqLinear) for p in (m.codebooks, m.scales)]
    frozen = [p for p in block.parameters() if all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)
    optimiser = torch.optim.Adam(params, lr=lr * 0.1, betas=(0.9, 0.95))
    norm = target.pow(2).mean()
    history = []
    best = [p.detach().clone() for p in params]
    for _ in range(steps + 1):
        loss = (run_block(block, hidden, kwargs) - target).pow(2).mean() / norm
        history.append(loss.item())
        if loss.item() <= min(history):
            best = [p.detach().clone() for p in params]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        for p, b in zip(params, best, strict=True):
            p.copy_(b)
            p.requires_grad_(False)
    return history[0], min(history)


def replace(block: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, layer)


def install_layers(block: nn.Module, tensors: dict[str, torch.Tensor], nbits: int) -> None:
    for name, linear in sorted(block_linears(block).items()):
        codes = unpack_codes(tensors[f"{name}.codes"], nbits)
        books = tensors[f"{name}.codebooks"]
        m, k, _, g = books.shape
        replace(block, name, AqLinear(codes, books.reshape(m, k, g), tensors[f"{name}.scales"].flatten(), linear.bias, nbits))


class ResumeState:
    """Finished blocks of an interrupted run: block-NNN.safetensors plus state.json naming the run."""

    def __init__(self, folder: Path, spec: QuantSpec, calibration: CalibrationSet):
        self.folder = folder
        identity = {"spec": spec.as_dict(), "calibration_sha256": calibration.record.get("sha256"),
                    "calibration_tokens": calibration.record.get("tokens"), "calibration_seed": calibration.record.get("seed")}
        path = folder / "state.json"
        if path.exists():
            stored = json.loads(path.read_text())
            if stored.get("identity") != identity:
                raise ResumeStateError(f"the interrupted run in {folder} used other settings; rerun with them, or --force to start over")
            self.losses = stored.get("losses", {})
        else:
            folder.mkdir(parents=True, exist_ok=True)
            self.losses = {}
        self.identity = identity

    def load_block(self, index: int) -> dict[str, torch.Tensor] | None:
        path = self.folder / f"block-{index:03d}.safetensors"
        return load_file(str(path)) if path.exists() and str(index) in self.losses else None

    def save_block(self, index: int, block: nn.Module, losses: list[dict[str, Any]]) -> None:
        tensors = {f"{name}.{key}": getattr(layer, key).detach().contiguous()
                   for name, layer in block.named_modules() if isinstance(layer, AqLinear)
                   for key in ("codes", "codebooks", "scales")}
        tmp = self.folder / f".block-{index:03d}.tmp"
        save_file(tensors, str(tmp))
        tmp.rename(self.folder / f"block-{index:03d}.safetensors")
        self.losses[str(index)] = losses
        record = self.folder / ".state.tmp"
        record.write_text(json.dumps({"identity": self.identity, "losses": self.losses}, indent=1))
        record.rename(self.folder / "state.json")


def saved_losses(state: ResumeState | None, index: int) -> list[dict[str, Any]]:
    return list(state.losses.get(str(index), [])) if state else []

