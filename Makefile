# Two commands for a fresh machine (see README.md):
#   make demo   installs what is needed and runs the main job on the built-in demo dataset
#   make test   installs what is needed (.[dev,dali]) and runs ruff and the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xkd-installed

.PHONY: install demo test lint lock clean

$(STAMP): setup.cfg constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -c constraints.txt -e ".[dev,dali]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m xkd.sharding.demo --out data/demo/raw

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

# Re-resolve the pins (keeps the torch 2.11.0 stack) into constraints.txt.
lock: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v -i '^xkd' | sort -f > constraints.tmp
	{ head -n 3 constraints.txt; cat constraints.tmp; } > constraints.new && rm constraints.tmp && mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
