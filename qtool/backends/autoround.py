"""AutoRound (Cheng et al., 2024, "SignRound"): calibrated rounding learned per decoder block, GPTQ output.

Built on Intel's `auto-round` library, which is maintained and installs here without touching the
CPU torch pin. For each decoder block it learns, by signed gradient descent on the block's output
error over the calibration samples, a rounding offset per weight (up or down) and a shrink factor
for each group's min/max, then exports the standard GPTQ layout (`quant_method: gptq`,
int32-packed qweight/qzeros/scales). The checkpoint is therefore loaded exactly like a gptq
backend checkpoint: plain transformers through GPTQModel on CPU (TorchAtenLinear), Marlin/ExLlama
on CUDA, vLLM and SGLang. It is a separate method from gptq because the algorithm is different;
qtool reports it under its own name.

Why it is in qtool: on the built-in 135M model, 4-bit g64 GPTQ (with its range search and GPTAQ)
stays ~10 % above the base perplexity, and SignRound's block-output objective reaches further
(README, results table). It costs more time: one forward and backward of the block per step.

auto-round prints its own progress and log lines; qtool sends them to `quantize.log` and shows
one bar over the decoder blocks, with each block's output loss before and after tuning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from qtool.backends import register
from qtool.backends._gptqmodel import GptqModelBackend
from qtool.backends.base import Capabilities, Quantized, QuantSpec
from qtool.backends.gptq import gptq_kernel
from qtool.calibration import CalibrationSet
from qtool.errors import SpecError
from qtool.models import ModelSource
from qtool.runtime import compute_dtype, library_output_to


@dataclass
class AutoRoundOptions:
    sym: bool = field(default=True, metadata={"help": "symmetric grid (vLLM Marlin needs it); false adds a zero point per group"})
    iters: int = field(default=200, metadata={"help": "sign-gradient steps per decoder block (paper: 200; 50 is auto-round's 'light' preset; 0 = plain rounding)"})
    lr: float = field(default=0.0, metadata={"help": "step size of the rounding offsets (0: auto-round's default, 1/iters)"})
    batch_size: int = field(default=8, metadata={"help": "calibration samples per step"})
    minmax_tuning: bool = field(default=True, metadata={"help": "also learn each group's min/max shrink (clipping)"})


@register
class AutoRoundBackend(GptqModelBackend):
    mixed_bits = ()  # auto-round's own per-layer config is not wired to qtool.mixed yet
    name = "autoround"
    summary = "AutoRound (SignRound) via auto-round: learned rounding per block, calibrated, standard GPTQ checkpoint"
    capabilities = Capabilities(
        bits=(2, 3, 4, 8),
        needs_calibration=True,
        devices=("cpu", "cuda"),
        serializable=True,
        peft_trainable=True,
        packages={"auto_round": "autoround", "gptqmodel": "autoround", "optimum": "autoround"},
        format="GPTQ (int32-packed; quant_method gptq in config.json): transformers + optimum + gptqmodel, vLLM, SGLang, TGI",
    )
    Options = AutoRoundOptions

    def unavailable_reason(self, device: str = "cpu") -> str | None:
        # its import loads torchao, which prints a line per CUDA extension it cannot load here
        with contextlib.suppress(Exception), library_output_to(Path(os.devnull)):
            import auto_round  # noqa: F401
        return super().unavailable_reason(device)

    def check_spec(self, spec: QuantSpec) -> None:
        o = spec.options
        if o.iters < 0:
            raise SpecError(f"autoround option iters must be >= 0, got {o.iters}")
        if o.lr < 0:
            raise SpecError(f"autoround option lr must be >= 0 (0: 1/iters), got {o.lr}")
        if o.batch_size < 1:
            raise SpecError(f"autoround option batch_size must be at least 1, got {o.batch_size}")
        nsamples = spec.calibration.nsamples if spec.calibration else None
        if nsamples is not None and o.batch_size > nsamples:
            raise SpecError(f"autoround option batch_size {o.batch_size} is larger than --nsamples {nsamples}")

    def quantize(
        self, source: ModelSource, spec: QuantSpec, device: str, calibration: CalibrationSet | None = None
    ) -> Quantized:
        assert calibration is not None
        o = spec.options
        export = Path(tempfile.mkdtemp(prefix="qtool-autoround-"))
        log_path = export / "quantize.log"
        losses: list[dict[str, Any]] = []
        blocks = getattr(source.config(), "num_hidden_layers", None)
        try:
            model = source.load_model(device, compute_dtype(device))
            tokenizer = source.load_tokenizer()
            samples = [torch.tensor([ids]) for ids in calibration.samples]
            with library_output_to(log_path) as terminal, block_progress(blocks, terminal, losses):
                from auto_round import AutoRound

                rounder = AutoRound(
                    model,
                    tokenizer=tokenizer,
                    scheme="W4A16",
                    bits=spec.bits,
                    group_size=spec.group_size,
                    sym=o.sym,
                    iters=o.iters,
                    lr=o.lr or None,
                    enable_minmax_tuning=o.minmax_tuning,
                    dataset=samples,
                    nsamples=len(samples),
                    seqlen=calibration.record["seqlen"],
                    batch_size=min(o.batch_size, len(samples)),
                    seed=spec.seed,
                    device_map="cpu" if device == "cpu" else 0,
                    amp=device != "cpu",  # bf16 autocast is several times slower on CPUs without bf16 units
                )
                rounder.quantize_and_save(str(export / "model"), format="auto_gptq")
            folder = _exported_folder(export / "model")
        except BaseException:
            shutil.rmtree(export, ignore_errors=True)
            raise
        result = rounder.model
        result.qtool_export = folder
        result.qtool_log = log_path
        return Quantized(result, losses)

    def save(self, model: Any, out: Path) -> None:
        for item in Path(model.qtool_export).iterdir():
            shutil.move(str(item), out / item.name)
        shutil.move(str(model.qtool_log), out / "quantize.log")
        shutil.rmtree(Path(model.qtool_log).parent, ignore_errors=True)

    def kernel(self, device: str) -> str:
        return gptq_kernel(device)


def _exported_folder(root: Path) -> Path:
    """auto-round writes into a subfolder it names after the model and scheme; find it."""
    configs = sorted(root.rglob("config.json"))
    if not configs:
        raise RuntimeError(f"auto-round wrote no checkpoint under {root}")
    return configs[0].parent


_BLOCK_DONE = re.compile(r"loss iter 0: (?P<before>[-+.\deE]+) -> iter (?P<iter>\d+): (?P<after>[-+.\deE]+)")


@contextlib.contextmanager
def block_progress(blocks: int | None, stream: Any, losses: list[dict[str, Any]]) -> Iterator[None]:
    """One bar over the decoder blocks, fed by auto-round's per-block log line."""
    bar = tqdm(total=blocks, desc="autoround", unit="block", file=stream, dynamic_ncols=True)

    class BlockLine(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if "layers in the block" not in message:
                return
            match = _BLOCK_DONE.search(message)
            row: dict[str, Any] = {"layer": len(losses)}
            if match:
                row.update(loss_before=float(match["before"]), loss=float(match["after"]), best_iter=int(match["iter"]))
                bar.set_postfix_str(f"block {row['layer']} loss {row['loss_before']:.3g} -> {row['loss']:.3g}")
            losses.append(row)
            bar.update(1)

    handler = BlockLine(level=logging.INFO)
    logger = logging.getLogger("autoround")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        bar.close()
