"""BOS at the start of every window (qtool.bos): perplexity, KL, calibration and lm-eval.

The tiny Llama's tokenizer (SmolLM2's) adds no BOS by itself; `tiny_bos` is the same model with
the same tokenizer saved with `add_bos_token=True`, the convention of Gemma and Llama 2/3.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import qtool
from qtool.bos import resolve_bos, tokenizer_adds_bos
from qtool.calibration import CalibrationSpec, build_calibration
from qtool.data import Text
from qtool.errors import DatasetError, SpecError
from qtool.evaluate.perplexity import scored_windows, token_perplexity, window_plan, windowed

from .conftest import qtool_in_process

TEXT = Text("t", "inline", "The quick brown fox jumps over the lazy dog, and then it sleeps in the sun. " * 16)
CTX = 16


@pytest.fixture(scope="module")
def tiny_bos(tiny_llama, tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-bos")
    shutil.copytree(tiny_llama, folder, dirs_exist_ok=True)
    AutoTokenizer.from_pretrained(tiny_llama, add_bos_token=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded_bos(tiny_bos):
    return qtool.load(str(tiny_bos), device="cpu")


def hand_nll(model, ids, windows):
    """Sum of NLL over (input window, number of scored tail tokens) pairs, computed directly."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for window, scored in windows:
            x = torch.tensor([window])
            logits = model(x).logits[0, :-1]
            nll += F.cross_entropy(logits[-scored:], x[0, 1:][-scored:], reduction="sum").item()
            count += scored
    return nll, count


def test_the_tokenizer_convention_decides(tiny_llama, loaded_bos):
    plain = qtool.load(str(tiny_llama), device="cpu").tokenizer
    assert not tokenizer_adds_bos(plain) and tokenizer_adds_bos(loaded_bos.tokenizer)
    bos = loaded_bos.tokenizer.bos_token_id
    assert resolve_bos(loaded_bos.tokenizer, "auto").prefix == [bos]
    assert resolve_bos(plain, "auto").prefix == []
    assert resolve_bos(plain, "always").prefix == [bos]
    assert resolve_bos(loaded_bos.tokenizer, "never").prefix == []
    with pytest.raises(SpecError, match="--bos must be one of"):
        resolve_bos(plain, "sometimes")


def test_always_needs_a_bos_token(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.bos_token = None
    with pytest.raises(SpecError, match="no BOS token"):
        resolve_bos(tokenizer, "always")


def test_windows_start_with_bos_which_is_never_scored(loaded_bos):
    model, tokenizer = loaded_bos.model, loaded_bos.tokenizer
    bos = tokenizer.bos_token_id
    text = windowed(tokenizer, TEXT, CTX, None, None, "auto")
    seen = []
    hook = model.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0].tolist()))
    try:
        windows = list(scored_windows(model, text))
    finally:
        hook.remove()
    ids = tokenizer(TEXT.content, add_special_tokens=False)["input_ids"]
    assert ids[0] != bos and bos not in ids
    assert all(w[0] == bos and len(w) == CTX and bos not in w[1:] for w in seen)
    assert len(seen) == len(ids) // (CTX - 1)
    assert all(bos not in w.targets.tolist() and w.targets.numel() == CTX - 1 for w in windows)
    # consecutive windows cover the text without gaps or repeats
    assert sum((w[1:] for w in seen), []) == ids[: len(seen) * (CTX - 1)]


def test_perplexity_with_bos_matches_a_hand_computation(loaded_bos):
    model, tokenizer = loaded_bos.model, loaded_bos.tokenizer
    bos = tokenizer.bos_token_id
    result = token_perplexity(model, tokenizer, TEXT, ctx=CTX, progress=False)
    ids = tokenizer(TEXT.content, add_special_tokens=False)["input_ids"]
    span = CTX - 1
    nll, count = hand_nll(model, ids, [([bos] + ids[s : s + span], span) for s in range(0, len(ids) - span + 1, span)])
    assert result.protocol == "token-ppl+bos" and result.bos == {"mode": "auto", "prepended": True, "bos_token_id": bos}
    assert result.tokens_scored == count and result.windows == len(ids) // span
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_bos_never_is_the_protocol_without_bos(loaded_bos, tiny_llama):
    model, tokenizer = loaded_bos.model, loaded_bos.tokenizer
    never = token_perplexity(model, tokenizer, TEXT, ctx=CTX, progress=False, bos="never")
    ids = tokenizer(TEXT.content, add_special_tokens=False)["input_ids"]
    nll, count = hand_nll(model, ids, [(ids[s : s + CTX], CTX - 1) for s in range(0, len(ids) - CTX + 1, CTX)])
    assert never.protocol == "token-ppl" and not never.bos["prepended"]
    assert (never.tokens_scored, never.windows) == (count, len(ids) // CTX)
    assert never.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    # the same weights with a tokenizer that adds no BOS: auto is exactly the old protocol
    plain = qtool.load(str(tiny_llama), device="cpu")
    assert token_perplexity(plain.model, plain.tokenizer, TEXT, ctx=CTX, progress=False).as_dict() | {"seconds": 0} == \
        never.as_dict() | {"seconds": 0, "bos": {"mode": "auto", "prepended": False, "bos_token_id": None}}


@pytest.mark.parametrize(("n", "ctx", "stride"), [(100, 10, 9), (100, 10, 3), (37, 8, 1)])
def test_bos_windows_score_every_text_token_once(n, ctx, stride):
    plan = window_plan(n, ctx, stride, bos=True)
    positions = [p for start, first in plan for p in range(first, start + ctx - 1)]
    assert len(positions) == len(set(positions))
    assert positions == list(range(0, plan[-1][0] + ctx - 1))  # the first text token has BOS as context
    with pytest.raises(DatasetError, match="ctx 10 less BOS"):
        window_plan(100, 10, 10, bos=True)


def test_calibration_samples_start_with_bos(loaded_bos, tiny_llama):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_llama)
    bos = loaded_bos.tokenizer.bos_token_id
    spec = CalibrationSpec(nsamples=4, seqlen=32)
    with_bos = build_calibration(spec, loaded_bos.tokenizer, config, seed=0)
    assert all(len(s) == 32 and s[0] == bos and bos not in s[1:] for s in with_bos.samples)
    assert with_bos.record["bos"]["prepended"] and with_bos.record["tokens"] == 4 * 32
    without = build_calibration(CalibrationSpec(nsamples=4, seqlen=32, bos="never"), loaded_bos.tokenizer, config, seed=0)
    assert all(len(s) == 32 and bos not in s for s in without.samples)


def test_eval_cli_records_the_rule(tiny_bos, wikitext_test):
    args = ["eval", tiny_bos, "--ppl", wikitext_test, "--ctx", "64", "--max-tokens", "640", "--json", "-"]
    auto = json.loads(qtool_in_process(*args).stdout)["perplexity"]
    never = json.loads(qtool_in_process(*args, "--bos", "never").stdout)["perplexity"]
    assert (auto["protocol"], auto["bos"]["prepended"], auto["windows"], auto["tokens_scored"]) == \
        ("token-ppl+bos", True, 10, 630)
    assert (never["protocol"], never["bos"]["prepended"], never["windows"], never["tokens_scored"]) == \
        ("token-ppl", False, 10, 630)
    assert auto["ppl"] != never["ppl"]
    bad = qtool_in_process(*args, "--bos", "maybe")
    assert bad.returncode != 0 and "--bos" in bad.stderr


def test_lm_eval_scores_text_after_bos_not_bos_itself(tiny_llama, loaded_bos):
    """lm-eval's prefix is BOS either way; a tokenizer that adds BOS must not add a scored second one."""
    pytest.importorskip("lm_eval")
    from qtool.evaluate.lm_harness import word_perplexity

    plain = qtool.load(str(tiny_llama), device="cpu")
    text = Text("t", "inline", TEXT.content[:600])
    ours = word_perplexity(loaded_bos.model, loaded_bos.tokenizer, text, max_length=64)
    reference = word_perplexity(plain.model, plain.tokenizer, text, max_length=64)
    assert ours.bos["prepended"] and not reference.bos["prepended"]
    assert ours.word_perplexity == pytest.approx(reference.word_perplexity, rel=1e-5)
