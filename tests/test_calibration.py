"""Calibration samples: sizes, seeds, and the errors a user can cause."""

import pytest
from transformers import LlamaConfig

from qtool import backends
from qtool.calibration import CalibrationSpec, build_calibration
from qtool.errors import DatasetError, SpecError


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.load_tokenizer()


CONFIG = LlamaConfig(max_position_embeddings=8192)


def test_samples_have_the_requested_shape_and_are_distinct_windows(tokenizer):
    calib = build_calibration(CalibrationSpec("builtin", nsamples=6, seqlen=128), tokenizer, CONFIG, seed=0)
    assert len(calib.samples) == 6 and all(len(s) == 128 for s in calib.samples)
    assert len({tuple(s) for s in calib.samples}) == 6
    record = calib.record
    assert record["nsamples"] == 6 and record["seqlen"] == 128 and record["tokens"] == 768
    assert record["seed"] == 0 and len(record["sha256"]) == 64 and record["text_tokens"] >= 768


def test_the_seed_picks_the_samples(tokenizer):
    spec = CalibrationSpec("builtin", nsamples=4, seqlen=256)
    same = build_calibration(spec, tokenizer, CONFIG, seed=1).samples
    assert build_calibration(spec, tokenizer, CONFIG, seed=1).samples == same
    assert build_calibration(spec, tokenizer, CONFIG, seed=2).samples != same


def test_default_seqlen_is_2048_capped_to_the_context():
    assert CalibrationSpec().resolved_seqlen(8192) == 2048
    assert CalibrationSpec().resolved_seqlen(512) == 512


def test_by_default_a_small_text_gives_all_its_windows(tokenizer):
    calib = build_calibration(CalibrationSpec("builtin"), tokenizer, CONFIG, seed=0)
    assert calib.record["seqlen"] == 2048
    assert calib.record["nsamples"] == calib.record["text_tokens"] // 2048 < 128


def test_text_smaller_than_requested_is_refused_with_what_fits(tokenizer):
    with pytest.raises(DatasetError, match=r"fewer than the 500 × 1024 requested; use at most --nsamples \d+"):
        build_calibration(CalibrationSpec("builtin", nsamples=500, seqlen=1024), tokenizer, CONFIG, seed=0)


def test_seqlen_longer_than_the_context_is_refused(tokenizer):
    with pytest.raises(SpecError, match="longer than the model's context of 512"):
        build_calibration(CalibrationSpec("builtin", seqlen=1024), tokenizer, LlamaConfig(max_position_embeddings=512), 0)


def test_empty_calibration_file_is_refused(tokenizer, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DatasetError, match="is empty"):
        build_calibration(CalibrationSpec(str(empty), nsamples=1, seqlen=16), tokenizer, CONFIG, seed=0)


def test_calibration_flags_are_refused_by_methods_that_do_not_calibrate():
    with pytest.raises(SpecError, match="hqq quantizes without calibration data"):
        backends.get("hqq").make_spec(4, 64, calibration=CalibrationSpec("builtin"))


def test_calibrating_methods_get_the_paper_defaults():
    spec = backends.get("gptq").make_spec(4, 64)
    assert spec.calibration == CalibrationSpec("builtin", None, None)
    assert spec.as_dict()["calibration"] == {"source": "builtin", "nsamples": None, "seqlen": None, "bos": "auto"}
    with pytest.raises(SpecError, match="--nsamples must be at least 1"):
        backends.get("gptq").make_spec(4, 64, calibration=CalibrationSpec("builtin", nsamples=0))
