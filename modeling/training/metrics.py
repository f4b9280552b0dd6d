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

from modeling.draft.ttt import chain_estimates, simulated_acceptance
from pipeline.core.durable import atomic_write_text

log = logging.getLogger("stages.train")


class MetricWindow:
    """Accumulates TTT sums and token counts between two log points.

    Layout of the summed vector (T = ttt_length): loss sums [T], correct [T], evaluated [T],
    loss positions [T], chain/walk sums [3T + 1] (:class:`modeling.draft.ttt.ChainStats`), teacher
    agreement [2], then tokens, micro-batches and skipped samples.
    """

    def __init__(self, ttt_length: int, num_spec_tokens: int = 4):
        self.t = ttt_length
        self.k = min(num_spec_tokens, ttt_length)
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(7 * self.t + 6, dtype=torch.float64)
        self.start = time.monotonic()

    def add(self, out: Mapping[str, torch.Tensor], num_tokens: int, skipped: int = 0) -> None:
        """Add one micro-batch: ``out`` is ``TrainModule.forward``'s per-step sums; ``skipped``
        the samples of its row that could not be read."""
        parts = [out[name].detach().cpu().double().reshape(-1)
                 for name in ("step_loss_sum", "step_correct", "step_count", "step_loss_count", "chain",
                              "teacher_agreement")]
        vector = torch.cat(parts + [torch.tensor([num_tokens, 1, skipped], dtype=torch.float64)])
        self.sums += vector

    def summary(self, loss_decay: float, device: torch.device | None = None) -> dict[str, Any]:
        """Reduce over processes (a collective: every rank calls it) and derive the metrics."""
        sums = self.sums
        if torch.distributed.is_initialized():
            sums = sums.to(device) if device is not None else sums.clone()
            torch.distributed.all_reduce(sums)
            sums = sums.cpu()
        t = self.t
        loss_sum, correct, count, loss_count = (sums[i * t:(i + 1) * t] for i in range(4))
        chain, walk = chain_estimates(sums[4 * t:7 * t + 1], t)
        agree, supervised, (tokens, micro, skipped) = sums[7 * t + 1], sums[7 * t + 2], sums[7 * t + 3:]
        step_loss = torch.where(loss_count > 0, loss_sum / loss_count.clamp_min(1), 0.0)
        step_acc = torch.where(count > 0, correct / count.clamp_min(1), 0.0)
        elapsed = max(time.monotonic() - self.start, 1e-9)
        decay = torch.tensor([loss_decay**k for k in range(t)], dtype=torch.float64)
        return {
            "loss": float((decay * step_loss).sum()),
            "acceptance_length": simulated_acceptance(step_acc),
            "chain_acceptance_length": [round(x, 5) for x in chain],
            "walk_acceptance_length": [round(x, 5) for x in walk],
            "num_spec_tokens": self.k,
            "step_loss": [round(float(x), 5) for x in step_loss],
            "step_acc": [round(float(x), 5) for x in step_acc],
            "supervised": int(count[0]),
            "in_draft_vocab": round(float(loss_count[0] / count[0]), 5) if count[0] > 0 else None,
            "teacher_matches_data": round(float(agree / supervised), 5) if supervised > 0 else None,
            "tokens": int(tokens),
            "tokens_per_s": float(tokens) / elapsed,
            "micro_batches": int(micro),
            "skipped_samples": int(skipped),
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
        k = values["num_spec_tokens"]
        line = (f"{split} step {step}: loss {values['loss']:.4f} acc_len {values['acceptance_length']:.3f} "
                f"walk@{k} {values['walk_acceptance_length'][k - 1]:.3f} "
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
