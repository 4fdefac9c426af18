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

# The whole chain on the built-in demo dataset: train.py generates it and runs xkd-shard when data/demo/shards is
# absent (train.make_demo_data, the one recipe), pretrains XKD (configs/demo.yaml) and exports; eval.py then
# runs the linear probes on the export (one train view and one test clip per video, to stay within minutes on a
# 2-core CPU; `python eval.py --probe linear` alone uses the demo benchmark's 4 and 2) and the last command prints
# their accuracies as one table. Time on a 2-core CPU: docs/ablation.md.
demo: $(STAMP)
	$(VENV)/bin/accelerate launch --num_processes 1 train.py
	for m in video audio audio+video; do \
		$(PY) eval.py --probe linear --modality $$m --train_views 1 --test_clips 1 || exit 1; done
	$(PY) benchmarks/ablation.py --summarize runs/demo/eval

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
