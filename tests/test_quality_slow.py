"""Slow checks on the real model (run with `make test-all` or `pytest -m slow`)."""

import pytest

import qtool

pytestmark = pytest.mark.slow


def test_hqq_quality_falls_as_bits_fall(wikitext_test, tmp_path):
    """More bits, lower perplexity: 8 < 4 < 3 < 2, on the same windows."""
    ppl = {}
    for bits in (8, 4, 3, 2):
        out = tmp_path / f"hqq{bits}"
        qtool.quantize("smollm2-135m", out, "hqq", bits=bits, group_size=64, device="cpu")
        loaded = qtool.load(out, device="cpu")
        ppl[bits] = qtool.evaluate_perplexity(loaded, str(wikitext_test), ctx=512, max_tokens=4096, progress=False).ppl
    assert ppl[8] < ppl[4] < ppl[3] < ppl[2], ppl
