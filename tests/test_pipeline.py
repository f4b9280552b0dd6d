"""The whole chain on CPU on `make demo`'s target, cut down: regenerate -> dump -> train -> export ->
benchmark via run_pipeline.py on the SmolLM2 audio target (a real pretrained 30-layer LLM behind the
project's audio encoder), with the benchmark on spoken prompts of the held-out `eval` split (prompts
neither the target's encoder nor the draft ever heard).

The trained draft served by vLLM must accept clearly more tokens on the held-out prompts than the
untrained draft of the same shape (step 0 of the same run). Stage 1 and the benchmark run in fp32,
whose greedy decoding does not depend on the batch plan on CPU, so speculative outputs must equal
plain ones token for token; and training's decode-walk estimate on its own held-out rows must be
close to what vLLM then measures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Measured with this config on the 2-core AMD EPYC (2026-12-04, the listening target of run 4; 424 s):
# held-out acceptance at k=4 in vLLM 1.00 untrained -> 1.32 trained (per position 0.24/0.07/0.01/0.00),
# training's walk estimate 1.28 (-3%). (The earlier, non-listening encoder's repeated answers gave 1.80.)
# The test asks for at least half of that gain: a draft that learned nothing general stays at 1.0 on
# unseen prompts.
UNTRAINED_MEASURED, TRAINED_MEASURED = 1.00, 1.32
MIN_GAIN = 0.5 * (TRAINED_MEASURED - UNTRAINED_MEASURED)
# `make demo`'s bar for training's estimate vs vLLM is 15%; this cut-down run estimates on 6 eval
# rows (10% of 64 records; measured -3%, -8% on the earlier encoder), so it allows 25%
MAX_ESTIMATE_GAP = 0.25


def test_smol_chain_trained_draft_beats_untrained_on_held_out_prompts(tmp_path, smol_target, espeak_ng):
    config = {
        "workdir": str(tmp_path / "work"),
        "target": str(smol_target),
        "synth_generator": "smol-audio",
        "synth_train_clips": 64,
        "synth_eval_clips": 8,
        "baseline_untrained": True,
        # one shard each: every vLLM engine start costs about a minute on 2 cores
        "regenerate": {"num_shards": 1, "max_new_tokens": 32, "batch_size": 32, "max_model_len": 1024,
                       "dtype": "fp32"},
        "dump": {"num_shards": 1, "batch_tokens": 4096, "max_length": 1024, "dtype": "fp32", "device": "cpu"},
        "train": {"nproc": 2, "zero_stage": 2, "precision": "fp32", "epochs": 1000, "max_steps": 60,
                  "lr": 2e-3, "warmup_ratio": 0.05, "batch_tokens": 1024, "draft_vocab_size": 1024,
                  "init_head": "target", "eval_fraction": 0.1, "save_every": 60, "log_every": 10,
                  "num_workers": 0},
        "benchmark": {"num_spec_tokens": 4, "max_new_tokens": 32, "num_prompts": 8, "max_model_len": 1024,
                      "dtype": "fp32", "repeats": 1},
    }
    cfg_path = tmp_path / "pipeline.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    run = subprocess.run([sys.executable, "run_pipeline.py", "--config", str(cfg_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=1800)
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
        assert result["num_prompts"] == 8 and result["plain"]["errors"] == result["speculative"]["errors"] == 0
        assert result["lossless_verdict"] == "equal" and result["outputs_equal"], result["divergences"]
        assert result["plain"]["dtype"] == result["speculative"]["dtype"] == "fp32"
    # both drafts measured against one plain run (--compare-draft): one plain engine, not two
    assert trained["plain"]["wall_s_all"] == untrained["plain"]["wall_s_all"]
    assert "mean acceptance length" in run.stdout and "training's estimate vs vLLM" in run.stdout

    # stage 1 wrote the served target's answers: 64 records in, 64 regenerated, none rejected
    regen = json.loads((work / "regenerated" / "manifest.json").read_text())
    assert sum(s["accepted"] for s in regen["shards"].values()) == 64

    from pipeline.cluster.orchestrate import Paths, training_vs_serving

    rows = {r["draft"]: r for r in training_vs_serving(Paths(work), "eval")}
    print(rows)
    assert rows["trained"]["step"] == 60 and rows["untrained"]["step"] == 0
    assert rows["trained"]["vllm_acceptance"] == acc_trained
    assert abs(rows["trained"]["relative_difference"]) <= MAX_ESTIMATE_GAP, rows["trained"]

    # a second run finds every stage complete and starts nothing
    again = subprocess.run([sys.executable, "run_pipeline.py", "--config", str(cfg_path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert all(f"stage {s}: complete, skipping" in again.stderr
               for s in ("regenerate", "dump", "train", "export", "benchmark"))
