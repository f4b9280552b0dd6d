"""Training metrics: summed over micro-batches and processes, written to three sinks by rank 0.

Sums, not means, are reduced (loss sum, correct and supervised positions per TTT step), so a
window's numbers weigh every supervised position equally whatever the packing or world size.
Sinks: a log line per window (or a tqdm bar on a terminal), ``RUN_DIR/metrics.jsonl`` and
TensorBoard under ``RUN_DIR/tb``. On resume, lines and events past the resumed step (written
by the killed run after its last checkpoint) are dropped, so every step appears once.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from modeling.ttt import simulated_acceptance
from pipeline.durable import atomic_write_text

log = logging.getLogger("stages.train")


class MetricWindow:
    """Accumulates TTT sums and token counts between two log points."""

    def __init__(self, ttt_length: int):
        self.t = ttt_length
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(3 * self.t + 3, dtype=torch.float64)
        self.start = time.monotonic()

    def add(self, out: Mapping[str, torch.Tensor], num_tokens: int, skipped: int = 0) -> None:
        """Add one micro-batch: ``out`` is ``TrainModule.forward``'s per-step sums; ``skipped``
        the samples of its row that could not be read."""
        t = self.t
        self.sums[:t] += out["step_loss_sum"].detach().cpu().double()
        self.sums[t:2 * t] += out["step_correct"].detach().cpu().double()
        self.sums[2 * t:3 * t] += out["step_count"].detach().cpu().double()
        self.sums[3 * t] += num_tokens
        self.sums[3 * t + 1] += 1
        self.sums[3 * t + 2] += skipped

    def summary(self, loss_decay: float, device: torch.device | None = None) -> dict[str, Any]:
        """Reduce over processes (a collective: every rank calls it) and derive the metrics."""
        sums = self.sums
        if torch.distributed.is_initialized():
            sums = sums.to(device) if device is not None else sums.clone()
            torch.distributed.all_reduce(sums)
            sums = sums.cpu()
        t = self.t
        loss_sum, correct, count = sums[:t], sums[t:2 * t], sums[2 * t:3 * t]
        step_loss = torch.where(count > 0, loss_sum / count.clamp_min(1), 0.0)
        step_acc = torch.where(count > 0, correct / count.clamp_min(1), 0.0)
        elapsed = max(time.monotonic() - self.start, 1e-9)
        decay = torch.tensor([loss_decay**k for k in range(t)], dtype=torch.float64)
        return {
            "loss": float((decay * step_loss).sum()),
            "acceptance_length": simulated_acceptance(step_acc),
            "step_loss": [round(float(x), 5) for x in step_loss],
            "step_acc": [round(float(x), 5) for x in step_acc],
            "supervised": int(count[0]),
            "tokens": int(sums[3 * t]),
            "tokens_per_s": float(sums[3 * t]) / elapsed,
            "micro_batches": int(sums[3 * t + 1]),
            "skipped_samples": int(sums[3 * t + 2]),
        }


class MetricSinks:
    """metrics.jsonl, TensorBoard and the console; only rank 0 constructs one."""

    def __init__(self, run_dir: Path, resumed_step: int | None, total_steps: int):
        """``resumed_step``: the checkpoint this process resumed from, None for a fresh start."""
        from torch.utils.tensorboard import SummaryWriter

        keep_until = -1 if resumed_step is None else resumed_step
        self.path = run_dir / "metrics.jsonl"
        _truncate_after(self.path, keep_until)
        self._fh = open(self.path, "a")
        # purge_step hides the killed run's events past the checkpoint we resumed from
        self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=keep_until + 1)
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=max(keep_until, 0), desc="train", unit="step",
                             dynamic_ncols=True)

    def write(self, split: str, step: int, values: dict[str, Any]) -> None:
        record = {"split": split, "step": step, "time": round(time.time(), 3), **values}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        for key, value in values.items():
            if isinstance(value, list):
                for k, v in enumerate(value):
                    self._tb.add_scalar(f"{split}/{key}/{k}", v, step)
            elif isinstance(value, (int, float)):
                self._tb.add_scalar(f"{split}/{key}", value, step)
        self._tb.flush()
        line = (f"{split} step {step}: loss {values['loss']:.4f} acc_len {values['acceptance_length']:.3f} "
                f"acc {' '.join(f'{a:.2f}' for a in values['step_acc'])}")
        if "lr" in values:
            line += f" lr {values['lr']:.3g} {values['tokens_per_s']:.0f} tok/s"
        if self._bar is not None:
            self._bar.write(line)
        else:
            log.info("%s", line)

    def advance(self, step: int, **postfix: Any) -> None:
        """Move the progress bar to ``step`` (no bar without a terminal: the log lines are the progress)."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self._fh.close()
        self._tb.close()
        if self._bar is not None:
            self._bar.close()


def _truncate_after(path: Path, step: int) -> None:
    """Drop metrics lines past ``step`` (atomic rewrite; torn last lines go too)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError):
            continue
    atomic_write_text(path, "".join(kept))
