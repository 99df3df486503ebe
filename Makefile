# The two commands of the README. Each one sets up the environment on a fresh machine first.
#   make demo   - the main job: demo pre-training of the tiny X-FM on the embedded default corpus
#   make test   - the test suite (what .ci/run calls)
SHELL := /bin/bash
VENV = $(shell scripts/bootstrap.sh)
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED = 1
# This checkout's own code, whatever else the shared environment holds (scripts/bootstrap.sh).
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: demo test which
demo:
	$(VENV)/bin/python tools/demo.py $(ARGS)

test:
	$(VENV)/bin/python -m pytest -q $(ARGS)

which:  # which xfm_scale this checkout's commands import
	@$(VENV)/bin/python -c 'import xfm_scale; print(xfm_scale.__file__)'
