# Two self-sufficient entry points: each creates .venv/ first if it is missing or stale.
VENV ?= .venv
QTOOL := $(VENV)/bin/qtool
DEMO_OUT ?= out/smollm2-hqq4
WIKITEXT ?= ../shared/data/wikitext-2/test.txt

WEBUI_PORT ?= 7860
# pytest-xdist workers for make test (one per core of a CI machine; each computes on one thread)
TEST_WORKERS ?= 2

.PHONY: venv demo webui test test-all test-engines engine-vllm engine-llamacpp lint clean

venv:
	@./scripts/setup-venv.sh

## demo: quantize the built-in SmolLM2-135M with HQQ 4-bit, answer one prompt with it, evaluate it next to the base.
demo: venv
	$(QTOOL) methods
	$(QTOOL) quantize --method hqq --bits 4 --group-size 64 --force smollm2-135m $(DEMO_OUT)
	$(QTOOL) generate $(DEMO_OUT) "Give me three tips for staying focused while studying." --max-new-tokens 160
	$(QTOOL) eval smollm2-135m --ppl $(or $(wildcard $(WIKITEXT)),builtin) --ctx 512 --max-tokens 8192
	$(QTOOL) eval $(DEMO_OUT) --ppl $(or $(wildcard $(WIKITEXT)),builtin) --ctx 512 --max-tokens 8192

## webui: the web page (Quantize, Compare, Fine-tune, Chat, Merge / export tabs) on http://127.0.0.1:$(WEBUI_PORT).
webui: venv
	$(QTOOL) webui --port $(WEBUI_PORT)

## test: the default suite (what CI runs).
test: venv
	$(VENV)/bin/python -m pytest -m "not slow and not engines" -q --durations=10 -n $(TEST_WORKERS) --dist loadfile

## test-all: include the slow full-model runs (and the engine tests where the engines are set up).
test-all: venv
	$(VENV)/bin/python -m pytest -q

## engine-vllm / engine-llamacpp: a serving engine's own environment under .engines/ (vLLM CPU ~2 min and
## 3.5 GB; llama.cpp ~9 min source build on 2 cores). qtool drives each as a subprocess.
engine-vllm:
	@./scripts/setup-engine.sh vllm

engine-llamacpp:
	@./scripts/setup-engine.sh llamacpp

## test-engines: checkpoints loaded in vLLM and llama.cpp, tokens and perplexity against transformers'
## (not in CI: the engines' set-up and runs do not fit its ~25 min suite budget).
test-engines: venv engine-vllm engine-llamacpp
	$(VENV)/bin/python -m pytest -m engines -q --durations=10

lint: venv
	$(VENV)/bin/ruff check qtool tests

clean:
	rm -rf out .pytest_cache
