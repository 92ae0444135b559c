# Set-up and everyday commands. `make demo` and `make test` install what they need on first use.
VENV        ?= .venv
PY          := $(VENV)/bin/python
PYTEST_ARGS ?=
LAB_PORT    ?= 8888
MLFLOW_PORT ?= 5000
EXTRAS      := notebooks,tracking,eval,dev

.PHONY: venv demo test lab mlflow-ui

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

lab: venv
	$(VENV)/bin/jupyter lab --ip 127.0.0.1 --port $(LAB_PORT) --no-browser --allow-root

mlflow-ui: venv
	$(VENV)/bin/mlflow server --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--host 127.0.0.1 --port $(MLFLOW_PORT)
