# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the pin resolves to the local CPU wheel; any other spec would pull CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[train,federated,fleet,agent,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/edgepeft demo

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/lint-imports

test: $(STAMP) lint
	$(BIN)/pytest src tests

clean:
	rm -rf $(VENV) edgepeft-demo
