"""How much each layer group costs in quality at each bit-width: the cost a plan minimises.

Two measures, both on calibration samples, both perturbing a weight W by an error E_b: by default
the round-to-nearest error W - RTN_b(W) of its group size (min-max grid with a zero point,
qtool.backends.rtn), or with perturbation "method" the error the backend itself makes at b bits
(qtool.mixed.perturbation):

- `fisher` (default): the second-order estimate of the loss increase, 0.5 * sum(F * E_b**2),
  with F the diagonal empirical Fisher information (mean squared gradient of the token loss),
  as in SqueezeLLM (Kim et al., 2024) and HAWQ-style mixed precision (Dong et al., 2019).
  One forward and backward pass per sample, then elementwise products: about a minute for
  SmolLM2-135M on 8k tokens. Units: nats per token.
- `output`: the diagonal Fisher of each layer's output (BRECQ, Li et al., 2021):
  0.5 * sum G**2 * (E_b x)**2 over tokens and output channels, G the loss gradient at the layer's
  output, x its input. One forward and backward pass per sample, plus one matmul per layer and
  width. It sees an error through the inputs it meets, so it credits GPTQ's error compensation,
  which the weight-space Fisher (elementwise on E_b) does not.
- `kl`: the measured KL divergence (nats per token) of the model's next-token distribution when
  only that group is rounded to b bits, everything else in full precision. One partial forward
  pass (from the group's decoder layer on, from cached hidden states) per group and bit-width.

Both assume the costs add up over groups, which is what the allocation minimises. Which one
predicts the quantized model's real perplexity better is measured in benchmarks/mixed_precision.py
(docs/methods.md reports it). No library computes either for an arbitrary transformers model
and bit grid (llm-compressor and auto-round search within their own formats only), so this is
qtool's own code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qtool.mixed.units import Unit

#: calibration tokens each measure reads (whole samples first; the last one is cut to fit)
TOKEN_BUDGET = {"fisher": 8192, "output": 4096, "kl": 1024}


#: (module name, its full-precision weight, bits) -> the error E_b, fp32, shape of the weight
Errors = Callable[[str, torch.Tensor, int], torch.Tensor]


def rounding_error(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """W - RTN_b(W) in fp32, shape of `weight` (out_features, in_features)."""
    from qtool.backends.rtn import rtn_dequantized

    w = weight.detach().float()
    return w - rtn_dequantized(w, bits, group_size, symmetric=False)


def rtn_errors(group_size: int) -> Errors:
    return lambda _name, weight, bits: rounding_error(weight, bits, group_size)


def budget_samples(samples: Sequence[Sequence[int]], tokens: int) -> list[list[int]]:
    """The first samples holding at most `tokens` tokens (the last one shortened); at least 2 tokens."""
    chosen: list[list[int]] = []
    left = tokens
    for ids in samples:
        if left < 2:
            break
        chosen.append(list(ids[:left]))
        left -= len(chosen[-1])
    return chosen


def measure(model: nn.Module, units: list[Unit], candidates: Sequence[int], errors: Errors,
            samples: Sequence[Sequence[int]], proxy: str) -> list[list[float]]:
    """cost[u][c] of group `units[u]` at bit-width `candidates[c]` (nats per token), shape
    (groups, candidates). `model` is the full-precision model; its weights are restored."""
    device = next(model.parameters()).device
    rows = [torch.tensor([ids], device=device) for ids in samples]
    if proxy == "fisher":
        return fisher_costs(model, units, candidates, errors, rows)
    if proxy == "output":
        return output_costs(model, units, candidates, errors, rows)
    return kl_costs(model, units, candidates, errors, rows)


def fisher_costs(model: nn.Module, units: list[Unit], candidates: Sequence[int], errors: Errors,
                 rows: list[torch.Tensor]) -> list[list[float]]:
    weights = {name: model.get_submodule(name).weight for unit in units for name in unit.modules}
    fisher = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    with only_grad_for(model, weights.values()):
        for ids in tqdm(rows, desc="sensitivity: fisher", unit="sample", leave=False):
            model(ids, labels=ids, use_cache=False).loss.backward()
            scored = ids.shape[1] - 1  # the per-sequence gradient averages this many token gradients
            for name, w in weights.items():
                fisher[name].add_(w.grad.float().square().mul_(scored / len(rows)))
                w.grad = None
    costs = []
    for unit in tqdm(units, desc="sensitivity: rounding error", unit="group", leave=False):
        costs.append([sum(0.5 * float((fisher[n] * errors(n, weights[n], b).square()).sum())
                          for n in unit.modules) for b in candidates])
    return costs


def output_costs(model: nn.Module, units: list[Unit], candidates: Sequence[int], errors: Errors,
                 rows: list[torch.Tensor]) -> list[list[float]]:
    """0.5 * sum over tokens and output channels of G**2 * (E_b x)**2, per token: the loss increase
    the diagonal Fisher of each layer's *output* predicts (BRECQ, Li et al., 2021), with G the
    gradient of the sequence's summed token loss at the layer output and x the layer's input.
    Unlike the weight-space Fisher it sees how an error-compensating method's errors act on the
    actual inputs, so it pairs with perturbation="method"."""
    names = [n for unit in units for n in unit.modules]
    modules = {n: model.get_submodule(n) for n in names}
    deltas = {(n, b): errors(n, modules[n].weight, b) for n in names for b in candidates}
    totals = dict.fromkeys(deltas, 0.0)
    inputs: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}

    def capture(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            inputs[name] = args[0].detach()
            output.register_hook(lambda grad: grads.__setitem__(name, grad.detach()))
        return hook

    handles = [modules[n].register_forward_hook(capture(n)) for n in names]
    handles.append(model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_()))
    scored = 0
    try:
        with only_grad_for(model, []):
            for ids in tqdm(rows, desc="sensitivity: output fisher", unit="sample", leave=False):
                tokens = ids.shape[1] - 1
                (model(ids, labels=ids, use_cache=False).loss * tokens).backward()
                scored += tokens
                for n in names:
                    x, g2 = inputs[n][0].float(), grads[n][0].float().square()
                    for b in candidates:
                        totals[n, b] += 0.5 * float((g2 * (x @ deltas[n, b].T).square()).sum())
                inputs.clear()
                grads.clear()
    finally:
        for handle in handles:
            handle.remove()
    return [[sum(totals[n, b] for n in unit.modules) / scored for b in candidates] for unit in units]


@contextlib.contextmanager
def only_grad_for(model: nn.Module, params: Any) -> Iterator[None]:
    before = {p: p.requires_grad for p in model.parameters()}
    for p in before:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in before.items():
            p.requires_grad_(flag)
            p.grad = None


@torch.no_grad()
def kl_costs(model: nn.Module, units: list[Unit], candidates: Sequence[int], errors: Errors,
             rows: list[torch.Tensor]) -> list[list[float]]:
    layers = decoder_layers(model)
    inputs: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.register_forward_pre_hook(lambda _m, args, kw, i=i: inputs[i].append(_hidden(args, kw)),
                                             with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        base = [torch.log_softmax(model(ids, use_cache=False).logits.float(), -1) for ids in rows]
    finally:
        for hook in hooks:
            hook.remove()
    partial_ok = all(torch.allclose(_partial_logprobs(model, layers, 0, inputs[0][k], ids), base[k], atol=1e-4)
                     for k, ids in enumerate(rows[:1]))
    costs = []
    bar = tqdm(total=len(units) * len(candidates), desc="sensitivity: kl", unit="run", leave=False)
    for unit in units:
        start = _layer_index(unit, layers, model) if partial_ok else None
        row = []
        for b in candidates:
            with rounded(model, unit, b, errors):
                kl = 0.0
                for k, ids in enumerate(rows):
                    q = (torch.log_softmax(model(ids, use_cache=False).logits.float(), -1) if start is None
                         else _partial_logprobs(model, layers, start, inputs[start][k], ids))
                    kl += float((base[k].exp() * (base[k] - q)).sum(-1).mean())
                row.append(kl / len(rows))
            bar.update(1)
        costs.append(row)
    bar.close()
    return costs


@contextlib.contextmanager
def rounded(model: nn.Module, unit: Unit, bits: int, errors: Errors) -> Iterator[None]:
    """The unit's weights perturbed by their `bits` error for the duration; restored after."""
    saved = {}
    for name in unit.modules:
        w = model.get_submodule(name).weight
        saved[name] = w.detach().clone()
        w.data.sub_(errors(name, w, bits).to(w.dtype))
    try:
        yield
    finally:
        for name, original in saved.items():
            model.get_submodule(name).weight.data.copy_(original)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else nn.ModuleList()


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return (args[0] if args else kwargs["hidden_states"]).detach()


def _layer_index(unit: Unit, layers: nn.ModuleList, model: nn.Module) -> int | None:
    owners = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    found = {owners.get(id(model.get_submodule(n))) for n in unit.modules}
    return found.pop() if len(found) == 1 and None not in found else None


def _partial_logprobs(model: nn.Module, layers: nn.ModuleList, start: int, hidden: torch.Tensor,
                      ids: torch.Tensor) -> torch.Tensor:
    """Log-probs of a forward pass that starts at decoder layer `start` from its cached input:
    the embedding returns `hidden` and only layers[start:] run."""
    decoder = model.get_decoder()
    hook = model.get_input_embeddings().register_forward_hook(lambda *_: hidden)
    decoder.layers = nn.ModuleList(list(layers)[start:])
    try:
        return torch.log_softmax(model(ids, use_cache=False).logits.float(), -1)
    finally:
        decoder.layers = layers
        hook.remove()
