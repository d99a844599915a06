# Two self-sufficient entry points: each creates .venv/ first if it is missing or stale.
VENV ?= .venv
QTOOL := $(VENV)/bin/qtool
DEMO_OUT ?= out/smollm2-hqq4
WIKITEXT ?= ../shared/data/wikitext-2/test.txt

.PHONY: venv demo test test-all lint clean

venv:
	@./scripts/setup-venv.sh

## demo: quantize the built-in SmolLM2-135M with HQQ 4-bit, answer one prompt with it, evaluate it next to the base.
demo: venv
	$(QTOOL) methods
	$(QTOOL) quantize --method hqq --bits 4 --group-size 64 --force smollm2-135m $(DEMO_OUT)
	$(QTOOL) generate $(DEMO_OUT) "Give me three tips for staying focused while studying." --max-new-tokens 160
	$(QTOOL) eval smollm2-135m --ppl $(or $(wildcard $(WIKITEXT)),builtin) --ctx 512 --max-tokens 8192
	$(QTOOL) eval $(DEMO_OUT) --ppl $(or $(wildcard $(WIKITEXT)),builtin) --ctx 512 --max-tokens 8192

## test: the default suite (what CI runs).
test: venv
	$(VENV)/bin/python -m pytest -m "not slow" -q --durations=10

## test-all: include the slow full-model runs.
test-all: venv
	$(VENV)/bin/python -m pytest -q

lint: venv
	$(VENV)/bin/ruff check qtool tests

clean:
	rm -rf out .pytest_cache
