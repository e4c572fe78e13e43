# The two commands a newcomer runs on a fresh machine (Python 3.11 on PATH as python3.11 or python3):
#   make demo   set up, then embed → train → predict on the sample corpus with the pretrained encoders
#   make test   set up, then run the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := out/demo

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# Reinstall only when the pins or the package metadata change.
$(STAMP): constraints.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: setup
	$(BIN)/python scripts/make_sample_corpus.py --output $(DEMO)/corpus --size 600
	$(BIN)/python -m beam_jobs.embed_corpus --input $(DEMO)/corpus/manifest.jsonl \
	    --output $(DEMO)/embeddings --overwrite --l2_normalize --runner DirectRunner
	$(BIN)/python -m beam_jobs.train_classifier --input $(DEMO)/embeddings \
	    --output $(DEMO)/classifier --features both --overwrite
	$(BIN)/python -m beam_jobs.predict --input $(DEMO)/embeddings \
	    --model $(DEMO)/classifier/model --output $(DEMO)/predictions --overwrite

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/bench_throughput.py

clean:
	rm -rf out $(VENV)
