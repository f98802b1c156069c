# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_VERSION ?= 2.13.0

.PHONY: demo test bench install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/hesse analyze --example digits --out hesse-report --overwrite
	@echo "Report written to hesse-report/index.html"

test: install
	$(PY) -m pytest

bench:
	bash bench/setup_env.sh
	bench/.venv/bin/python bench/compare.py

clean:
	rm -rf $(VENV) hesse-report
