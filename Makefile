# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv idempotently.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
DEMO    := engines/demo-sd15
DEMO_OV := engines/demo-sd15-openvino-fp32
DEMO_ORT := engines/demo-sd15-onnxruntime
DEMO_ADAPT := engines/demo-sd15-adapters
PROMPT  := a photo of an astronaut riding a horse

.PHONY: setup demo test docs lean-check bench-ci clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	@# torch first, pinned: the CPU build on disk (an unpinned torch pulls a multi-GB CUDA build)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[build,dev,serve]"
	rm -f $(VENV)/.installed-*
	touch $@

demo: setup
	$(VENV)/bin/lcm-export build-engine --engine-dir $(DEMO)
	$(VENV)/bin/lcm-export generate --engine-dir $(DEMO) --prompt "$(PROMPT)" --out out/demo.png

test: setup
	$(VPY) -m pytest -q tests

# The docs site (docs/*.md, mkdocs.yml) into out/site; --strict: a broken link, a missing page or anchor fails.
docs: setup
	$(VENV)/bin/mkdocs build --strict -d out/site

# The runtime with the base install only (no extras: no torch, diffusers, transformers), in its own venv,
# on the demo entry (`auto`: OpenVINO bf16 on CPUs with native bf16, else OpenVINO fp32), on
# one entry of each CPU backend, whatever this CPU is, and with a run-time style adapter.
lean-check: demo
	$(VENV)/bin/lcm-export build-engine --engine-dir $(DEMO_OV) --backend openvino --precision fp32 --quiet
	$(VENV)/bin/lcm-export build-engine --engine-dir $(DEMO_ORT) --backend onnxruntime --quiet
	$(VENV)/bin/lcm-export build-engine --engine-dir $(DEMO_ADAPT) --adapters --quiet
	$(VENV)/bin/lcm-export adapter add --engine-dir $(DEMO_ADAPT) --name style --force \
		"$$($(VPY) -c 'from lcm_export.sources.demo import demo_lora_dir, demo_lora_paths; print(demo_lora_paths(demo_lora_dir(), "sd15")[1][0])')"
	test -x .venv-lean/bin/python || $(PY) -m venv .venv-lean
	.venv-lean/bin/python -m pip install -q --upgrade pip
	.venv-lean/bin/python -m pip install -q .
	.venv-lean/bin/python -c "import importlib.util as u, sys; bad = [m for m in ('torch', 'diffusers', 'transformers') if u.find_spec(m)]; sys.exit(f'lean venv has {bad}' if bad else 0)"
	.venv-lean/bin/lcm-export generate --engine-dir $(DEMO) --prompt "$(PROMPT)" --out out/lean.png
	.venv-lean/bin/lcm-export generate --engine-dir $(DEMO_OV) --prompt "$(PROMPT)" --out out/lean-openvino.png
	.venv-lean/bin/lcm-export generate --engine-dir $(DEMO_ORT) --prompt "$(PROMPT)" --out out/lean-onnxruntime.png
	.venv-lean/bin/lcm-export generate --engine-dir $(DEMO_ADAPT) --prompt "$(PROMPT)" --adapter style:0.5 --out out/lean-adapter.png

bench-ci: demo
	$(VENV)/bin/lcm-export bench --engine-dir $(DEMO) --baselines eager,compile --runs 2 --warmup 1 --out out/bench-ci --quiet
	$(VPY) benchmarks/check_report.py out/bench-ci

clean:
	rm -rf $(VENV) .venv-lean out
