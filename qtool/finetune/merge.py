"""`qtool merge`: fold a LoRA adapter into its base, re-quantizing when the base was quantized.

Merging into 4-bit layers destroys the adapter (measured: bnb nf4 loss 0.18 → 4.07; hqq 0.19 → 3.32),
so qtool never does that. It loads the full-precision original the quantized base was made from
(recorded in its qtool.json), merges there with PEFT's merge_and_unload, and then quantizes the
merged model with the requested method. With --ppl it measures token perplexity of the adapter
on its quantized base before and of the merged output after, on the same windows.

A base quantized with gptq's `rotate=true` was trained in the rotated basis: its adapter's
deltas only fit the rotated original, so the original is rotated again (same seed, from the
base's qtool.json) before merging. The merged model stays rotated (same function, untied head).
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path
from typing import Any

from qtool.errors import OutputExistsError, SpecError
from qtool.finetune.adapters import (
    attach_adapters,
    full_precision_source,
    parse_adapter_args,
    quantized_base_record,
)
from qtool.rotation import rotate_with_seed


def merge_adapter(base: str, adapter: str, out: str | Path, requantize: str | None = None, bits: int | None = None,
                  group_size: int | None = None, options: dict[str, str] | None = None, device: str = "auto",
                  force: bool = False, seed: int = 0, ppl: str | None = None, ctx: int = 512,
                  max_tokens: int | None = None) -> dict[str, Any]:
    import qtool
    from qtool import backends
    from qtool.checkpoint import atomic_output_dir, write_record

    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; pass --force to replace it")
    if requantize is None and (bits is not None or group_size is not None or options):
        raise SpecError("--bits, --group-size and --opt describe the re-quantization: add --requantize METHOD")
    if requantize:
        backends.get(requantize).make_spec(bits, group_size, options or {}, seed)  # bad specs fail before any work
    (name, folder), = parse_adapter_args([adapter]).items()
    base_record = quantized_base_record(base)
    original = full_precision_source(base, base_record)
    rotation = (base_record or {}).get("rotation")
    windows = {"ctx": ctx, "max_tokens": max_tokens, "progress": False}

    before = None
    if ppl:
        trained = qtool.load(base, device=device)
        trained.model = attach_adapters(trained.model, {name: folder})
        before = qtool.evaluate_perplexity(trained, ppl, **windows)
        del trained
        gc.collect()

    full = qtool.load(original, device=device)
    if rotation:
        rotate_with_seed(full.model, rotation["seed"])
    merged = attach_adapters(full.model, {name: folder}).merge_and_unload()
    info = {"base": base, "full_precision_source": original, "adapter": str(folder), "requantize": requantize}
    if rotation:
        info["rotation_seed"] = rotation["seed"]
    if requantize:
        with tempfile.TemporaryDirectory(prefix=".qtool-merged-", dir=out.parent if out.parent.exists() else None) as tmp:
            merged.save_pretrained(tmp)
            full.tokenizer.save_pretrained(tmp)
            del merged, full
            gc.collect()
            record = qtool.quantize(tmp, out, requantize, bits, group_size, options, device=device, force=force, seed=seed)
        record["source"] = {"name": f"{original} + adapter {folder}", "kind": "merged", "location": str(original)}
    else:
        with atomic_output_dir(out, force) as tmp:
            merged.save_pretrained(tmp)
            full.tokenizer.save_pretrained(tmp)
        del merged, full
        record = None
    after = None
    if ppl:
        after = qtool.evaluate_perplexity(qtool.load(out, device=device), ppl, **windows)
        info |= {"ppl_source": ppl, "ppl_protocol": after.protocol, "ctx": ctx, "tokens_scored": after.tokens_scored,
                 "ppl_before": before.ppl, "ppl_after": after.ppl}
    if record is not None:
        record["merge"] = info
        write_record(out, record)
    else:
        import json

        (out / "merge.json").write_text(json.dumps(info, indent=2) + "\n")  # a plain HF folder: no qtool.json
    return info

