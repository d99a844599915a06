"""How much of a W8A8 checkpoint's perplexity loss comes from its activations: one run, one JSON.

A compressed-tensors checkpoint with quantized activations (fp8, w8a8) is loaded as qtool loads it:
weights decompressed to their stored values, activations fake-quantized on the fly (emulation).
Its token perplexity is measured twice on the same text in the same process: as shipped, then with
compressed-tensors' `quantization_enabled` off on every quantized Linear, which leaves the stored
(quantized) weights and computes the activations in full precision (weight-only). The base model
is measured on the same text too, so that both losses are relative to it.

Writes OUT (JSON): base, weight-only and as-shipped perplexity per text, the share of the loss
the activations carry, the checkpoint's qtool.json summary, settings and versions.
Usage: python benchmarks/activation_error_split.py CHECKPOINT [--base smollm2-135m]
       [--text PATH:TOKENS ...] [--out reports/smollm2-cpu-formats/fp8-activation-split.json]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import qtool

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"
CTX = 512


def perplexity(loaded: qtool.LoadedModel, text: str, tokens: int) -> float:
    return qtool.evaluate_perplexity(loaded, text, ctx=CTX, max_tokens=tokens, progress=False).ppl


def activation_quantization(model, enabled: bool) -> int:
    """Turn fake quantization of every compressed-tensors Linear on or off; return how many."""
    modules = [m for m in model.modules() if getattr(m, "quantization_scheme", None) is not None]
    for module in modules:
        module.quantization_enabled = enabled
    return len(modules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--text", action="append", default=None,
                        help="PATH:TOKENS (default: WikiText-2 test 40000 and valid 20000)")
    parser.add_argument("--out", type=Path, default=REPO / "reports/smollm2-cpu-formats/fp8-activation-split.json")
    args = parser.parse_args()
    texts = [t.rsplit(":", 1) for t in args.text or [f"{WIKITEXT / 'test.txt'}:40000", f"{WIKITEXT / 'valid.txt'}:20000"]]

    base = qtool.load(args.base, device="cpu")
    loaded = qtool.load(args.checkpoint, device="cpu")
    rows = []
    for text, tokens in texts:
        row = {"text": str(Path(text).relative_to(REPO.parent)) if Path(text).is_relative_to(REPO.parent) else text,
               "max_tokens": int(tokens), "base": perplexity(base, text, int(tokens))}
        activation_quantization(loaded.model, True)
        row["as_shipped"] = perplexity(loaded, text, int(tokens))
        row["quantized_linears"] = activation_quantization(loaded.model, False)
        row["weight_only"] = perplexity(loaded, text, int(tokens))
        loss, weights = row["as_shipped"] / row["base"] - 1, row["weight_only"] / row["base"] - 1
        row.update({"loss_as_shipped_pct": round(100 * loss, 3), "loss_weight_only_pct": round(100 * weights, 3),
                    "activation_share_of_loss": round((loss - weights) / loss, 3) if loss > 0 else None})
        rows.append(row)
        print(json.dumps(row))
    record = loaded.record or {}
    result = {"checkpoint": str(args.checkpoint), "method": record.get("method"), "spec": record.get("spec"),
              "compressed_tensors": record.get("compressed_tensors"), "base": args.base,
              "protocol": f"token-ppl, ctx {CTX}, stride {CTX}", "kernel": record.get("kernel"),
              "rows": rows, "machine": platform.processor() or platform.machine(),
              "versions": (record.get("versions") or {})}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
