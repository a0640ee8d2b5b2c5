# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv idempotently.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEMO    := engines/demo-sd15

.PHONY: setup demo test lean-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on disk (an unpinned torch pulls a multi-GB CUDA build)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[build,dev]"
	rm -f $(VENV)/.installed-*
	touch $@

demo: setup
	$(VENV)/bin/lcm-export build-engine --engine-dir $(DEMO) --resolution 128x128
	$(VENV)/bin/lcm-export generate --engine-dir $(DEMO) --prompt "a photo of an astronaut riding a horse" --out out/demo.png
	@echo "demo image: out/demo.png  (demo model with random weights: the image is noise)"

test: setup
	$(VPY) -m pytest -q tests

clean:
	rm -rf $(VENV) out
