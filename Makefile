# Set-up and everyday commands. `make demo` and `make test` install what they need on first use.
VENV        ?= .venv
PY          := $(VENV)/bin/python
PYTEST_ARGS ?=
LAB_PORT    ?= 8888
MLFLOW_PORT ?= 5000
EXTRAS      := notebooks,tracking,eval,dev
# The second CI job: the lowest transformers pyproject.toml allows, on CPU torch, with a small test selection.
OLDEST_VENV  ?= .venv-oldest
OLDEST_TF    := $(shell sed -n 's/^ *"transformers>=\([0-9.]*\)",*$$/\1/p' pyproject.toml)
OLDEST_TESTS ?= tests/test_hf_native.py tests/test_model.py

.PHONY: venv demo test test-oldest lab mlflow-ui

venv: $(VENV)/.installed

# Without a CUDA GPU, torch is pinned first: an unpinned request pulls a multi-GB CUDA build
# (docs/environment.md). With a GPU, pip resolves torch from pyproject.toml or keeps the one installed.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

demo: venv
	$(VENV)/bin/hylo-lab demo

test: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -n 2 --durations=15 $(PYTEST_ARGS)

$(OLDEST_VENV)/.installed: pyproject.toml
	test -n "$(OLDEST_TF)" || { echo "no transformers>= floor found in pyproject.toml" >&2; exit 1; }
	test -x $(OLDEST_VENV)/bin/python || python3 -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install -q torch==2.13.0
	$(OLDEST_VENV)/bin/python -m pip install -q "transformers==$(OLDEST_TF)" -e '.[eval,dev]'
	touch $@

test-oldest: $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/python -c 'import transformers as t; assert t.__version__.startswith("$(OLDEST_TF)"), t.__version__'
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(OLDEST_VENV)/bin/python -m pytest -q -p no:xdist $(OLDEST_TESTS) $(PYTEST_ARGS)

lab: venv
	$(VENV)/bin/jupyter lab --ip 127.0.0.1 --port $(LAB_PORT) --no-browser --allow-root

mlflow-ui: venv
	$(VENV)/bin/mlflow server --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--host 127.0.0.1 --port $(MLFLOW_PORT)
