"""Training data for stage 3: held-out split, draft-vocab counts, packed rows, per-rank schedule.

Every decision is a pure function of (store index, seed, epoch, world size), so each process
plans the same epochs without talking to the others, and a resumed run rebuilds exactly the
rows it would have seen. The loader's state is one number, the micro-batches consumed.

- Split: a sample is held out when a stable hash of its prompt's id falls below ``eval_fraction``
  (the id, less the ``#k`` stage 1 appends to the answers it samples n > 1 times for one prompt:
  every answer to one prompt, in one store or in several joined ones, lands in the same split, so
  the held-out estimate never scores a prompt the draft trained on; of joined stores only the
  first one's held-out samples are scored); adding samples to a store never moves an existing
  sample between splits.
- Packing: per epoch the training samples are shuffled, cut into windows of ``pack_window``,
  each window sorted by length and packed first-fit-decreasing into rows of at most
  ``batch_tokens`` tokens. Length-sorted windows waste little: on the speech fixtures (30
  samples of 56-183 tokens, 512-token rows) rows are ~90% full.
- Sharding: the epoch's rows are shuffled and dealt round-robin to the ranks; the tail that
  does not fill ``world_size * grad_accum`` rows is dropped (a different tail every epoch),
  so every rank runs the same number of optimizer steps and no collective waits forever.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.data.records import prompt_key
from storage.array_encoding import HIDDEN_ARRAYS, dequantize_fp8_torch, tensor_nonfinite
from storage.buffers import empty_tensor
from storage.reader import ChunkReadError
from storage.store import HiddenStateStore


def eval_score(sample_id: str) -> float:
    """Stable uniform number in [0, 1) for a sample id (first 8 bytes of its sha256)."""
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big") / 2.0**64


@dataclass(frozen=True)
class Split:
    """Store indices of the two splits; samples without loss tokens are in neither, and so are the
    held-out prompts' samples past ``scored_samples`` (``unscored``)."""

    train: np.ndarray
    eval: np.ndarray
    no_loss: int
    unscored: int = 0


def store_columns(store: HiddenStateStore) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, tokens, loss tokens) per sample in store order, from the shard indexes alone."""
    readers = store.shard_readers()
    ids = [sid for r in readers for sid in r.ids()]
    loss = np.concatenate([r.col("num_loss_tokens") for r in readers]) if readers else np.zeros(0, np.int64)
    return ids, store.sample_lengths().astype(np.int64), loss.astype(np.int64)


def split_samples(ids: list[str], num_loss: np.ndarray, eval_fraction: float,
                  scored_samples: int | None = None) -> Split:
    """Held-out split by prompt-id hash; samples with no supervised token train nothing and are skipped.

    ``scored_samples``: only held-out samples among the first that many are scored (the first of
    several joined stores: the run's own answers, as the served target writes them); the others'
    answers to held-out prompts are neither trained nor scored, since a sampled answer is not the
    path greedy serving takes (its tokens match the target's argmax ~76% of the time, not ~100%),
    so scoring it would not estimate what vLLM accepts.
    """
    held = np.array([eval_score(prompt_key(i)) < eval_fraction for i in ids], dtype=bool)
    useful = num_loss > 0
    scored = np.arange(len(ids)) < (len(ids) if scored_samples is None else scored_samples)
    return Split(np.flatnonzero(~held & useful), np.flatnonzero(held & useful & scored), int((~useful).sum()),
                 int((held & useful & ~scored).sum()))


def supervised_counts(store: HiddenStateStore, indices: np.ndarray, vocab_size: int) -> torch.Tensor:
    """int64 [vocab] counts of the tokens under ``loss_mask == 1`` in the samples ``indices``.

    Reads only the ids and loss-mask arrays (5 bytes a token), one shard at a time.
    """
    from modeling.draft.vocab import count_supervised_tokens

    counts = torch.zeros(vocab_size, dtype=torch.long)
    wanted = np.zeros(len(store), dtype=bool)
    wanted[indices] = True
    start = 0
    for reader in store.shard_readers():
        rows = np.flatnonzero(wanted[start:start + len(reader)])
        start += len(reader)
        if not len(rows):
            continue
        ntok = int(reader.col("tok_offset")[-1] + reader.col("num_tokens")[-1])
        ids = reader.read_rows(store.specs["input_ids"], 0, ntok)
        mask = reader.read_rows(store.specs["loss_mask"], 0, ntok).astype(bool)
        keep = np.zeros(ntok, dtype=bool)
        for row in rows:
            off, n = reader.extent(int(row), "tokens")
            keep[off:off + n] = True
        counts += count_supervised_tokens(torch.from_numpy(ids.astype(np.int64)),
                                          torch.from_numpy(mask & keep), vocab_size)
    return counts


def pack_rows(order: np.ndarray, lengths: np.ndarray, batch_tokens: int, window: int) -> list[np.ndarray]:
    """First-fit-decreasing packing of ``order`` (store indices) in length-sorted windows."""
    rows: list[np.ndarray] = []
    for w0 in range(0, len(order), window):
        chunk = order[w0:w0 + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        room: list[int] = []
        members: list[list[int]] = []
        for idx in chunk.tolist():
            n = min(int(lengths[idx]), batch_tokens)
            r = next((i for i, free in enumerate(room) if free >= n), len(room))
            if r == len(room):
                room.append(batch_tokens)
                members.append([])
            room[r] -= n
            members[r].append(idx)
        rows += [np.asarray(m, dtype=np.int64) for m in members]
    return rows


@dataclass(frozen=True)
class Packing:
    """How rows are formed and dealt out: the same on every rank."""

    batch_tokens: int
    window: int
    seed: int
    world_size: int
    grad_accum: int


def epoch_rows(train: np.ndarray, lengths: np.ndarray, p: Packing, epoch: int) -> list[np.ndarray]:
    """The epoch's usable rows in global order (a multiple of world_size * grad_accum)."""
    rng = np.random.default_rng((p.seed, epoch))
    rows = pack_rows(rng.permutation(train), lengths, p.batch_tokens, p.window)
    group = p.world_size * p.grad_accum
    usable = len(rows) // group * group
    return [rows[i] for i in rng.permutation(len(rows))[:usable]]


class Schedule:
    """The micro-batches of one rank for the whole run, as flat arrays (cheap to fork into workers).

    Epoch ``e`` gives each rank ``steps[e] * grad_accum`` rows; the run stops after
    ``total_steps`` optimizer steps (all epochs, or ``max_steps`` if smaller).
    """

    def __init__(self, train: np.ndarray, lengths: np.ndarray, p: Packing, rank: int, epochs: int,
                 max_steps: int = 0):
        self.packing, self.steps = p, []
        flat: list[np.ndarray] = []
        sizes: list[int] = []
        for epoch in range(epochs):
            rows = epoch_rows(train, lengths, p, epoch)
            if not rows:
                raise ValueError(f"{len(train)} training samples pack into fewer rows than world size x grad "
                                 f"accum ({p.world_size} x {p.grad_accum}) at --batch-tokens {p.batch_tokens}: "
                                 "lower one of them or add data")
            self.steps.append(len(rows) // (p.world_size * p.grad_accum))
            mine = rows[rank::p.world_size]
            flat += mine
            sizes += [len(r) for r in mine]
        self.total_steps = min(sum(self.steps), max_steps) if max_steps else sum(self.steps)
        n = self.total_steps * p.grad_accum
        self.samples = np.concatenate(flat) if flat else np.zeros(0, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])[: n + 1]
        self.num_batches = n

    def position(self, micro_batches: int) -> dict[str, int]:
        """Loader state after ``micro_batches``: what a checkpoint records."""
        per_epoch = np.cumsum([0] + [s * self.packing.grad_accum for s in self.steps])
        epoch = int(np.searchsorted(per_epoch, micro_batches, side="right") - 1)
        return {"micro_batches": micro_batches, "epoch": epoch,
                "batch_in_epoch": int(micro_batches - per_epoch[epoch])}

    def row(self, i: int) -> np.ndarray:
        return self.samples[self.offsets[i]:self.offsets[i + 1]]


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` into a new tensor that is in shared memory inside a DataLoader worker, so the
    row reaches the main process without being copied again (~24 KiB a token at H=4096)."""
    out = empty_tensor((sum(int(p.shape[0]) for p in parts), *parts[0].shape[1:]), parts[0].dtype)
    return torch.cat(parts, out=out)


def collate_row(samples: list[dict[str, Any]], batch_tokens: int, with_audio: bool) -> dict[str, Any]:
    """Concatenate store samples into one packed row [1, S] (positions restart per sample).

    ``target_hidden`` is zero except where the store kept the final hidden state (positions
    whose next token is supervised: all the TTT teacher reads). Samples are cut to
    ``batch_tokens``; ``audio_positions``/``audio_embeds`` are included when ``with_audio``.
    Samples read with ``dequantize=False`` keep fp8 arrays as uint8 with their scales: the row
    then has ``aux_hidden_scale`` [1, S, L] (and ``target_hidden_scale``, ``audio_embeds_scale``
    for the arrays stored in fp8), for :func:`dequantize_row` on the training device.
    """
    keys = ("ids", "mask", "pos", "aux", "aux_s", "tgt", "tgt_s", "apos", "aemb", "aemb_s")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    start = 0
    for s in samples:
        n = min(int(s["input_ids"].shape[0]), batch_tokens)
        parts["ids"].append(s["input_ids"][:n])
        parts["mask"].append(s["loss_mask"][:n])
        parts["pos"].append(torch.arange(n))
        parts["aux"].append(s["aux_hidden"][:n].reshape(n, -1))
        if "aux_hidden_scale" in s:
            parts["aux_s"].append(s["aux_hidden_scale"][:n])
        where = s["last_hidden_positions"]
        keep = where < n
        for key, name, width in (("tgt", "last_hidden", (s["last_hidden"].shape[-1],)), ("tgt_s", "last_hidden_scale", ())):
            if name in s:
                tgt = s[name].new_zeros(n, *width)
                tgt[where[keep]] = s[name][keep]
                parts[key].append(tgt)
        if with_audio and s["audio_spans"]:
            apos = torch.cat([torch.arange(a, b) for a, b in s["audio_spans"]])
            keep = apos < n
            parts["apos"].append(apos[keep] + start)
            parts["aemb"].append(s["audio_embeds"][keep])
            if "audio_embeds_scale" in s:
                parts["aemb_s"].append(s["audio_embeds_scale"][keep])
        start += n
    batch: dict[str, Any] = {
        "input_ids": _cat(parts["ids"])[None], "loss_mask": _cat(parts["mask"])[None],
        "position_ids": _cat(parts["pos"])[None], "aux_hidden": _cat(parts["aux"])[None],
        "target_hidden": _cat(parts["tgt"])[None], "num_tokens": start, "num_samples": len(samples)}
    for key, name in (("aux_s", "aux_hidden_scale"), ("tgt_s", "target_hidden_scale")):
        if parts[key]:
            batch[name] = _cat(parts[key])[None]
    if with_audio:
        first = samples[0]
        batch["audio_positions"] = torch.cat(parts["apos"]) if parts["apos"] else torch.zeros(0, dtype=torch.long)
        batch["audio_embeds"] = (_cat(parts["aemb"]) if parts["aemb"]
                                 else first["audio_embeds"].new_zeros(0, first["audio_embeds"].shape[-1]))
        if "audio_embeds_scale" in first:
            batch["audio_embeds_scale"] = _cat(parts["aemb_s"]) if parts["aemb_s"] else torch.zeros(0)
    return batch


def dequantize_row(batch: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """fp8 rows (uint8 + ``<key>_scale``) of a packed row -> ``dtype``, where the batch now is
    (the training device: there it costs microseconds; see storage.array_encoding.dequantize_fp8_torch)."""
    for key in ("aux_hidden", "target_hidden", "audio_embeds"):
        scale = batch.pop(f"{key}_scale", None)
        if scale is not None:
            q = batch[key]
            batch[key] = dequantize_fp8_torch(q.reshape(*scale.shape, -1), scale, dtype).reshape(q.shape)
    return batch


# tensors a sample must hold finite values in (a flipped bit in a stored bf16 can make an Inf)
FINITE_ARRAYS = (*HIDDEN_ARRAYS, *(f"{n}_scale" for n in HIDDEN_ARRAYS))


def read_or_skip(store: HiddenStateStore, index: int,
                 dequantize: bool = True) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(sample, None), or (None, why it is skipped): a chunk that cannot be read or decoded, or
    non-finite values. A pure function of the store's bytes, so a resumed run skips the same.

    A store opened with ``verify_chunks`` counts NaN/Inf per chunk as it decodes (in cache);
    otherwise they are counted here, on the stored bits.
    """
    try:
        sample = store.sample(index, dequantize=dequantize)
    except ChunkReadError as err:
        reason = f"unreadable: {err}"
    else:
        bad = sample.pop("nonfinite", None)
        if bad is None:
            bad = {n: tensor_nonfinite(sample[n]) for n in FINITE_ARRAYS if n in sample}
            bad = {n: k for n, k in bad.items() if k}
        if not bad:
            return sample, None
        reason = "; ".join(f"{n} has {k} non-finite values" for n, k in bad.items())
    pos, row = store.locate(index)
    reader = store.shard_readers()[pos]
    return None, {"index": int(index), "id": reader.row_info(row)["id"], "shard": reader.name, "row": row,
                  "reason": reason}


def placeholder_row(store: HiddenStateStore, with_audio: bool) -> dict[str, Any]:
    """A 1-token row with no supervised position: what a rank runs when every sample of its row
    was skipped (under ZeRO each step is a collective, so every rank must step)."""
    h, n_aux = int(store.header["hidden_size"]), int(store.header["num_aux_layers"])
    batch: dict[str, Any] = {
        "input_ids": torch.zeros(1, 1, dtype=torch.long), "loss_mask": torch.zeros(1, 1, dtype=torch.long),
        "position_ids": torch.zeros(1, 1, dtype=torch.long),
        "aux_hidden": torch.zeros(1, 1, n_aux * h, dtype=store.dtype),
        "target_hidden": torch.zeros(1, 1, h, dtype=store.dtype), "num_tokens": 0, "num_samples": 0}
    if with_audio:
        batch["audio_positions"] = torch.zeros(0, dtype=torch.long)
        batch["audio_embeds"] = torch.zeros(0, h, dtype=store.dtype)
    return batch


class PackedRows(Dataset):
    """Map-style dataset of packed rows: item i reads row ``rows[i]`` from the store.

    A sample that cannot be read is left out of its row and listed in ``batch["skipped"]``
    (see :func:`read_or_skip`); the rest of the row trains.
    """

    def __init__(self, store: HiddenStateStore, rows: list[np.ndarray], batch_tokens: int, with_audio: bool,
                 counted: list[bool] | None = None, dequantize: bool = True):
        """``dequantize=False``: fp8 stores give uint8 rows + scales (:func:`dequantize_row`)."""
        self.store, self.rows, self.batch_tokens, self.with_audio = store, rows, batch_tokens, with_audio
        self.counted, self.dequantize = counted, dequantize

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        samples, skipped = [], []
        for j in self.rows[i]:
            sample, why = read_or_skip(self.store, int(j), self.dequantize)
            if sample is not None:
                samples.append(sample)
            else:
                skipped.append(why)
        batch = (collate_row(samples, self.batch_tokens, self.with_audio) if samples
                 else placeholder_row(self.store, self.with_audio))
        batch["skipped"] = skipped
        batch["counted"] = True if self.counted is None else self.counted[i]
        return batch


def train_loader(store: HiddenStateStore, schedule: Schedule, start: int, with_audio: bool,
                 num_workers: int, pin_memory: bool = False, dequantize: bool = True) -> DataLoader:
    """Rows ``start..`` of this rank's schedule, read by ``num_workers`` worker processes in order."""
    rows = [schedule.row(i) for i in range(start, schedule.num_batches)]
    data = PackedRows(store, rows, schedule.packing.batch_tokens, with_audio, dequantize=dequantize)
    return DataLoader(data, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=4 if num_workers else None)


def eval_rows(eval_idx: np.ndarray, lengths: np.ndarray, p: Packing, rank: int,
              max_rows: int) -> tuple[list[np.ndarray], list[bool]]:
    """This rank's held-out rows and whether each counts; every rank gets the same number.

    Ranks short of rows repeat one uncounted row: under ZeRO-3 every forward is a collective.
    """
    rows = pack_rows(eval_idx, lengths, p.batch_tokens, p.window)
    rows = rows[:max_rows] if max_rows else rows
    if not rows:
        return [], []
    per_rank = -(-len(rows) // p.world_size)
    mine = rows[rank::p.world_size]
    pad = per_rank - len(mine)
    return mine + [rows[0]] * pad, [True] * len(mine) + [False] * pad
