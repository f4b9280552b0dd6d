"""Slurm job scripts for a pipeline config: array jobs for stages 1-2, torchrun training, one chain.

``python run_pipeline.py emit-slurm --config CFG --out slurm/`` writes one sbatch script per step
and ``submit.sh``, which chains them with ``--dependency=afterok`` (a failed step cancels the rest
of its chain). Each array task runs one shard (``$SLURM_ARRAY_TASK_ID`` is the stages' default
shard index). Preempted or failed work is picked up by resubmitting the same ``submit.sh``: done
shards and stages are skipped, an unfinished one resumes. The ``slurm:`` section of the config
sets the cluster-specific parts; ``tests/test_slurm.py`` runs these scripts on a real Slurm.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from pipeline.cluster.orchestrate import Paths, load_pipeline_config, stage_path_args
from pipeline.core.cli import EXIT_SERVICE
from pipeline.core.config import from_dict, opt, read_yaml_section, require

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(kw_only=True)
class SlurmConfig:
    partition: str = opt("", "partition (empty: the cluster default)")
    account: str = opt("", "account to charge (empty: none)")
    setup: str = opt("source .venv/bin/activate", "shell lines run first in every job (modules, venv); "
                                                 "the interpreter is the pipeline's `python`")
    gpus_per_node: int = opt(8, "GPUs per training node (0: a CPU job, no --gpus-per-node line)")
    regenerate_gpus: int = opt(1, "GPUs per stage-1 array task (= --tensor-parallel-size; 0: CPU vLLM)")
    dump_gpus: int = opt(1, "GPUs per stage-2 array task (0: --device cpu)")
    benchmark_gpus: int = opt(1, "GPUs of the export + benchmark job")
    regenerate_cpus: int = opt(8, "CPUs per stage-1 array task")
    dump_cpus: int = opt(8, "CPUs per stage-2 array task")
    train_cpus_per_node: int = opt(32, "CPUs per training node (all its processes together)")
    benchmark_cpus: int = opt(8, "CPUs of the export + benchmark job")
    train_nodes: int = opt(1, "nodes for stage 3")
    train_procs_per_node: int = opt(0, "training processes per node (0: gpus_per_node)")
    master_port: int = opt(0, "torchrun rendezvous port (0: 20000 + job id % 20000, so that two training "
                              "jobs sharing a node do not collide)")
    time_regenerate: str = opt("24:00:00", "time limit per stage-1 task")
    time_dump: str = opt("24:00:00", "time limit per stage-2 task")
    time_train: str = opt("72:00:00", "time limit for training (it resumes from the last checkpoint)")
    time_benchmark: str = opt("04:00:00", "time limit of the export + benchmark job")
    max_parallel_tasks: int = opt(64, "array tasks running at once (the %N of --array)")
    max_requeues: int = opt(2, "a job that exits 1 (an engine, a rank or a peer failed; durable progress is kept) "
                               "requeues itself while Slurm restarted it fewer times than this (preemptions "
                               "count); 2 (input) and 3 (disk) are never retried")

    def __post_init__(self) -> None:
        for name in ("regenerate_cpus", "dump_cpus", "train_cpus_per_node", "benchmark_cpus", "train_nodes",
                     "max_parallel_tasks"):
            require(getattr(self, name) >= 1, f"slurm: {name} must be >= 1")
        for name in ("gpus_per_node", "regenerate_gpus", "dump_gpus", "benchmark_gpus", "train_procs_per_node",
                     "max_requeues"):
            require(getattr(self, name) >= 0, f"slurm: {name} must be >= 0")
        require(self.train_procs_per_node > 0 or self.gpus_per_node > 0,
                "slurm: a CPU training job (gpus_per_node: 0) needs train_procs_per_node")

    @property
    def procs_per_node(self) -> int:
        return self.train_procs_per_node or self.gpus_per_node


# Exit statuses (pipeline.core.cli): 1 means a service, a rank or a peer failed and durable progress is
# kept, so a rerun helps and the job requeues itself, at most max_requeues times (Slurm holds a
# requeued job ~120 s before it may start again, a natural back-off). 2 (configuration, input,
# lock) and 3 (disk full, quota) fail the job at once: a rerun cannot fix them.
RUN_FUNCTION = """\
run() {{
  local rc=0 job="${{SLURM_ARRAY_JOB_ID:+${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}}}"
  job="${{job:-$SLURM_JOB_ID}}"  # an array task by its own id: the bare array job id would requeue every task
  "$@" || rc=$?
  if [ "$rc" -eq {service} ] && [ "${{SLURM_RESTART_COUNT:-0}}" -lt {max_requeues} ]; then
    echo "ae3: exit $rc (a rerun helps): requeueing $job, restart $((${{SLURM_RESTART_COUNT:-0}} + 1)) of {max_requeues}" >&2
    scontrol requeue "$job" && exit 0
  fi
  [ "$rc" -eq 0 ] || echo "ae3: exit $rc from: $*" >&2
  return "$rc"
}}"""


class _Emitter:
    def __init__(self, config_path: str, out_dir: Path):
        self.cfg, self.raw = load_pipeline_config(config_path)
        section = read_yaml_section(config_path, "slurm") if "slurm" in self.raw else {}
        self.s = from_dict(SlurmConfig, section, f"{config_path}: slurm")
        self.paths = Paths(Path(self.cfg.workdir))
        self.conf = str(Path(config_path).resolve())
        self.out_dir = out_dir.resolve()
        self.logs = self.out_dir / "logs"

    def num_shards(self, stage: str) -> int:
        return int((self.raw.get(stage) or {}).get("num_shards", 1))

    def header(self, name: str, time_limit: str, gpus: int, cpus: int, nodes: int = 1, array: str = "") -> list[str]:
        s = self.s
        lines = ["#!/bin/bash", f"#SBATCH --job-name=ae3-{name}", f"#SBATCH --time={time_limit}",
                 f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1", f"#SBATCH --cpus-per-task={cpus}"]
        if gpus:
            lines.append(f"#SBATCH --gpus-per-node={gpus}")
        if array:
            lines.append(f"#SBATCH --array={array}")
        lines += [f"#SBATCH --partition={s.partition}"] if s.partition else []
        lines += [f"#SBATCH --account={s.account}"] if s.account else []
        pattern = f"{name}-%A_%a.out" if array else f"{name}-%j.out"
        lines += [f"#SBATCH --chdir={Path.cwd()}",  # relative paths in the config mean what they meant here
                  f"#SBATCH --output={self.logs / pattern}",
                  "#SBATCH --open-mode=append  # a requeued run appends: the preempted run's log stays",
                  "#SBATCH --requeue           # preemption or node failure: back in the queue, resumes",
                  "set -euo pipefail"]
        lines += [s.setup] if s.setup.strip() else []
        # this checkout's modules, whatever the job's working directory
        lines += [f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
                  RUN_FUNCTION.format(service=EXIT_SERVICE, max_requeues=s.max_requeues), ""]
        return lines

    def stage_args(self, stage: str, extra: tuple[str, ...] = ()) -> str:
        args = ["-m", f"stages.{stage}", "--config", self.conf, *stage_path_args(stage, self.cfg, self.paths),
                *extra]
        return " ".join(shlex.quote(a) for a in args)

    def stage_cmd(self, stage: str, extra: tuple[str, ...] = ()) -> str:
        return f"run {self.cfg.python} {self.stage_args(stage, extra)}"

    def array(self, stage: str) -> tuple[str, int]:
        n = self.num_shards(stage)
        throttle = f"%{self.s.max_parallel_tasks}" if self.s.max_parallel_tasks < n else ""
        return f"0-{n - 1}{throttle}", n

    def scripts(self) -> dict[str, list[str]]:
        s, cfg, out = self.s, self.cfg, {}
        if "regenerate" in cfg.stages:
            spec, n = self.array("regenerate")
            tp = ("--tensor-parallel-size", str(s.regenerate_gpus)) if s.regenerate_gpus else ()
            out["01-regenerate.sbatch"] = self.header("regenerate", s.time_regenerate, s.regenerate_gpus,
                                                      s.regenerate_cpus, array=spec) + [
                "# one shard per array task: --shard-index defaults to $SLURM_ARRAY_TASK_ID",
                self.stage_cmd("regenerate", ("--num-shards", str(n), *tp))]
        if "dump" in cfg.stages:
            spec, n = self.array("dump")
            device = "cuda" if s.dump_gpus else "cpu"
            out["02-dump.sbatch"] = self.header("dump", s.time_dump, s.dump_gpus, s.dump_cpus, array=spec) + [
                self.stage_cmd("dump", ("--num-shards", str(n), "--device", device))]
        if "train" in cfg.stages:
            out["03-train.sbatch"] = self.train_script()
        if "export" in cfg.stages or "benchmark" in cfg.stages:
            only = [a for st in ("export", "benchmark") if st in cfg.stages for a in ("--only", st)]
            out["04-export-benchmark.sbatch"] = self.header("export-benchmark", s.time_benchmark, s.benchmark_gpus,
                                                            s.benchmark_cpus) + [
                "# run_pipeline skips a complete export or benchmark and runs the untrained baseline if configured",
                f"run {cfg.python} {shlex.quote(str(REPO_ROOT / 'run_pipeline.py'))} --config {shlex.quote(self.conf)} "
                + " ".join(only)]
        return out

    def train_script(self) -> list[str]:
        s, cfg = self.s, self.cfg
        world = s.train_nodes * s.procs_per_node
        port = str(s.master_port) if s.master_port else "$((20000 + SLURM_JOB_ID % 20000))"
        return self.header("train", s.time_train, s.gpus_per_node, s.train_cpus_per_node, nodes=s.train_nodes) + [
            "# torchrun reports any failed rank as exit 1: check the inputs and the run directory here first,",
            "# so that a configuration error ends the job with 2 instead of being requeued",
            self.stage_cmd("train", ("--nproc", str(world), "--check-only")),
            "# torchrun on every node; DeepSpeed takes RANK/WORLD_SIZE/MASTER_ADDR from it. A rerun or requeue",
            "# resumes from the last committed checkpoint.",
            "export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)",
            f"export MASTER_PORT={port}",
            f"run srun --cpus-per-task={s.train_cpus_per_node} {cfg.python} -m torch.distributed.run "
            f"--nnodes {s.train_nodes} --nproc-per-node {s.procs_per_node} --rdzv-backend c10d "
            f"--rdzv-id \"$SLURM_JOB_ID\" --rdzv-endpoint \"$MASTER_ADDR:$MASTER_PORT\" {self.stage_args('train')}",
            f"# world size {world}"]

    def submit(self, names: list[str]) -> str:
        lines = ["#!/bin/bash", "# Submit the chain; each step starts when the previous one (all its array tasks) "
                 "succeeded, and is cancelled when it failed.",
                 "# Resubmit after preemption or failures: complete shards and stages are skipped.",
                 "set -euo pipefail", f"mkdir -p {shlex.quote(str(self.logs))}"]
        prev = ""
        for i, name in enumerate(names):
            dep = f"--dependency=afterok:$j{i - 1} --kill-on-invalid-dep=yes " if prev else ""
            lines.append(f"j{i}=$(sbatch --parsable {dep}{shlex.quote(str(self.out_dir / name))})")
            prev = name
        jobs = " ".join(f"{n.split('.')[0]}=$j{i}" for i, n in enumerate(names))
        lines.append(f"echo \"submitted {jobs}; progress: {self.cfg.python} {shlex.quote(str(REPO_ROOT / 'run_pipeline.py'))} status "
                     f"--config {shlex.quote(self.conf)}\"")
        return "\n".join(lines) + "\n"


def emit_slurm(config_path: str, out_dir: Path) -> list[Path]:
    """Write the step scripts and ``submit.sh`` into ``out_dir``; returns their paths."""
    emitter = _Emitter(config_path, out_dir)
    scripts = emitter.scripts()
    emitter.logs.mkdir(parents=True, exist_ok=True)
    written = []
    for name, lines in scripts.items():
        path = emitter.out_dir / name
        path.write_text("\n".join(lines) + "\n")
        written.append(path)
    submit = emitter.out_dir / "submit.sh"
    submit.write_text(emitter.submit(list(scripts)))
    submit.chmod(0o755)
    return written + [submit]

