# The two commands a newcomer runs on a fresh machine (Python 3.11 on PATH as python3.11 or python3):
#   make demo   set up, then embed → train → predict on the sample corpus with the pretrained encoders
#   make test   set up, then run the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := out/demo
# The benchmark's peers (sentence-transformers on PyTorch) in their own venv: torch needs setuptools>=77, which drops
# the pkg_resources that tensorflow_hub imports. Only `make bench` builds it; setup and test never install torch.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed

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

# Two worker processes (pytest-xdist): most tests spend their time in Beam's one Python thread, so a 2-core machine
# runs two at once (about 9 minutes instead of 15–16 on the CI machine kind). A file's tests stay on one worker
# (--dist loadfile): the fixtures a file builds once (test_downstream.py's embedded corpus and trained classifiers)
# are built once. `make test TEST_WORKERS=0` runs them all in this process.
TEST_WORKERS ?= 2

test: setup
	$(BIN)/python -m pytest -q --numprocesses $(TEST_WORKERS) --dist loadfile

lint: setup
	$(BIN)/ruff check .

# Reinstall only when the peers' pins change.
$(PEERS_STAMP): benchmarks/requirements-peers.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/pip install --quiet -r benchmarks/requirements-peers.txt
	touch $(PEERS_STAMP)

bench: setup $(PEERS_STAMP)
	$(BIN)/python benchmarks/bench_throughput.py --peers_python $(PEERS_VENV)/bin/python

clean:
	rm -rf out $(VENV) $(PEERS_VENV)
