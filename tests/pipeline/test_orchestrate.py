"""Pipeline config, status from manifests/locks, and the Slurm scripts it emits."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cluster.orchestrate import (
    Paths,
    check_extra_stores,
    load_pipeline_config,
    stage_complete,
    stage_path_args,
    status_report,
)
from pipeline.cluster.slurm import emit_slurm
from pipeline.core.config import ConfigError
from pipeline.core.locks import FileLock
from pipeline.core.manifest import Manifest

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


def test_train_extra_stores_join_the_runs_own(tmp_path):
    """Stage 3 of a pipeline with train_extra_stores trains on its own store and those, as one set;
    a path that is no store is refused before any stage runs."""
    made = tmp_path / "sampled-store"
    made.mkdir()
    (made / "manifest.json").write_text("{}")
    cfg, _ = load_pipeline_config(write_config(tmp_path, f"train_extra_stores: [{made}]\n"))
    args = stage_path_args("train", cfg, Paths(Path(cfg.workdir)))
    assert args[args.index("--store") + 1] == f"{tmp_path / 'work' / 'store'},{made}"
    check_extra_stores(cfg, ["regenerate", "train"])
    cfg, _ = load_pipeline_config(write_config(tmp_path, f"train_extra_stores: [{tmp_path / 'nowhere'}]\n"))
    with pytest.raises(ConfigError, match=r"train_extra_stores: .*nowhere is not a hidden-state store"):
        check_extra_stores(cfg, ["regenerate", "dump", "train"])
    check_extra_stores(cfg, ["regenerate", "dump"])  # a run that does not train does not need them yet
    with pytest.raises(ConfigError, match="store paths without commas"):
        load_pipeline_config(write_config(tmp_path, "train_extra_stores: ['a,b']\n"))


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
    # a killed stage-2 task: its lock (owner pid gone) and its shard's progress log stay behind
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = paths.store / "locks" / "shard-00001-of-00003.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "slurm_job": "7_1.batch.0"}))
    progress = paths.store / "shards" / ".shard-00001.tmp" / "progress.jsonl"
    progress.parent.mkdir(parents=True)
    rows = [{"kind": "header"}, {"kind": "sample"}, {"kind": "commit", "num_samples": 1}, {"kind": "sample"},
            {"kind": "commit", "num_samples": 2}]
    progress.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "sam')  # torn last line
    report = status_report(paths)
    assert "    in progress: shard 00001 (2 samples durable)" in report
    assert f"stale lock (owner gone): shard-00001-of-00003 on {socket.gethostname()} pid {dead.stdout.strip()} " \
           "Slurm job 7_1.batch.0" in report
    assert progress.read_text().endswith('"sam')  # status only reads


def test_emit_slurm_scripts(tmp_path):
    cfg = write_config(tmp_path)
    written = emit_slurm(str(cfg), tmp_path / "slurm")
    names = sorted(p.name for p in written)
    assert names == ["01-regenerate.sbatch", "02-dump.sbatch", "03-train.sbatch", "04-export-benchmark.sbatch",
                     "submit.sh"]
    regen = (tmp_path / "slurm" / "01-regenerate.sbatch").read_text()
    assert "#SBATCH --array=0-15\n" in regen and "--num-shards 16" in regen and "#SBATCH --partition=gpu" in regen
    assert "--shard-index" not in regen.split("\n")[-2]  # the task id picks the shard
    assert "#SBATCH --gpus-per-node=1" in regen and "--tensor-parallel-size 1" in regen
    dump = (tmp_path / "slurm" / "02-dump.sbatch").read_text()
    assert "#SBATCH --array=0-31\n" in dump and "--device cuda" in dump
    train = (tmp_path / "slurm" / "03-train.sbatch").read_text()
    assert "#SBATCH --nodes=2" in train and "-m torch.distributed.run --nnodes 2 --nproc-per-node 8" in train
    assert "--nproc 16 --check-only" in train  # the launcher's checks, with the job's world size
    submit = (tmp_path / "slurm" / "submit.sh").read_text()
    assert submit.count("--kill-on-invalid-dep=yes") == 3 and f"mkdir -p {tmp_path / 'slurm' / 'logs'}" in submit
    for script in written:
        text = script.read_text()
        assert script.name == "submit.sh" or f"#SBATCH --output={tmp_path / 'slurm' / 'logs'}/" in text
        subprocess.run(["bash", "-n", str(script)], check=True)  # valid shell syntax
        # every path into this checkout the job runs (the entry point, PYTHONPATH) exists: a package move
        # that left a stale root here failed only on a real Slurm
        repo_paths = set(re.findall(rf"{re.escape(str(ROOT))}[^\s:$}}\"']*", text))
        assert repo_paths or script.name == "submit.sh", script.name
        assert all(Path(p).exists() for p in repo_paths), sorted(repo_paths)
    out = subprocess.run([sys.executable, "run_pipeline.py", "status", "--config", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "regenerate 0/? shards done (not started)" in out


def test_emit_slurm_for_cpus_and_a_subset_of_stages(tmp_path):
    cfg = write_config(tmp_path, "  gpus_per_node: 0\n  regenerate_gpus: 0\n  dump_gpus: 0\n  benchmark_gpus: 0\n"
                                 "  train_procs_per_node: 2\n  dump_cpus: 3\n  max_parallel_tasks: 4\n"
                                 "  time_dump: '01:00:00'\n  max_requeues: 0\nstages: [dump, train]\n")
    written = {p.name: p.read_text() for p in emit_slurm(str(cfg), tmp_path / "slurm")}
    assert sorted(written) == ["02-dump.sbatch", "03-train.sbatch", "submit.sh"]
    dump, train = written["02-dump.sbatch"], written["03-train.sbatch"]
    assert not any("--gpus" in t for t in written.values()) and "--device cpu" in dump
    assert "#SBATCH --array=0-31%4\n" in dump and "#SBATCH --cpus-per-task=3" in dump and "--time=01:00:00" in dump
    assert "--nproc-per-node 2" in train and "--nproc 4 --check-only" in train
    assert '-lt 0 ]' in dump  # max_requeues 0: exit 1 fails the job like any other status
    assert written["submit.sh"].count("sbatch --parsable") == 2
    bad = write_config(tmp_path, "  gpus_per_node: 0\n")
    with pytest.raises(ConfigError, match="needs train_procs_per_node"):
        emit_slurm(str(bad), tmp_path / "bad")
