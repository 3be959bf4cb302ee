# The README's two commands: `make serve` and `make test`. Each sets up a fresh machine itself.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install serve test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Without a GPU take the CPU wheel first, so nothing later pulls a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

serve: install
	$(VENV)/bin/trisect serve $(ARGS)

test: install
	$(PY) -m pytest -q tests $(ARGS)

bench: install
	$(VENV)/bin/trisect bench engine $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
