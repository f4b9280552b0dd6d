"""Pipeline config, status from manifests/locks, and the Slurm scripts it emits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.locks import FileLock
from pipeline.manifest import Manifest
from pipeline.orchestrate import Paths, load_pipeline_config, stage_complete, status_report
from pipeline.slurm import emit_slurm

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, extra: str = "") -> Path:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"workdir: {tmp_path / 'work'}\ntarget: /models/qwen2-audio\ninput: /data/train.jsonl\n"
                   "regenerate:\n  num_shards: 16\ndump:\n  num_shards: 32\n"
                   "slurm:\n  partition: gpu\n  train_nodes: 2\n" + extra)
    return cfg


def test_bad_pipeline_config(tmp_path):
    cfg = write_config(tmp_path, "stages: [regenerate, distill]\n")
    with pytest.raises(ConfigError, match="unknown stages"):
        load_pipeline_config(cfg)
    cfg.write_text("workdir: x\ntarget: t\ninput: i\nregenerate: 3\n")
    with pytest.raises(ConfigError, match="section 'regenerate' must be a mapping"):
        load_pipeline_config(cfg)


def test_status_reads_manifests_and_locks(tmp_path):
    cfg, _ = load_pipeline_config(write_config(tmp_path))
    paths = Paths(Path(cfg.workdir))
    manifest = Manifest(paths.regen)
    manifest.init({"num_shards": 2}, must_match=("num_shards",))
    manifest.mark_shard(0, {"status": "done", "records": 10, "rejected": 1})
    assert not stage_complete("regenerate", paths)
    with FileLock(paths.regen / "locks" / "shard-00001-of-00002.lock"):
        report = status_report(paths)
    assert "regenerate 1/2 shards done" in report
    assert "shard 00000: done {'records': 10, 'rejected': 1}" in report
    assert "running: shard-00001-of-00002" in report
    assert "dump       0/? shards done (not started)" in report
    manifest.mark_shard(1, {"status": "done"})
    assert stage_complete("regenerate", paths)


def test_emit_slurm_scripts(tmp_path):
    cfg = write_config(tmp_path)
    written = emit_slurm(str(cfg), tmp_path / "slurm")
    names = sorted(p.name for p in written)
    assert names == ["01-regenerate.sbatch", "02-dump.sbatch", "03-train.sbatch", "04-export-benchmark.sbatch",
                     "submit.sh"]
    regen = (tmp_path / "slurm" / "01-regenerate.sbatch").read_text()
    assert "#SBATCH --array=0-15%64" in regen and "--num-shards 16" in regen and "#SBATCH --partition=gpu" in regen
    assert "--shard-index" not in regen.split("\n")[-2]  # the task id picks the shard
    assert "#SBATCH --array=0-31%64" in (tmp_path / "slurm" / "02-dump.sbatch").read_text()
    train = (tmp_path / "slurm" / "03-train.sbatch").read_text()
    assert "#SBATCH --nodes=2" in train and "torchrun --nnodes 2 --nproc-per-node 8" in train
    for script in written:
        subprocess.run(["bash", "-n", str(script)], check=True)  # valid shell syntax
    out = subprocess.run([sys.executable, "run_pipeline.py", "status", "--config", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "regenerate 0/? shards done (not started)" in out
