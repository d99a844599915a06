"""Residual-stream rotation before quantization (QuaRot's and SpinQuant's R1), folded into the weights.

A pre-norm decoder computes the same function when its residual stream is expressed in a rotated
basis h = Qᵀx, Q orthogonal: RMSNorm only sees ‖x‖, which Q keeps. So, after folding each
RMSNorm's gain into the linears that read from it (which leaves the norms with unit gains):
- the readers of the stream (q/k/v, gate/up, lm_head) become W·diag(g)·Q;
- its writers (o_proj, down_proj, the embedding) become QᵀW (bias Qᵀb), and E·Q for the embedding.

The rotated weights spread the few huge residual channels of a small model over all channels, so a
per-group 4-bit grid loses much less of them (SmolLM2-135M, GPTQ 4-bit g64: README table). Nothing
runs online: the checkpoint stays an ordinary model of the same architecture, loadable by plain
transformers and serving engines. The one cost is the output head: a tied embedding/lm_head pair
cannot stay tied (the head absorbs the final norm's gain, the embedding does not), so lm_head
becomes its own vocab × hidden matrix.

Q is seeded, of one of two kinds (gptq's `rotation` option):
- `orthogonal`: a Haar-random orthogonal matrix (QR of a Gaussian), which exists for every hidden size;
- `hadamard`: a randomized Hadamard matrix H·diag(±1)/√n (QuaRot, SpinQuant's random-Hadamard
  baseline), built by compressed-tensors' `random_hadamard_matrix` from its table of known
  Hadamard orders: n must be k·2^m with k one of them (576 = 36 × 16). Every entry has the same
  magnitude 1/√n, so each rotated channel mixes every original one equally; SpinQuant reports
  that random Hadamard rotations vary much less from seed to seed than random orthogonal ones.

Written here because the libraries that do it do not fit: llm-compressor's SpinQuantModifier folds
the same R1 rotation, but llm-compressor 0.14 pins transformers <= 5.17 (qtool runs 5.23; see
backends/gptq.py), and GPTQModel's own `rotation` option also needs online Hadamard transforms at
inference, which a standard checkpoint cannot carry.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch
from torch import nn

from qtool.errors import SpecError
from qtool.models import ModelSource

# Pre-norm decoders whose norms are plain RMSNorm (x / rms(x) * g) and whose residual stream is
# written only by the embedding, o_proj and down_proj. Gemma's (1 + g) norms, LayerNorm models
# (mean subtraction does not commute with Q) and fused-qkv layouts are not listed.
ROTATABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

ROTATION_KINDS = ("orthogonal", "hadamard")
RECORD_KINDS = {"orthogonal": "random orthogonal (QR of a Gaussian), residual stream, folded into the weights",
                "hadamard": "randomized Hadamard (compressed-tensors), residual stream, folded into the weights"}

_PROBE_TOLERANCE = 1e-3  # max |Δlogit| relative to max |logit|, in fp32


def check_rotatable(config: Any, kind: str = "orthogonal") -> None:
    """Raise SpecError unless `config`'s model can be rotated by a matrix of `kind` (before loading it)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ROTATABLE_MODEL_TYPES:
        raise SpecError(
            f"rotate=true supports {', '.join(ROTATABLE_MODEL_TYPES)} models (RMSNorm pre-norm decoders); "
            f"this model is {model_type!r}"
        )
    check_rotation_size(kind, config.hidden_size)


def check_rotation_size(kind: str, size: int) -> None:
    """Raise SpecError when no rotation of `kind` exists for a hidden size of `size`."""
    if kind == "hadamard" and not _hadamard_order_known(size):
        raise SpecError(f"rotation=hadamard needs a hidden size k·2^m with a Hadamard order k that compressed-tensors "
                        f"knows (up to 256, multiples of 4); this model's is {size}: use rotation=orthogonal")


def _hadamard_order_known(size: int) -> bool:
    from compressed_tensors.transform.utils.hadamard import _fetch_hadamard_divisor

    return _fetch_hadamard_divisor(size, torch.float64) is not None


def random_orthogonal(size: int, seed: int) -> torch.Tensor:
    """Haar-distributed orthogonal matrix (float64), reproducible from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def random_hadamard(size: int, seed: int) -> torch.Tensor:
    """Randomized Hadamard matrix H·diag(±1)/√size (float64, orthogonal), reproducible from `seed`.

    Source: compressed-tensors' `random_hadamard_matrix` (after SpinQuant's hadamard_utils), which
    returns ±1 entries; raises SpecError when `size` has no known Hadamard order (check_rotation_size).
    """
    from compressed_tensors.transform.utils.hadamard import random_hadamard_matrix

    check_rotation_size("hadamard", size)
    generator = torch.Generator().manual_seed(seed)
    return random_hadamard_matrix(size, torch.float64, gen=generator) / size ** 0.5


def rotation_matrix(kind: str, size: int, seed: int) -> torch.Tensor:
    """The `size` × `size` orthogonal matrix (float64) of `kind` (ROTATION_KINDS) that `seed` draws."""
    return random_hadamard(size, seed) if kind == "hadamard" else random_orthogonal(size, seed)


def rotate_with_seed(model: nn.Module, seed: int, kind: str = "orthogonal") -> None:
    """Rotate `model` in place by the matrix of `kind` that `seed` draws (what gptq's rotate=true applies)."""
    rotate_residual_stream(model, rotation_matrix(kind, model.config.hidden_size, seed))


def rotate_residual_stream(model: nn.Module, rotation: torch.Tensor) -> None:
    """Rewrite `model`'s weights in place so that its residual stream lives in the basis `rotation`.

    Works in float64 and stores back in each weight's dtype. Unties lm_head from the embedding.
    """
    decoder = model.model
    q = rotation
    with torch.no_grad():
        head = _f64(model.lm_head.weight) * _f64(decoder.norm.weight)
        decoder.norm.weight.fill_(1.0)
        embedding = decoder.embed_tokens.weight
        decoder.embed_tokens.weight = nn.Parameter((_f64(embedding) @ q).to(embedding.dtype))
        for layer in decoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            _fold_norm_into_readers(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], q)
            _fold_norm_into_readers(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], q)
            for writer in (attn.o_proj, mlp.down_proj):
                writer.weight.copy_(q.T @ _f64(writer.weight))
                if writer.bias is not None:
                    writer.bias.copy_(q.T @ _f64(writer.bias))
        lm_head = nn.Linear(head.shape[1], head.shape[0], bias=False, dtype=embedding.dtype,
                            device=embedding.device)
        lm_head.weight.copy_(head @ q)
        model.lm_head = lm_head
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False


def _fold_norm_into_readers(norm: nn.Module, readers: list[nn.Linear], q: torch.Tensor) -> None:
    gain = _f64(norm.weight)
    for reader in readers:
        reader.weight.copy_((_f64(reader.weight) * gain) @ q)
    norm.weight.fill_(1.0)


def _f64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float64)


def rotated_copy(source: ModelSource, seed: int, dtype: torch.dtype,
                 kind: str = "orthogonal") -> tuple[ModelSource, Any, dict[str, Any]]:
    """Rotate `source` by the matrix of `kind` on the CPU and save it, in `dtype`, into a temporary folder.

    Returns the folder as a ModelSource, the TemporaryDirectory (the folder lives as long as it
    does) and what qtool.json records. The whole model is loaded once, in fp32.
    """
    check_rotatable(source.config(), kind)
    start = time.perf_counter()
    model = source.load_model("cpu", torch.float32)
    tokenizer = source.load_tokenizer()
    probe = _probe_ids(tokenizer, model.config.vocab_size)
    with torch.no_grad():
        before = model(probe).logits
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    rotate_with_seed(model, seed, kind)
    with torch.no_grad():
        drift = ((model(probe).logits - before).abs().max() / before.abs().max()).item()
    if drift > _PROBE_TOLERANCE:
        raise SpecError(f"rotate=true changed this model's outputs (relative logit change {drift:.2g}); "
                        "its architecture is not rotation-invariant, quantize without rotate")
    folder = tempfile.TemporaryDirectory(prefix="qtool-rotated-")
    model.to(dtype).save_pretrained(folder.name)
    tokenizer.save_pretrained(folder.name)
    record = {"kind": RECORD_KINDS[kind], "rotation": kind, "seed": seed, "untied_lm_head": tied,
              "relative_logit_change_fp32": drift,
              "seconds": round(time.perf_counter() - start, 1)}
    return ModelSource(source.name, "rotated", folder.name), folder, record


def _probe_ids(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    ids = tokenizer("Rotation must not change what the model computes.", return_tensors="pt").input_ids
    return ids.clamp(max=vocab_size - 1)
