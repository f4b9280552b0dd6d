#!/usr/bin/env bash
# The CUDA path in one prepared script (issue: "GPU, when one is lent"). On a machine with an NVIDIA GPU
# and the package index reachable:
#     bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. installs the `gpu` extra (`make venv-gpu`: vLLM's CUDA build and its torch);
# 2. runs `make demo`'s chain on the SmolLM2 audio target sized for a GPU (configs/demo-gpu.yaml), every
#    stage recording its peak memory (torch.cuda max allocated/reserved), tokens/s and, for training,
#    MFU against the GPU's peak (docs/memory.md), while nvidia-smi samples utilisation and memory at 1 Hz;
# 3. runs the audio-vs-text comparison at a larger size (docs/audio-vs-text.md);
# 4. writes OUT_DIR/summary.json: GPU name, the chain's summary, utilisation mean/p90/max, memory max.
# Every step resumes: rerun the same command after an interruption. Not run yet (README "Status").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-work/gpu-check}
mkdir -p "$OUT"
command -v nvidia-smi >/dev/null || { echo "gpu_check: no nvidia-smi: this script is for a CUDA machine" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
[ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || make venv-gpu
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 > "$OUT/nvidia-smi.csv" &
SAMPLER=$!
trap 'kill $SAMPLER 2>/dev/null || true' EXIT
.venv/bin/python run_pipeline.py --config configs/demo-gpu.yaml 2>&1 | tee "$OUT/chain.log"
.venv/bin/python -m benchmarks.bench_audio_vs_text --workdir "$OUT/audio-vs-text" --records 640 \
    --max-new-tokens 128 --train-steps 400 --seeds 0 1 --eval-prompts 50 --repeats 3 \
    --spoken-regen work/demo-gpu/regenerated 2>&1 | tee "$OUT/audio-vs-text.log"
kill $SAMPLER 2>/dev/null || true
.venv/bin/python - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [line.split(", ") for line in (out / "nvidia-smi.csv").read_text().splitlines() if line.count(",") == 2]
util = sorted(float(r[1]) for r in rows)
summary = {"gpu": (out / "gpu.csv").read_text().splitlines()[1:],
           "utilisation_pct": {"mean": statistics.fmean(util), "p90": util[int(0.9 * (len(util) - 1))], "max": util[-1]}
           if util else None,
           "memory_used_mib_max": max((float(r[2]) for r in rows), default=None),
           "demo_benchmark": json.loads(Path("work/demo-gpu/benchmark.json").read_text()),
           "audio_vs_text": json.loads((out / "audio-vs-text" / "result.json").read_text())}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({k: summary[k] for k in ("gpu", "utilisation_pct", "memory_used_mib_max")}, indent=1))
PY
