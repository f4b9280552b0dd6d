"""Score a committed draft checkpoint on a store's held-out rows: the trainer's held-out metrics (TTT
acceptance, the decode-walk estimate at every k) for a checkpoint and a store of your choosing, in
one CPU process, no DeepSpeed.

    python -m benchmarks.eval_draft_on_store --run RUN_DIR --store STORE [--step N] [--eval-fraction F]

The held-out rows are the ones stage 3 scores: the store's samples whose prompt id hashes below the
run's ``eval_fraction`` (or ``--eval-fraction``), packed as the run packed them, the first
``--max-rows``. Uses: the estimate a run trained on joined stores would log for its own store alone
(runs before the trainer scored the first store only); a draft scored on another store than it was
trained on (typed against spoken prompts). On a run's own store and step this reproduces the
``eval`` line of its ``metrics.jsonl`` (same rows, same fp32 arithmetic on a CPU).

``--by-confidence`` adds the draft's first-position accuracy (its top-1 token equals the target's)
for the held-out tokens binned by the target's own top-1 probability there: how much of what the
draft misses is where the target itself is unsure (a small LLM's free text) and how much where it is
sure. Each bin is one more pass over the rows with the loss mask narrowed to the bin's tokens (the
draft's forward does not read the mask, so its predictions are the full pass's).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from modeling.draft.snapshot import SnapshotError, find_step, load_draft_snapshot
from modeling.target_io.weights import read_target_embedding, read_target_lm_head
from modeling.training.data import (
    PackedRows,
    Packing,
    dequantize_row,
    eval_rows,
    split_samples,
    store_columns,
)
from modeling.training.metrics import MetricWindow
from modeling.training.model import TrainDraft, TrainModule
from storage.store import open_store

CONFIDENCE_EDGES = (0.0, 0.3, 0.5, 0.7, 0.9, 1.0001)  # bins of the target's top-1 probability


def next_token_confidence(batch: dict, lm_head: torch.Tensor) -> torch.Tensor:
    """[B, S]: at each position j, the target's top-1 probability for token j (its final hidden state
    at j-1 through the lm_head); 0 where j-1 holds no stored state (no supervised next token)."""
    hidden = batch["target_hidden"]
    conf = torch.zeros(hidden.shape[:2])
    for b in range(hidden.shape[0]):  # row by row: [S, vocab] fp32 logits are ~200 MB at 1,024 x 49,152
        conf[b, 1:] = torch.softmax(hidden[b, :-1].float() @ lm_head.T, dim=-1).amax(-1)
    return conf


class ConfidenceBins:
    """First-position accuracy per bin of the target's confidence (see the module's docstring), added
    row by row in the scoring pass (each row is read once)."""

    def __init__(self, lm_head: torch.Tensor):
        self.lm_head, self.edges = lm_head, CONFIDENCE_EDGES
        self.correct, self.count = torch.zeros(len(self.edges) - 1), torch.zeros(len(self.edges) - 1)

    def add(self, module: TrainModule, batch: dict) -> None:
        conf, mask = next_token_confidence(batch, self.lm_head), batch["loss_mask"]
        for j, (lo, hi) in enumerate(zip(self.edges, self.edges[1:], strict=False)):
            narrowed = mask.bool() & (conf >= lo) & (conf < hi)
            if narrowed.any():
                out = module({**batch, "loss_mask": narrowed.to(mask.dtype)})
                self.correct[j] += float(out["step_correct"][0])
                self.count[j] += float(out["step_count"][0])

    def summary(self) -> list[dict]:
        total = max(float(self.count.sum()), 1.0)
        return [{"target_top1_from": lo, "target_top1_to": min(hi, 1.0), "token_share": float(n) / total,
                 "first_position_accuracy": float(c) / float(n) if n else None}
                for lo, hi, c, n in zip(self.edges, self.edges[1:], self.correct, self.count, strict=False)]


def score(run_dir: Path, store_path: str, step: int | None, eval_fraction: float | None,
          max_rows: int, confidence: bool = False) -> dict:
    run = json.loads((run_dir / "run.json").read_text())
    opts = run["config"]
    data, draft_opts = opts["data"], opts["draft"]
    try:
        snap = load_draft_snapshot(find_step(run_dir, step))
    except SnapshotError as err:
        raise SystemExit(str(err)) from None
    target = Path(data["target"])
    draft = TrainDraft(snap.draft_config, read_target_embedding(target).float())
    draft.set_vocab_mapping(snap.vocab.d2t, snap.vocab.t2d)
    # the snapshot holds every trained weight; the embedding table is the target's (read above)
    unexpected = draft.load_state_dict(snap.state_dict, strict=False).unexpected_keys
    if unexpected:
        raise SystemExit(f"{snap.step_dir}: weights the draft does not have: {unexpected}")
    lm_head = read_target_lm_head(target).float()
    module = TrainModule(draft, lm_head, draft_opts["ttt_length"], draft_opts["loss_decay"])
    module.eval()

    store = open_store(store_path, verify_chunks=True)
    ids, lengths, num_loss = store_columns(store)
    fraction = data["eval_fraction"] if eval_fraction is None else eval_fraction
    split = split_samples(ids, num_loss, fraction)
    packing = Packing(data["batch_tokens"], data["pack_window"], opts["schedule"]["seed"], 1, 1)
    rows, counted = eval_rows(split.eval, lengths, packing, 0, max_rows)
    audio = draft_opts["draft_audio_input"] == "encoder"
    rows_data = PackedRows(store, rows, data["batch_tokens"], audio, counted, dequantize=True)
    k = opts["monitoring"]["num_spec_tokens"]
    window = MetricWindow(draft_opts["ttt_length"], k)
    bins = ConfidenceBins(lm_head) if confidence else None
    with torch.no_grad():
        for i in range(len(rows_data)):
            batch = dequantize_row(rows_data[i], store.dtype)
            window.add(module(batch), batch["num_tokens"], len(batch["skipped"]))
            if bins is not None:
                bins.add(module, batch)
    summary = window.summary(draft_opts["loss_decay"])
    if bins is not None:
        summary["by_target_confidence"] = bins.summary()
    step = int(snap.step_dir.name.split("-")[-1]) if snap.step_dir else step
    return {"run": str(run_dir), "step": step, "store": store_path, "eval_fraction": fraction,
            "held_out_samples": len(split.eval), "rows": len(rows), "num_spec_tokens": k,
            f"walk@{k}": summary["walk_acceptance_length"][k - 1], **summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="stage-3 run directory")
    parser.add_argument("--store", required=True, help="hidden-state store whose held-out rows are scored")
    parser.add_argument("--step", type=int, default=None, help="committed step (default: the newest)")
    parser.add_argument("--eval-fraction", type=float, default=None, help="held-out share (default: the run's)")
    parser.add_argument("--max-rows", type=int, default=200, help="packed rows scored (0: all; the trainer's "
                                                                  "--eval-max-batches)")
    parser.add_argument("--by-confidence", action="store_true",
                        help="also the draft's first-position accuracy by bins of the target's top-1 probability")
    parser.add_argument("--out", type=Path, default=None, help="also write the result here (JSON)")
    args = parser.parse_args(argv)
    result = score(args.run, args.store, args.step, args.eval_fraction, args.max_rows, args.by_confidence)
    k = result["num_spec_tokens"]
    print(f"{result['run']} step {result['step']} on {result['store']}: {result['held_out_samples']} held-out "
          f"samples, {result['rows']} rows: walk@{k} {result[f'walk@{k}']:.3f}, teacher matches data "
          f"{result.get('teacher_matches_data', float('nan')):.3f}")
    for row in result.get("by_target_confidence", []):
        acc = row["first_position_accuracy"]
        print(f"  target top-1 p in [{row['target_top1_from']:.1f}, {row['target_top1_to']:.1f}): "
              f"{row['token_share']:6.1%} of tokens, draft's first token right "
              f"{'-' if acc is None else f'{acc:.1%}'}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
