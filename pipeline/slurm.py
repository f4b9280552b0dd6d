"""Slurm job scripts for a pipeline config: array jobs for stages 1-2, multi-node training.

``python run_pipeline.py emit-slurm --config CFG --out slurm/`` writes one sbatch script per step
and ``submit.sh``, which chains them with ``--dependency=afterok``. Each array task runs one
shard (``$SLURM_ARRAY_TASK_ID`` is the stages' default shard index); a preempted or failed task
is resubmitted with the same command and resumes inside its shard. The ``slurm:`` section of the
config sets the cluster-specific parts.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import from_dict, opt, read_yaml_section
from pipeline.orchestrate import Paths, load_pipeline_config, stage_path_args


@dataclass(kw_only=True)
class SlurmConfig:
    partition: str = opt("", "partition (empty: the cluster default)")
    account: str = opt("", "account to charge (empty: none)")
    setup: str = opt("source .venv/bin/activate", "shell lines run first in every job (modules, venv)")
    gpus_per_node: int = opt(8, "GPUs per node")
    regenerate_gpus: int = opt(1, "GPUs per stage-1 array task (= --tensor-parallel-size)")
    dump_gpus: int = opt(1, "GPUs per stage-2 array task")
    train_nodes: int = opt(1, "nodes for stage 3")
    time_regenerate: str = opt("24:00:00", "time limit per stage-1 task")
    time_dump: str = opt("24:00:00", "time limit per stage-2 task")
    time_train: str = opt("72:00:00", "time limit for training (it resumes from the last checkpoint)")
    max_parallel_tasks: int = opt(64, "array tasks running at once (%N)")


def _header(name: str, s: SlurmConfig, time_limit: str, gpus: int, nodes: int = 1, array: str = "") -> list[str]:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --time={time_limit}",
             f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={gpus}",
             f"#SBATCH --output=logs/{name}-%A_%a.out" if array else f"#SBATCH --output=logs/{name}-%j.out",
             "#SBATCH --requeue"]
    if array:
        lines.append(f"#SBATCH --array={array}")
    if s.partition:
        lines.append(f"#SBATCH --partition={s.partition}")
    if s.account:
        lines.append(f"#SBATCH --account={s.account}")
    return lines + ["set -euo pipefail", s.setup, ""]


def _num_shards(raw: dict, stage: str) -> int:
    return int((raw.get(stage) or {}).get("num_shards", 1))


def emit_slurm(config_path: str, out_dir: Path) -> list[Path]:
    cfg, raw = load_pipeline_config(config_path)
    s = from_dict(SlurmConfig, read_yaml_section(config_path, "slurm") if "slurm" in raw else {}, config_path)
    paths = Paths(Path(cfg.workdir))
    out_dir.mkdir(parents=True, exist_ok=True)
    py = cfg.python
    conf = shlex.quote(config_path)

    def stage_cmd(stage: str, extra: str = "") -> str:
        args = " ".join(shlex.quote(a) for a in stage_path_args(stage, cfg, paths))
        return f"{py} -m stages.{stage} --config {conf} {args} {extra}".rstrip()

    scripts: dict[str, list[str]] = {}
    n1, n2 = _num_shards(raw, "regenerate"), _num_shards(raw, "dump")
    scripts["01-regenerate.sbatch"] = _header("regenerate", s, s.time_regenerate, s.regenerate_gpus,
                                              array=f"0-{n1 - 1}%{s.max_parallel_tasks}") + [
        "# one shard per array task: --shard-index defaults to $SLURM_ARRAY_TASK_ID",
        stage_cmd("regenerate", f"--num-shards {n1} --tensor-parallel-size {s.regenerate_gpus}")]
    scripts["02-dump.sbatch"] = _header("dump", s, s.time_dump, s.dump_gpus,
                                        array=f"0-{n2 - 1}%{s.max_parallel_tasks}") + [
        stage_cmd("dump", f"--num-shards {n2} --device cuda")]
    world = s.train_nodes * s.gpus_per_node
    scripts["03-train.sbatch"] = _header("train", s, s.time_train, s.gpus_per_node, nodes=s.train_nodes) + [
        "# torchrun on every node; DeepSpeed picks up RANK/WORLD_SIZE/MASTER_ADDR from it.",
        "# Rerunning this script after preemption resumes from the last committed checkpoint.",
        "export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)",
        "export MASTER_PORT=29500",
        f"srun torchrun --nnodes {s.train_nodes} --nproc-per-node {s.gpus_per_node} "
        "--rdzv-backend c10d --rdzv-endpoint \"$MASTER_ADDR:$MASTER_PORT\" "
        f"-m stages.train --config {conf} "
        + " ".join(shlex.quote(a) for a in stage_path_args("train", cfg, paths)),
        f"# world size {world}"]
    scripts["04-export-benchmark.sbatch"] = _header("export-benchmark", s, "04:00:00", 1) + [
        stage_cmd("export"), stage_cmd("benchmark")]
    written = []
    for name, lines in scripts.items():
        path = out_dir / name
        path.write_text("\n".join(lines) + "\n")
        written.append(path)
    submit = out_dir / "submit.sh"
    submit.write_text("\n".join([
        "#!/bin/bash", "# Submit the chain; each step starts when the previous one (all array tasks) succeeded.",
        "set -euo pipefail", "mkdir -p logs", f"cd {shlex.quote(str(Path.cwd()))}",
        f"j1=$(sbatch --parsable {out_dir / '01-regenerate.sbatch'})",
        f"j2=$(sbatch --parsable --dependency=afterok:$j1 {out_dir / '02-dump.sbatch'})",
        f"j3=$(sbatch --parsable --dependency=afterok:$j2 {out_dir / '03-train.sbatch'})",
        f"sbatch --dependency=afterok:$j3 {out_dir / '04-export-benchmark.sbatch'}",
        f"echo \"submitted $j1 $j2 $j3; progress: {py} run_pipeline.py status --config {conf}\"", ""]))
    submit.chmod(0o755)
    return written + [submit]
