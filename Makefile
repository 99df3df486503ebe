# The two commands of the README. Each one sets up the environment on a fresh machine first.
#   make demo   - the main job: demo pre-training of the tiny X-FM on the embedded default corpus
#   make test   - the test suite (what .ci/run calls)
SHELL := /bin/bash
VENV = $(shell scripts/bootstrap.sh)
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED = 1

.PHONY: demo test
demo:
	$(VENV)/bin/python tools/demo.py $(ARGS)

test:
	$(VENV)/bin/python -m pytest -q $(ARGS)
