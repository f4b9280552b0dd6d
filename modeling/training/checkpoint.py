"""Checkpoints of a training run: written by every rank, committed by rank 0, pruned to the last k.

A step directory ``checkpoints/step-000500/`` holds DeepSpeed's files (bf16 module states,
each rank's ZeRO optimizer partition), ``rng-rank00000.pt`` per rank, ``train_state.json``
(optimizer step, loader position, tokens seen) and the consolidated fp32 draft snapshot
``draft/`` (:func:`modeling.draft.snapshot.save_draft_snapshot`). Order of a save:

1. every rank writes its files and fsyncs them; barrier;
2. rank 0 writes ``COMMITTED``, then the ``latest`` pointer, then prunes; barrier.

A kill before step 2 leaves a directory without ``COMMITTED``: it does not exist for readers
(:func:`modeling.draft.snapshot.find_step`) and the next start deletes it. Pruning removes the
marker before the files, so a half-deleted directory is never taken for a checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import resource
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from modeling.draft.snapshot import COMMITTED, LATEST, SnapshotError, find_step
from pipeline.core.durable import atomic_write_json, atomic_write_text, fsync_tree

CHECKPOINTS = "checkpoints"
TRAIN_STATE = "train_state.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


def step_name(step: int) -> str:
    """Zero-padded step directory name: ``step-000500``."""
    return f"step-{step:06d}"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


def list_steps(run_dir: Path) -> tuple[list[int], list[Path]]:
    """(committed step numbers ascending, step dirs without COMMITTED)."""
    root = run_dir / CHECKPOINTS
    committed, partial = [], []
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        match = _STEP_RE.match(child.name)
        if match and child.is_dir():
            if (child / COMMITTED).exists():
                committed.append(int(match.group(1)))
            else:
                partial.append(child)
    return sorted(committed), partial


def remove_step_dir(path: Path) -> None:
    """Delete a step dir, marker first (a crash midway must not leave a 'committed' remnant)."""
    (path / COMMITTED).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def remove_partial(run_dir: Path) -> list[str]:
    """Delete step dirs a killed run left without COMMITTED; returns their names."""
    _, partial = list_steps(run_dir)
    for path in partial:
        remove_step_dir(path)
    return [p.name for p in partial]


def prune(run_dir: Path, keep: int) -> list[int]:
    """Keep the newest ``keep`` committed steps and step 0 (the untrained reference)."""
    committed, _ = list_steps(run_dir)
    doomed = [s for s in committed[:-keep] if s != 0]
    for step in doomed:
        remove_step_dir(run_dir / CHECKPOINTS / step_name(step))
    return doomed


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_fp32(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full fp32 master weights of ``module``'s parameters on every rank; a collective.

    Works for ZeRO 1-3 (``safe_get_full_fp32_param`` all-reduces each partition), so the
    snapshot holds what the optimizer holds, not the bf16 copy the forward uses. Buffers
    (``d2t``/``t2d``) are left out: the snapshot takes them from the vocab mapping.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is None:
            raise RuntimeError(f"DeepSpeed holds no fp32 master copy of {name}")
        out[name] = full.detach().cpu()
    return out


def _likely_cause(path: Path) -> tuple[int, str]:
    """errno and a note for a write failure that came without one."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        return errno.EFBIG, f"this process may write files of at most {soft:,} bytes (ulimit -f)"
    existing = next(p for p in (path, *path.parents) if p.exists())
    st = os.statvfs(existing)
    free = st.f_bavail * st.f_frsize
    code = errno.ENOSPC if free < 1 << 30 else errno.EIO
    return code, f"{free / 2**30:.2f} GiB free on that filesystem"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; its cause is an OSError naming the step directory."""


def peer_failed(err: BaseException) -> bool:
    """A collective failed because another rank died (gloo and NCCL name the lost peer)."""
    text = str(err)
    return any(m in text for m in ("Connection closed by peer", "Connection reset by peer",
                                   "remote worker crashing", "NCCL communicator was aborted"))


@contextmanager
def _checkpoint_writes(step_dir: Path) -> Iterator[None]:
    """Report a failed checkpoint write with the step, the errno and the likely cause."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if peer_failed(err):  # a barrier inside the save: another rank's failure, not ours
            raise
        # torch.save's own errors carry no errno ("file write failed", "unexpected pos 7808 vs 7696")
        if isinstance(err, OSError) and err.errno:
            code, note = err.errno, ""
        else:
            code, note = _likely_cause(step_dir)
            note = f"; {note}"
        cause = OSError(code, os.strerror(code), str(step_dir))
        raise CheckpointWriteError(
            f"writing checkpoint {step_dir.name} failed ({type(err).__name__}: {err}{note}); it was not committed "
            "(no COMMITTED marker), the previous checkpoint stays the latest") from cause


def save_checkpoint(engine: Any, run_dir: Path, step: int, state: dict[str, Any], rank: int,
                    snapshot: Callable[[Path, dict[str, torch.Tensor]], None], keep: int) -> Path:
    """Write and commit ``checkpoints/step-XXXXXX`` (all ranks call it; see the module docstring).

    ``snapshot(step_dir, fp32_state_dict)`` writes the draft snapshot on rank 0.
    """
    root = run_dir / CHECKPOINTS
    step_dir = root / step_name(step)
    with _checkpoint_writes(step_dir):
        engine.save_checkpoint(str(root), tag=step_dir.name, save_latest=False)
        step_dir.mkdir(parents=True, exist_ok=True)  # a rank that wrote no DeepSpeed file still needs it
        torch.save(rng_state(), step_dir / rng_file(rank))
    weights = gather_fp32(engine.module.draft)
    if rank == 0:
        with _checkpoint_writes(step_dir):
            snapshot(step_dir, weights)
            atomic_write_json(step_dir / TRAIN_STATE, state)
    dist.barrier()
    fsync_tree(step_dir)  # each rank: its own writes are durable before the commit
    dist.barrier()
    if rank == 0:
        atomic_write_text(step_dir / COMMITTED, f"{step}\n")
        atomic_write_text(root / LATEST, step_dir.name + "\n")
        prune(run_dir, keep)
    dist.barrier()
    return step_dir


def load_checkpoint(engine: Any, run_dir: Path, rank: int) -> dict[str, Any] | None:
    """Restore the newest committed step (model, optimizer, scheduler, RNG); None if there is none."""
    try:
        step_dir = find_step(run_dir)
    except SnapshotError:
        return None
    path, _ = engine.load_checkpoint(str(step_dir.parent), tag=step_dir.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {step_dir}")
    rng = step_dir / rng_file(rank)
    if not rng.is_file():
        raise RuntimeError(f"{step_dir} has no {rng.name}: it was written by fewer processes than this run has")
    set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((step_dir / TRAIN_STATE).read_text())
