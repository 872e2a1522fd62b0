# Everything a new user needs. All caches stay in ignored folders inside the repo.
PY ?= python3
VENV := .venv
export PIP_CACHE_DIR := $(CURDIR)/.cache/pip
# The Python entry points (launch scripts, tests, benchmarks) point the other caches, temp dirs and
# wandb files into .cache/ themselves: orchestrator/env.py.

.PHONY: setup test drills smoke clean

# The torch pin goes first so nothing can resolve a CUDA build; editable "compat" mode puts the
# repo root on sys.path, so packages added later import without reinstalling.
$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints-cpu.txt "torch==2.13.0+cpu"
	$(VENV)/bin/pip install -q -c constraints-cpu.txt -e ".[test]" --config-settings editable_mode=compat
	touch $@

setup: $(VENV)/.installed

test: setup
	$(VENV)/bin/python -m pytest

# outside `make test`: the long fault drills (driver kill, torn checkpoint, lost node) and the
# long tail of test matrices (more export cases): about 7 minutes
drills: setup
	$(VENV)/bin/python -m pytest -m "drill or exhaustive"

smoke: setup
	$(VENV)/bin/python launch/r101_asfp.py --smoke

clean:
	rm -rf .cache .work runs
