import math

import pytest
import torch
import torch.nn.functional as F

import qtool
from qtool.data import Text
from qtool.errors import DatasetError
from qtool.evaluate.perplexity import token_perplexity, tokenize, window_plan


def scored_positions(plan, ctx):
    positions = []
    for start, first in plan:
        positions.extend(range(first, start + ctx))
    return positions


@pytest.mark.parametrize(("n", "ctx", "stride"), [(100, 10, 10), (100, 10, 3), (105, 10, 10), (37, 8, 1)])
def test_every_target_is_scored_at_most_once_and_never_without_context(n, ctx, stride):
    plan = window_plan(n, ctx, stride)
    positions = scored_positions(plan, ctx)
    assert len(positions) == len(set(positions))
    assert 0 not in positions
    assert all(start < first <= start + ctx - 1 for start, first in plan)
    if stride < ctx:  # sliding windows score every token up to the last full window
        assert positions == list(range(1, plan[-1][0] + ctx))


def test_non_overlapping_windows_follow_the_gptq_protocol():
    assert window_plan(30, 10, 10) == [(0, 1), (10, 11), (20, 21)]
    assert window_plan(29, 10, 10) == [(0, 1), (10, 11)]  # the partial tail is dropped


@pytest.mark.parametrize(("n", "ctx", "stride", "message"), [(5, 10, 10, "fewer than one window"), (50, 10, 11, "stride"), (50, 1, 1, "ctx")])
def test_bad_windows_are_user_errors(n, ctx, stride, message):
    with pytest.raises(DatasetError, match=message):
        window_plan(n, ctx, stride)


def test_perplexity_matches_a_hand_computation(tiny_llama):
    loaded = qtool.load(str(tiny_llama), device="cpu")
    text = Text("t", "inline", "The quick brown fox jumps over the lazy dog. " * 12)
    ctx = 16
    result = token_perplexity(loaded.model, loaded.tokenizer, text, ctx=ctx, progress=False)
    ids = loaded.tokenizer(text.content, add_special_tokens=False)["input_ids"]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - ctx + 1, ctx):
            window = torch.tensor([ids[start : start + ctx]])
            nll += F.cross_entropy(loaded.model(window).logits[0, :-1], window[0, 1:], reduction="sum").item()
            count += ctx - 1
    assert result.tokens_scored == count
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    tokens = tokenize(loaded.tokenizer, text.content)
    scored_bytes = sum(int(tokens.nbytes[s + 1 : s + ctx].sum()) for s in range(0, len(ids) - ctx + 1, ctx))
    assert result.bytes_scored == scored_bytes
    assert result.bpb == pytest.approx(nll / math.log(2) / scored_bytes, rel=1e-6)


def test_bytes_counted_per_token_add_up_to_the_text(smollm2):
    tok = smollm2.load_tokenizer()
    content = "Café au lait — naïve façade, 東京 and plain ASCII."
    tokens = tokenize(tok, content)
    assert int(tokens.nbytes.sum()) == len(content.encode("utf-8"))
    assert len(tokenize(tok, content, max_tokens=5).ids) == 5


def test_eval_json_on_stdout_is_pure_json(tiny_llama):
    import json

    from tests.conftest import run_qtool

    proc = run_qtool("eval", tiny_llama, "--ppl", "builtin", "--ctx", "64", "--max-tokens", "256", "--json", "-",
                     "--base", tiny_llama)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["perplexity"]["protocol"] == "token-ppl"
    assert payload["perplexity"]["windows"] == 4 and payload["perplexity"]["tokens_scored"] == 4 * 63
    assert payload["perplexity"]["dataset"]["source"] == "builtin"
    assert payload["divergence"]["kl_mean"] == 0 and payload["divergence"]["top1_agreement"] == 1.0
    assert "token PPL" in proc.stderr and "KL mean 0.0000" in proc.stderr


def test_kl_of_a_model_against_itself_is_zero_and_positive_after_quantization(tiny_llama, tmp_path):
    from qtool.evaluate.divergence import perplexity_and_divergence

    base = qtool.load(str(tiny_llama), device="cpu")
    text = Text("t", "inline", "A short text about rivers, bridges and the sea. " * 10)
    ppl, div = perplexity_and_divergence(base.model, base.model, "self", base.tokenizer, text, ctx=32, progress=False)
    assert div.kl_mean == 0 and div.kl_max == 0 and div.top1_agreement == 1.0
    assert div.base_ppl == pytest.approx(ppl.ppl)
    assert ppl.ppl == pytest.approx(token_perplexity(base.model, base.tokenizer, text, ctx=32, progress=False).ppl)

    out = tmp_path / "rtn2"
    qtool.quantize(str(tiny_llama), out, "rtn", bits=2, group_size=32, device="cpu")
    quant = qtool.load(out, device="cpu")
    qppl, qdiv = perplexity_and_divergence(quant.model, base.model, "base", quant.tokenizer, text, ctx=32, progress=False)
    assert qdiv.kl_mean > 0 and qdiv.kl_p99 >= qdiv.kl_mean and qdiv.kl_max >= qdiv.kl_p99
    assert qdiv.tokens == qppl.tokens_scored == ppl.tokens_scored
    assert qdiv.base_ppl == pytest.approx(ppl.ppl)
    # KL is the expectation under the base of log p_base - log p_model: check one position by hand
    window = torch.tensor([base.tokenizer(text.content, add_special_tokens=False)["input_ids"][:32]])
    with torch.no_grad():
        lp_base = F.log_softmax(base.model(window).logits[0, 0], -1)
        lp_quant = F.log_softmax(quant.model(window).logits[0, 0], -1)
    by_hand = (lp_base.exp() * (lp_base - lp_quant)).sum().item()
    assert 0 < by_hand <= qdiv.kl_max + 1e-6
