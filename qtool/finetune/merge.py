"""`qtool merge`: fold a LoRA adapter into its base, re-quantizing when the base was quantized.

Merging into 4-bit layers destroys the adapter (measured: bnb nf4 loss 0.18 → 4.07; hqq 0.19 → 3.32),
so qtool never does that. It loads the full-precision original the quantized base was made from
(recorded in its qtool.json), merges there with PEFT's merge_and_unload, and then quantizes the
merged model with the requested method. With --ppl it measures token perplexity of the adapter
on its quantized base before and of the merged output after, on the same windows.

A base quantized with gptq's `rotate=true` was trained in the rotated basis: its adapter's
deltas only fit the rotated original, so the original is rotated again (same seed and kind, from the
base's qtool.json) before merging. The merged model stays rotated (same function, untied head).

A merge must compute what the adapter on its base computes. That is impossible for LoRA on a
weight two modules share (tied embeddings: lm_head and embed_tokens hold one matrix): merging
writes the shared matrix, so the other module changes too (measured on the tiny Llama: logits
off by 11 for LoRA on lm_head, by 698 on embed_tokens). Such an adapter is refused before any work.
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path
from typing import Any

from qtool.errors import SpecError
from qtool.finetune.adapters import (
    attach_adapters,
    full_precision_source,
    lora_config,
    parse_adapter_args,
    quantized_base_record,
    shared_weights,
    targets_among,
    weightless_model,
)
from qtool.request import QuantizeRequest
from qtool.rotation import rotate_with_seed
from qtool.schema import parse_section


def merge_adapter(base: str, adapter: str, out: str | Path, requantize: str | None = None, bits: int | None = None,
                  group_size: int | None = None, options: dict[str, str] | None = None, device: str = "auto",
                  force: bool = False, seed: int = 0, ppl: str | None = None, ctx: int = 512,
                  max_tokens: int | None = None) -> dict[str, Any]:
    from qtool import api
    from qtool.checkpoint import atomic_output_dir, check_output_dir, write_record

    out = Path(out)
    check_output_dir(out, force, [base, adapter])
    if requantize is None and (bits is not None or group_size is not None or options):
        raise SpecError("--bits, --group-size and --opt describe the re-quantization: add --requantize METHOD")
    request = None
    if requantize:  # bad specs fail before any work
        request = parse_section(QuantizeRequest, {"method": requantize, "bits": bits, "group_size": group_size,
                                                  "options": options or {}, "seed": seed, "device": device},
                                "merge --requantize", names={"group_size": "--group-size", "bits": "--bits"},
                                error=SpecError)
    (name, folder), = parse_adapter_args([adapter]).items()
    base_record = quantized_base_record(base)
    original = full_precision_source(base, base_record)
    rotation = (base_record or {}).get("rotation")
    inputs = [base, adapter, folder, original]
    check_output_dir(out, force, inputs)
    refuse_inexact_merge(original, folder, untied=bool(rotation))
    windows = {"ctx": ctx, "max_tokens": max_tokens, "progress": False}

    before = None
    if ppl:
        trained = api.load(base, device=device)
        trained.model = attach_adapters(trained.model, {name: folder}, base)
        before = api.evaluate_perplexity(trained, ppl, **windows)
        del trained
        gc.collect()

    full = api.load(original, device=device)
    kind = (rotation or {}).get("rotation", "orthogonal")  # records before rotation=hadamard name no kind
    if rotation:
        rotate_with_seed(full.model, rotation["seed"], kind)
    merged = attach_adapters(full.model, {name: folder}, original).merge_and_unload()
    info = {"base": base, "full_precision_source": original, "adapter": str(folder), "requantize": requantize}
    if rotation:
        info["rotation_seed"] = rotation["seed"]
        info["rotation"] = kind
    if request:
        with tempfile.TemporaryDirectory(prefix=".qtool-merged-", dir=out.parent if out.parent.exists() else None) as tmp:
            merged.save_pretrained(tmp)
            full.tokenizer.save_pretrained(tmp)
            del merged, full
            gc.collect()
            record = api.quantize_request(tmp, out, request, force=force)
        record["source"] = {"name": f"{original} + adapter {folder}", "kind": "merged", "location": str(original)}
    else:
        with atomic_output_dir(out, force, inputs) as tmp:
            merged.save_pretrained(tmp)
            full.tokenizer.save_pretrained(tmp)
        del merged, full
        record = None
    after = None
    if ppl:
        after = api.evaluate_perplexity(api.load(out, device=device), ppl, **windows)
        info |= {"ppl_source": ppl, "ppl_protocol": after.protocol, "ctx": ctx, "tokens_scored": after.tokens_scored,
                 "ppl_before": before.ppl, "ppl_after": after.ppl}
    if record is not None:
        record["merge"] = info
        write_record(out, record)
    else:
        import json

        (out / "merge.json").write_text(json.dumps(info, indent=2) + "\n")  # a plain HF folder: no qtool.json
    return info



def refuse_inexact_merge(original: str, adapter: Path, untied: bool) -> None:
    """Refuse, in one line and before any work, an adapter with LoRA on a weight that `original`
    shares between modules: its merge would change the other module too (see the module doc).

    Checked on a weightless skeleton of `original`; `untied` says the merge unties the head first
    (a rotated base), so nothing is shared then."""
    from qtool.models import resolve_model

    config = resolve_model(original).config()
    if untied:
        config.tie_word_embeddings = False
        if hasattr(config, "get_text_config"):
            config.get_text_config().tie_word_embeddings = False
    shared = shared_weights(weightless_model(config))
    hit = targets_among(lora_config(adapter), sorted(shared))
    if hit:
        module, others = hit[0], ", ".join(shared[hit[0]])
        suffix = module.rsplit(".", 1)[-1]
        raise SpecError(f"adapter {adapter} puts LoRA on {module}, whose weight {original} shares with {others} "
                        f"(tied embeddings): merging would change {others} too, so the merged model would not compute "
                        f"what the adapter does; keep it as an adapter (qtool chat --adapter), or train again without "
                        f"{suffix} in lora.target_modules, or on a base with untied embeddings (tie_word_embeddings: false)")
