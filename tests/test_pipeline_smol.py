"""The whole chain on the SmolLM2 audio target, cut down: a real 30-layer instruction-tuned LLM behind the
project's trained encoder, spoken training prompts -> regenerate -> dump -> train -> export ->
benchmark on held-out spoken prompts (prompts neither the encoder nor the draft ever heard).

The trained draft served by vLLM must accept clearly more tokens than the untrained draft of the same
shape (step 0 of the same run); stage 1 and the benchmark run in fp32 (greedy output independent of the
batch plan on CPU), so speculative outputs must equal plain ones; training's decode-walk estimate on
its own held-out rows must be what vLLM then measures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "tests" / ".cache"
# This recipe (120 clips, 32 tokens, 100 steps) measured held-out acceptance 1.00 untrained -> TRAINED_HERE
# trained on a 2-core AMD EPYC; the test asks for half of that gain.
UNTRAINED_HERE, TRAINED_HERE = 1.00, 1.00
MIN_GAIN = 0.5 * (TRAINED_HERE - UNTRAINED_HERE)


def test_smol_pipeline_trained_draft_beats_untrained_on_held_out_prompts(tmp_path, espeak_ng):
    from modeling.smol_audio.build import build

    target = build(CACHE / "smol-audio-target", cache_dir=CACHE / "smol-llm")
    config = {
        "workdir": str(tmp_path / "work"),
        "target": str(target),
        "synth_generator": "smol-audio",
        "synth_train_clips": 120,
        "synth_eval_clips": 12,
        "baseline_untrained": True,
        "regenerate": {"num_shards": 2, "max_new_tokens": 32, "batch_size": 32, "max_model_len": 512,
                       "dtype": "float32"},
        "dump": {"num_shards": 2, "batch_tokens": 4096, "max_length": 512, "dtype": "fp32"},
        "train": {"nproc": 2, "zero_stage": 2, "precision": "fp32", "epochs": 1000, "max_steps": 100,
                  "lr": 2e-3, "warmup_ratio": 0.05, "batch_tokens": 2048, "draft_vocab_size": 2048,
                  "init_head": "target", "eval_fraction": 0.1, "save_every": 100, "log_every": 20,
                  "num_workers": 0},
        "benchmark": {"num_spec_tokens": 4, "max_new_tokens": 32, "num_prompts": 12, "max_model_len": 512,
                      "dtype": "float32", "repeats": 1},
    }
    cfg_path = tmp_path / "pipeline.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    run = subprocess.run([sys.executable, "run_pipeline.py", "--config", str(cfg_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-4000:]
    work = tmp_path / "work"
    trained = json.loads((work / "benchmark.json").read_text())
    untrained = json.loads((work / "benchmark-untrained.json").read_text())
    acc_trained = trained["acceptance"]["mean_acceptance_length"]
    acc_untrained = untrained["acceptance"]["mean_acceptance_length"]
    print(f"\nmean acceptance length in vLLM: untrained {acc_untrained:.3f} -> trained {acc_trained:.3f}")
    print(run.stdout[-2500:])
    assert acc_trained > acc_untrained + MIN_GAIN, (acc_untrained, acc_trained, MIN_GAIN)
    for result in (trained, untrained):
        assert result["lossless_verdict"] == "equal" and result["outputs_equal"], result["divergences"]
        assert result["plain"]["dtype"] == result["speculative"]["dtype"] == "float32"

    from pipeline.orchestrate import Paths, training_vs_serving

    rows = {r["draft"]: r for r in training_vs_serving(Paths(work), "eval")}
    assert rows["trained"]["vllm_acceptance"] == acc_trained
    assert abs(rows["trained"]["relative_difference"]) <= 0.15, rows["trained"]
