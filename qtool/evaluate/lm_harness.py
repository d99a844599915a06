"""Word perplexity through lm-evaluation-harness itself, on a local text, offline.

lm-eval's built-in `wikitext` task downloads its documents from the Hub. qtool writes a task of
the same shape into a temporary folder instead: `dataset_path: json` over a local JSONL of
documents, and lm-eval's own wikitext detokenizer and `process_results` (imported, not copied),
so the numbers are lm-eval's `word_perplexity`, `byte_perplexity` and `bits_per_byte` from
`loglikelihood_rolling`. The model already in memory goes in through lm-eval's `HFLM` wrapper.

A WikiText file is cut into articles at its top-level ` = Title = ` headings, as in the
document-level release lm-eval uses; any other text is one document (lm-eval rolls its
windows over it). Word perplexity divides by whitespace-separated words of the original documents: it is
not token perplexity and the two must never be compared with each other.

BOS (qtool.bos): lm-eval rolls windows of max_length over each document; its first window starts
with a prefix token (BOS, or EOS when the tokenizer has none) and later windows take the preceding
text as context. When qtool's rule prepends BOS, the prefix is BOS and the text is encoded without
special tokens, so BOS comes once per document and is never scored; otherwise lm-eval's default
prefix is kept (today's numbers). Either way `add_bos_token=False`: a tokenizer that adds BOS by
itself would otherwise make lm-eval score a second BOS after the prefix.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qtool.bos import resolve_bos
from qtool.data import Text
from qtool.errors import QtoolError
from qtool.runtime import library_output_to

PROTOCOL = "lm-eval word-ppl (loglikelihood_rolling, wikitext metrics)"
TASK = "qtool_local_wordppl"
_HEADING = re.compile(r"^ = [^=].* = $")

_TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: !function hooks.wikitext_detokenizer
process_results: !function hooks.process_results
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""
_HOOKS = "from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa: F401\n"


@dataclass(frozen=True)
class WordPerplexityResult:
    protocol: str
    harness: str  # lm-eval's version
    metric: str  # the name lm-eval gives the number
    word_perplexity: float
    byte_perplexity: float
    bits_per_byte: float
    documents: int
    max_length: int
    dataset: dict[str, Any]
    seconds: float
    bos: dict[str, Any]  # qtool.bos.BosRule.record(): BOS as lm-eval's prefix token when prepended

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (f"  lm-eval word_perplexity {self.word_perplexity:.3f}, bits_per_byte {self.bits_per_byte:.4f} "
                f"[lm-evaluation-harness {self.harness}, loglikelihood_rolling, max length {self.max_length}, "
                f"{self.documents} documents] (word PPL: not comparable with token PPL)")


def split_documents(text: Text) -> list[str]:
    """WikiText articles at top-level headings; any other text is one document."""
    lines = text.content.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _HEADING.match(line.rstrip("\n"))]
    if not starts:
        return [text.content]
    starts[0] = 0  # anything before the first heading belongs to the first article
    bounds = [*starts, len(lines)]
    return ["".join(lines[a:b]) for a, b in zip(bounds, bounds[1:], strict=False) if "".join(lines[a:b]).strip()]


def word_perplexity(model: Any, tokenizer: Any, text: Text, max_length: int = 2048, limit: int | None = None,
                    bos: str = "auto", batch_size: int = 1) -> WordPerplexityResult:
    """Run lm-eval's rolling-loglikelihood word perplexity on `text` (first `limit` documents);
    `bos` is a qtool.bos mode (see the module docstring)."""
    import time

    rule = resolve_bos(tokenizer, bos)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise QtoolError("lm-eval word perplexity needs lm-evaluation-harness: pip install 'qtool[eval]'") from None

    documents = split_documents(text)
    if limit is not None:
        documents = documents[:limit]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qtool-lmeval-") as folder:
        data = Path(folder) / "documents.jsonl"
        data.write_text("".join(json.dumps({"page": doc}) + "\n" for doc in documents))
        (Path(folder) / "hooks.py").write_text(_HOOKS)
        (Path(folder) / f"{TASK}.yaml").write_text(_TASK_YAML.format(task=TASK, data=json.dumps(str(data))))
        with _harness_quiet(Path(folder) / "lm-eval.log"):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                      add_bos_token=False, prefix_token_id=rule.token_id)
            output = lm_eval.simple_evaluate(
                model=lm, tasks=[TASK], task_manager=TaskManager(include_path=folder), log_samples=False,
                random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
            )
    metrics = output["results"][TASK]
    return WordPerplexityResult(
        protocol=PROTOCOL, harness=_version("lm_eval"),
        metric="word_perplexity,none", word_perplexity=float(metrics["word_perplexity,none"]),
        byte_perplexity=float(metrics["byte_perplexity,none"]), bits_per_byte=float(metrics["bits_per_byte,none"]),
        documents=len(documents), max_length=max_length, dataset={**text.describe(), "documents": len(documents)},
        seconds=round(time.perf_counter() - started, 3), bos=rule.record(),
    )


@contextmanager
def _harness_quiet(log_path: Path) -> Iterator[None]:
    """lm-eval draws a progress bar per request batch, logs the defaults it filled in and runs
    `git describe` (whose error lands on the terminal): all of that goes to a log instead."""
    import datasets
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.models.huggingface
    from tqdm import tqdm

    def silent(*args: Any, **kwargs: Any) -> Any:
        kwargs["disable"] = True
        return tqdm(*args, **kwargs)

    modules = (lm_eval.api.model, lm_eval.api.task, lm_eval.models.huggingface)
    logger, level = logging.getLogger("lm_eval"), logging.getLogger("lm_eval").level
    bars = datasets.is_progress_bar_enabled()
    try:
        logger.setLevel(logging.ERROR)
        datasets.disable_progress_bars()
        for module in modules:
            module.tqdm = silent
        with library_output_to(log_path):
            yield
    finally:
        for module in modules:
            module.tqdm = tqdm
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _version(distribution: str) -> str:
    from importlib.metadata import version

    return version(distribution)
