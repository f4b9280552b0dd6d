"""Stage 3: train the EAGLE-3 draft on a hidden-state store with DeepSpeed ZeRO; resumable.

    # GPUs, one node (the launcher starts one process per GPU):
    deepspeed --num_gpus 8 --module stages.train --store STORE --target DIR --output RUN_DIR
    # CPU or one command for a local job: re-launches itself through the deepspeed launcher
    python -m stages.train --nproc 2 --store STORE --target DIR --output RUN_DIR --zero-stage 2
    # multi-node: deepspeed --hostfile HOSTS --module stages.train ...; or per node under Slurm:
    srun torchrun --nnodes N --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HEAD:29500 -m stages.train ...
    # the same checks alone, exit 0 or 2 (torchrun reports any failed rank as 1; Slurm scripts run this first)
    python -m stages.train --check-only --nproc WORLD_SIZE --store STORE --target DIR --output RUN_DIR

Rerunning the same command resumes from the newest committed checkpoint of RUN_DIR and, with
the same seed and process count, ends with the same weights as an uninterrupted run. Layout
and options: the README, "Stage 3". Every input check runs before DeepSpeed is imported.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from modeling.training.checkpoint import peer_failed
from modeling.training.config import TrainConfig
from modeling.training.setup import (
    TrainSetupError,
    check_inputs,
    check_run_dir,
    check_schedule,
    run_lock_path,
)
from pipeline.core.cli import EXIT_SERVICE, stage_main
from pipeline.core.locks import FileLock, LockHeld

log = logging.getLogger("stages.train")
REPO_ROOT = Path(__file__).resolve().parents[1]
PEER_GRACE_S = 5.0


def strip_local_rank(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` (deepspeed launcher without --no_local_rank); LOCAL_RANK is in the env."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            out.append(arg)
    return out


def launched() -> bool:
    """True inside a process started by deepspeed/torchrun (they export RANK)."""
    return "RANK" in os.environ


def relaunch(cfg: TrainConfig, argv: list[str]) -> None:
    """Replace this process with the deepspeed launcher running ``cfg.launch.nproc`` local copies of it.

    exec keeps the pid, so the launcher and its ranks stay in this process group (a kill of the
    group stops all of them). On a machine without CUDA the ranks use DeepSpeed's CPU accelerator
    and gloo (:func:`modeling.training.trainer.init_distributed`).
    """
    import torch

    from modeling.training.trainer import free_port

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    port = cfg.launch.master_port or free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(cfg.launch.nproc),
           "--master_port", str(port), "--no_local_rank", "--module", "stages.train", *argv]
    log.info("launching %d processes: %s", cfg.launch.nproc, " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(sys.executable, cmd, env)


def _check_and_train(cfg: TrainConfig, argv: list[str]) -> int:
    inputs = check_inputs(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1")) if launched() else max(cfg.launch.nproc, 1)
    check_schedule(cfg, inputs, world)
    check_run_dir(cfg, world)
    if cfg.launch.nproc and not launched():
        # a second job on this run dir stops here, before its ranks start (~20 s of DeepSpeed launch)
        FileLock(run_lock_path(cfg)).check_free()
        del inputs  # the ranks re-read what they need
        relaunch(cfg, argv)
    from modeling.training.trainer import train

    try:
        step = train(cfg, inputs)
    except RuntimeError as err:
        if not peer_failed(err):
            raise
        log.error("rank %s: stopping because another process of the job failed (%s); that process's own "
                  "error says why", os.environ.get("RANK", "?"), str(err).splitlines()[0][:200])
        # the launcher reports the first exit status it sees: give the failing rank's the lead
        time.sleep(PEER_GRACE_S)
        return EXIT_SERVICE
    if os.environ.get("RANK", "0") == "0":
        log.info("training finished at step %d; draft snapshots in %s", step, Path(cfg.checkpointing.output) / "checkpoints")
    return 0


def _check_only(cfg: TrainConfig) -> int:
    """The launcher's checks without training: a job of ``--nproc`` processes may start (or resume)."""
    check_schedule(cfg, check_inputs(cfg), max(cfg.launch.nproc, 1))
    check_run_dir(cfg, max(cfg.launch.nproc, 1))
    log.info("inputs and run directory %s are fine for %d processes", cfg.checkpointing.output, max(cfg.launch.nproc, 1))
    return 0


def is_complete(run_dir: str | Path) -> bool:
    """The run finished its schedule (the trainer writes its marker last)."""
    from modeling.training.trainer import FINISHED

    return (Path(run_dir) / FINISHED).is_file()


def main(argv: list[str] | None = None) -> int:
    """Parse, check inputs, then relaunch (``--nproc``) or train in this process; exit statuses as
    in :mod:`pipeline.core.cli` (every rank reports its own failure the same way). ``--check-only``
    stops after the checks (exit 0 or 2), for launchers such as torchrun that report every
    failed rank as 1."""
    argv = strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    check_only = "--check-only" in argv
    argv = [a for a in argv if a != "--check-only"]
    body = _check_only if check_only else (lambda cfg: _check_and_train(cfg, argv))
    return stage_main("python -m stages.train", TrainConfig, "train",
                      "Stage 3: train the EAGLE-3 draft from a hidden-state store (DeepSpeed ZeRO).", argv,
                      body, input_errors=(TrainSetupError, LockHeld))


if __name__ == "__main__":
    sys.exit(main())
