"""Stage 3 checks and run-directory set-up, all before any training work.

:func:`check_inputs` fails with a :class:`TrainSetupError` naming the problem when the store
was dumped from another target, is empty or has no loss tokens, the draft vocab is not smaller
than the target's, or the target's embedding/lm_head are missing. It reads the store's
indexes, the target's ``config.json`` and exactly two target tensors (embedding table and
lm_head: 2 x 1.3 GB for Qwen2-Audio-7B, memory-mapped), so it runs in the launching process
and again in every rank within seconds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from modeling.draft.config import DraftConfig
from modeling.draft.vocab import VocabMapping, build_draft_vocab
from modeling.training.config import TrainConfig, store_paths
from modeling.training.data import Split, split_samples, store_columns, supervised_counts
from pipeline.core.config import flat_options, leaf_values, to_dict
from pipeline.core.durable import atomic_write_json
from storage.reader import ChunkReadError
from storage.store import HiddenStateStore, join_stores, open_store

RUN_FILE = "run.json"
VOCAB_FILE = "vocab.safetensors"
log = logging.getLogger("stages.train")
AUX_CONVENTION = "decoder_layer"  # the output convention DraftConfig.aux_layer_ids uses


class TrainSetupError(ValueError):
    """A training input or the run directory is unusable; the message says which and why."""


@dataclass
class TrainInputs:
    """What the checks established: the store, its split, the draft's shape, the frozen tables."""

    store: HiddenStateStore
    split: Split
    lengths: np.ndarray
    draft_config: DraftConfig
    embed_table: Tensor
    lm_head: Tensor
    target_info: dict[str, Any]
    final_norm: Tensor | None = None
    """The target's final norm weight, read only for ``--init-head target``."""


def _open_one_store(path: str) -> HiddenStateStore:
    try:
        # chunks are checked against their sha256 as they are read: a corrupt one is skipped, not
        # trained on (blosc/zstd would decode a flipped byte without complaint)
        return open_store(path, verify_chunks=True)
    except FileNotFoundError:
        raise TrainSetupError(f"--store {path} is not a hidden-state store (no manifest.json): run stage 2 first") from None


def _open_store(spec: str) -> tuple[HiddenStateStore, int]:
    """The store, or several read as one (each one checked that it opens and is not empty), and the
    number of samples of the first (whose held-out rows the estimate scores)."""
    stores = [_open_one_store(path) for path in store_paths(spec)]
    for store in stores:
        if len(store) == 0:
            raise TrainSetupError(f"--store {store.path} has no committed samples (is stage 2 finished?)")
    try:
        return join_stores(stores), len(stores[0])
    except ValueError as err:
        raise TrainSetupError(f"--store: {err}") from None


def _check_store_target(store: HiddenStateStore, target: Path, identity: str, hidden: int) -> list[int]:
    """The store's aux layer ids (output convention) after checking it came from ``target``."""
    made_with = store.header.get("target", {})
    if made_with.get("config_hash") != identity:
        raise TrainSetupError(
            f"--store {store.path} was dumped from target {made_with.get('path')} (identity sha256 "
            f"{str(made_with.get('config_hash'))[:12]}), but --target {target} has identity sha256 "
            f"{identity[:12]} (config, tokenizer, chat template): train with the target the store was made from")
    if store.header["hidden_size"] != hidden or store.header["num_aux_layers"] != 3:
        raise TrainSetupError(f"--store {store.path}: hidden size {store.header['hidden_size']} x "
                              f"{store.header['num_aux_layers']} aux layers; the draft needs {hidden} x 3")
    ids = store.header["aux_layers"]["by_convention"].get(AUX_CONVENTION)
    if ids is None:
        raise TrainSetupError(f"--store {store.path}: header has no {AUX_CONVENTION!r} aux layer ids")
    return [int(i) for i in ids]


def _read_tables(target: Path) -> tuple[Tensor, Tensor]:
    from modeling.target_io.weights import read_target_embedding, read_target_lm_head

    try:
        return read_target_embedding(target), read_target_lm_head(target)
    except (FileNotFoundError, KeyError) as err:
        raise TrainSetupError(f"--target {target}: cannot read the embedding table and lm_head: {err}") from None


def _read_final_norm(target: Path, draft_config: DraftConfig) -> Tensor:
    from modeling.target_io.weights import read_target_final_norm

    if draft_config.hidden_size != draft_config.target_hidden_size:
        raise TrainSetupError(f"--init-head target copies the target's lm_head rows, which needs the draft's hidden "
                              f"size ({draft_config.hidden_size}) to equal the target's "
                              f"({draft_config.target_hidden_size}); use --init-head random")
    try:
        return read_target_final_norm(target)
    except (FileNotFoundError, KeyError) as err:
        raise TrainSetupError(f"--target {target}: cannot read the final norm for --init-head target: {err}") from None


def check_inputs(cfg: TrainConfig) -> TrainInputs:
    """Every check that needs no GPU and no DeepSpeed (see the module docstring)."""
    from modeling.targets import UnsupportedTarget, target_identity, target_text_config

    target = Path(cfg.data.target).resolve()
    try:
        identity = target_identity(target)
        text = target_text_config(target)
    except (UnsupportedTarget, ValueError) as err:
        raise TrainSetupError(f"--target {target}: {err}") from None
    vocab = int(text["vocab_size"])
    if cfg.draft.draft_vocab_size >= vocab:
        raise TrainSetupError(f"--draft-vocab-size {cfg.draft.draft_vocab_size} must be smaller than the target vocab "
                              f"({vocab}): pick e.g. {min(32000, vocab // 2)}")
    store, first_store_samples = _open_store(cfg.data.store)
    try:
        draft_config = DraftConfig.from_target_config(text, cfg.draft.draft_vocab_size, cfg.draft.draft_config)
        aux = _check_store_target(store, target, identity["sha256"], draft_config.target_hidden_size)
        draft_config = dataclasses.replace(draft_config, aux_layer_ids=tuple(aux),
                                           audio_input=cfg.draft.draft_audio_input)
    except (ValueError, TypeError) as err:
        raise TrainSetupError(str(err)) from None
    ids, lengths, num_loss = store_columns(store)
    if int(num_loss.sum()) == 0:
        raise TrainSetupError(f"--store {cfg.data.store}: none of its {len(store)} samples has a loss token "
                              "(loss_mask is 0 everywhere), so there is nothing to train on")
    split = split_samples(ids, num_loss, cfg.data.eval_fraction, first_store_samples)
    if not len(split.train):
        raise TrainSetupError(f"--store {cfg.data.store}: all {len(split.eval)} samples with loss tokens are held out; "
                              f"lower --eval-fraction ({cfg.data.eval_fraction})")
    embed, lm_head = _read_tables(target)
    final_norm = _read_final_norm(target, draft_config) if cfg.draft.init_head == "target" else None
    info = {**identity, "identity_sha256": identity["sha256"], "vocab_size": vocab,
            "num_layers": text["num_hidden_layers"], "store": ",".join(str(Path(p).resolve()) for p in store_paths(cfg.data.store)),
            "store_target": store.header.get("target")}
    return TrainInputs(store, split, lengths, draft_config, embed, lm_head, info, final_norm)


def check_schedule(cfg: TrainConfig, inputs: TrainInputs, world_size: int) -> None:
    """Enough packed rows for ``world_size`` processes: checked once, in the launching process, so the
    error is one line with exit status 2 instead of a traceback from every rank."""
    from modeling.training.data import Packing, epoch_rows

    packing = Packing(cfg.data.batch_tokens, cfg.data.pack_window, cfg.schedule.seed, world_size, cfg.optimizer.grad_accum)
    if not epoch_rows(inputs.split.train, inputs.lengths, packing, 0):
        raise TrainSetupError(f"{len(inputs.split.train)} training samples pack into fewer rows than world size x "
                              f"grad accum ({world_size} x {cfg.optimizer.grad_accum}) at --batch-tokens {cfg.data.batch_tokens}: "
                              "lower one of them or add data")


def run_lock_path(cfg: TrainConfig) -> Path:
    """The lock rank 0 holds for the whole run: one job per run directory."""
    return Path(cfg.checkpointing.output) / "locks" / "train.lock"


def check_run_dir(cfg: TrainConfig, world_size: int) -> dict[str, Any] | None:
    """The existing ``run.json`` (None for a new run) after checking this command may resume it."""
    path = Path(cfg.checkpointing.output) / RUN_FILE
    if not path.is_file():
        return None
    run = json.loads(path.read_text())
    if run["identity"] != cfg.identity():
        old = flat_options(TrainConfig, run["config"])  # flat (earlier releases) or in sections
        diffs = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in leaf_values(cfg).items()
                 if old.get(k) != v and k not in ("output",) and k in old]
        raise TrainSetupError(f"--output {cfg.checkpointing.output} holds a run with other settings ({'; '.join(diffs)}); "
                              "rerun with the original settings to resume, or use a new --output")
    if run["world_size"] != world_size:
        raise TrainSetupError(f"--output {cfg.checkpointing.output} was trained with {run['world_size']} processes, now "
                              f"{world_size}: the data order and ZeRO partitions depend on it")
    return run


def write_run_files(cfg: TrainConfig, inputs: TrainInputs, world_size: int, total_steps: int) -> VocabMapping:
    """Rank 0 of a new run: build the draft vocab over the training split, then ``run.json`` last."""
    run_dir = Path(cfg.checkpointing.output)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        counts = supervised_counts(inputs.store, inputs.split.train, inputs.draft_config.vocab_size)
    except ChunkReadError as err:
        raise TrainSetupError(f"--store {cfg.data.store}: cannot read the token ids to build the draft vocab: {err}. "
                              f"Find the damaged shards with `python -m storage.inspect verify --deep {cfg.data.store}` "
                              "and re-queue them for stage 2 with --repair") from None
    vocab = build_draft_vocab(counts, cfg.draft.draft_vocab_size)
    vocab.save(run_dir / VOCAB_FILE)
    covered = int(counts[vocab.t2d].sum()) / max(int(counts.sum()), 1)
    lengths = inputs.lengths[np.concatenate([inputs.split.train, inputs.split.eval])]
    over = lengths[lengths > cfg.data.batch_tokens]
    if len(over):
        log.warning("%d samples are longer than --batch-tokens %d (longest %d tokens) and are cut to it; their "
                    "%d tokens past the cut are not trained on: raise --batch-tokens to keep them", len(over),
                    cfg.data.batch_tokens, int(over.max()), int((over - cfg.data.batch_tokens).sum()))
    if inputs.split.no_loss:
        log.warning("%d samples have no loss tokens and are not trained on", inputs.split.no_loss)
    atomic_write_json(run_dir / RUN_FILE, {
        "identity": cfg.identity(), "config": to_dict(cfg), "world_size": world_size,
        "total_steps": total_steps, "target": inputs.target_info,
        "draft_config": dataclasses.asdict(inputs.draft_config),
        "split": {"train": len(inputs.split.train), "eval": len(inputs.split.eval),
                  "eval_unscored_other_stores": inputs.split.unscored, "no_loss_tokens": inputs.split.no_loss, "over_batch_tokens": len(over),
                  "tokens_cut": int((over - cfg.data.batch_tokens).sum())},
        "vocab": {"file": VOCAB_FILE, "supervised_tokens": int(counts.sum()), "coverage": round(covered, 6)},
    })
    return vocab


def load_vocab(run_dir: str | Path) -> VocabMapping:
    """The run's draft vocab (written once by :func:`write_run_files`)."""
    return VocabMapping.load(Path(run_dir) / VOCAB_FILE)
