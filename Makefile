# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# `make test-fast`: the fast tier (no torch, no transformers, no ONNX Runtime, no bundled models) in a
# venv of its own with only the base install and the `test` extra, so it shows the tier needs nothing more.
VENV      ?= .venv
FAST_VENV ?= .venv-fast
PYTHON    ?= python3
DEPS      := $(shell cat pyproject.toml constraints-cpu.txt | sha256sum | cut -c1-12)
STAMP     := $(VENV)/.installed-$(DEPS)
FAST_STAMP := $(FAST_VENV)/.installed-$(DEPS)
# what the fast tier leaves out: real processes, a booted systemd, and anything needing the models
FAST_TIER := -m "not slow and not systemd and not model"

.PHONY: demo demo-once test test-fast models wheel clean

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints-cpu.txt -e '.[edge,central,convert,test]'
	rm -f $(VENV)/.installed-*
	touch $@

$(FAST_STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(FAST_VENV)
	$(FAST_VENV)/bin/pip install -q --upgrade pip
	$(FAST_VENV)/bin/pip install -q -c constraints-cpu.txt -e '.[test]'
	rm -f $(FAST_VENV)/.installed-*
	touch $@

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/dsnode demo

demo-once: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/dsnode demo --once

models: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/dsnode models build

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

test-fast: $(FAST_STAMP)
	HF_HUB_OFFLINE=1 $(FAST_VENV)/bin/python -m pytest -q $(FAST_TIER)

# The wheel README's "Install on a host" installs (dsnode is not on PyPI): dist/dsnode-*.whl
wheel: $(STAMP)
	$(VENV)/bin/python -m build --wheel --no-isolation --outdir dist .

clean:
	rm -rf $(VENV) $(FAST_VENV) build dist *.egg-info
