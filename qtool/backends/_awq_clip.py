"""AWQ's clipping search, with GPTQModel's arithmetic but without its large temporaries.

GPTQModel 7.7's `AWQProcessor._compute_best_clip` evaluates each candidate clip with
`(input_feat * w).sum(-1)`, which materialises a [out_batch, tokens, groups, group_size] tensor
(75-300 MB for SmolLM2's layers) ten times per output batch. On CPU every such allocation is a
fresh mmap whose pages the kernel zeroes: the machine spent 100 % of its time in the kernel and
AWQ took ~45 s per 135M layer. The same dot products are a batched matmul over groups, which
allocates only the [groups, tokens, out_batch] result. Same grid, same quantizer (the library's
own `_pseudo_quantize_tensor_into`), same selection rule; tests/test_gptq_awq.py checks that it
picks the library's clip values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@torch.inference_mode()
def best_clip_batched(processor, w: torch.Tensor, input_feat: torch.Tensor, n_grid: int = 20,
                      max_shrink: float = 0.5, n_sample_token: int = 512) -> torch.Tensor:
    out_features, in_features = w.shape
    group_size = processor.qcfg.group_size if processor.qcfg.group_size > 0 else in_features
    groups = in_features // group_size
    x = input_feat.reshape(-1, in_features)
    x = x[:: max(1, x.shape[0] // n_sample_token)]
    x = x.to(w.device).reshape(x.shape[0], groups, group_size).permute(1, 0, 2)  # [g, t, k]
    w4 = w.reshape(out_features, 1, groups, group_size)
    oc_batch = 256 if out_features % 256 == 0 else 64
    best = []
    for start in range(0, out_features, oc_batch):
        wb = w4[start : start + oc_batch]
        org_max = wb.abs().amax(dim=-1, keepdim=True)  # [c, 1, g, 1]
        org_out = torch.bmm(x, _as_gkc(wb))  # [g, t, c]
        clamped, quantized = torch.empty_like(wb), torch.empty_like(wb)
        errors, candidates = [torch.full_like(org_max, float("inf"))], [org_max]
        for step in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - step / n_grid)
            torch.clamp(wb, -max_val, max_val, out=clamped)
            processor._pseudo_quantize_tensor_into(clamped, quantized, abs_max=max_val)
            err = torch.bmm(x, _as_gkc(quantized)).sub_(org_out).pow_(2).mean(dim=1)  # [g, c]
            errors.append(err.t().reshape(org_max.shape))
            candidates.append(max_val)
        index = torch.stack(errors).nan_to_num(nan=torch.inf).argmin(dim=0)
        best.append(torch.gather(torch.stack(candidates), 0, index.unsqueeze(0)).squeeze(0))
    return torch.cat(best).squeeze(1)


def _as_gkc(w4: torch.Tensor) -> torch.Tensor:
    # [c, 1, g, k] -> [g, k, c], the right-hand side of x[g] @ w[g].T
    return w4.squeeze(1).permute(1, 2, 0)


@contextlib.contextmanager
def batched_clip_search() -> Iterator[None]:
    from gptqmodel.looper.awq_processor import AWQProcessor

    original = AWQProcessor._compute_best_clip
    AWQProcessor._compute_best_clip = best_clip_batched  # type: ignore[method-assign]
    try:
        yield
    finally:
        AWQProcessor._compute_best_clip = original  # type: ignore[method-assign]
