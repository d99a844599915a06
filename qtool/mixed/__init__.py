"""Mixed precision from a budget: qtool chooses the bit-width of every quantized layer.

Three steps, one module each:

1. `sensitivity`: how much each layer group costs in quality at each candidate bit-width,
   measured once per model and calibration set (Fisher proxy or measured KL) and cached;
2. `allocate`: the bit-widths that minimise the summed cost under the budget, an integer program
   solved by scipy's `milp` (HiGHS);
3. `plan`: the budget, the layer groups (q/k/v and gate/up share one width: serving engines fuse
   them), the chosen widths and what qtool.json records; the backends then quantize with
   per-module bits (GPTQModel's `dynamic` overrides for gptq/awq, per-layer grids for rtn/hqq).

The budget is either an average of bits per quantized weight, scales and zero points included
(`--target-bits`, the backend's own `effective_bits` per layer), or the bytes of the written
weights (`--target-size`, the backend's exact layer layout plus the unquantized tensors).
"""
