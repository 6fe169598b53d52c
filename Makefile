# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
VENV   ?= .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints-cpu.txt | sha256sum | cut -c1-12)

.PHONY: demo demo-once test test-fast models wheel clean

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints-cpu.txt -e '.[edge,central,convert,test]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/dsnode demo

demo-once: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/dsnode demo --once

models: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/dsnode models build

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q -m "not slow and not systemd"

# The wheel README's "Install on a host" installs (dsnode is not on PyPI): dist/dsnode-*.whl
wheel: $(STAMP)
	$(VENV)/bin/python -m build --wheel --no-isolation --outdir dist .

clean:
	rm -rf $(VENV) build dist *.egg-info
