"""Stage 2: run the frozen target over the conversations and store what EAGLE-3 training needs.

    python -m stages.dump --target DIR --input STAGE1_DIR_or.jsonl --store STORE_DIR \\
        [--num-shards N --shard-index I] [--batch-tokens 16384 --max-length 4096 --aux-layers auto]

Per sample the store gets the ids, the loss mask, three aux hidden states at every token, the
final post-norm state where the next token carries loss (~25% of a chat sample's positions;
``--last-hidden all`` keeps all of them, ~23% more bytes) and the audio embeddings; see
:mod:`modeling.target_io.capture` and the README, "Stage 2".

Forwards take ``--batch-tokens`` padded tokens. Records are read in windows of
``--sort-window``; a window is sorted by length into batches (padding stays small) and its
samples are written in input order, so the store never depends on batching. The store writer
encodes and compresses in a thread while the next window runs. Resume: a rerun continues each
shard after the writer's last durable flush (a kill loses at most two windows) and rebuilds the
same batches, so a resumed store is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from modeling.target_io.capture import TargetCapture, aux_layer_ids, check_audio_spans, plan_batches
from pipeline.core.cli import stage_main
from pipeline.core.config import ConfigError, dtype_opt, opt, require
from pipeline.core.durable import DurableJsonl, atomic_write_text, sha256_file
from pipeline.core.locks import LockHeld
from pipeline.core.manifest import Manifest, ManifestMismatch, sharded_output_complete
from pipeline.core.progress import Progress
from pipeline.core.resources import ResourceMeter
from pipeline.core.shards import Shard, plan_shards, resolve_shard_index, run_shards
from pipeline.data.audio import AudioLimits
from pipeline.data.inputs import InputSet, read_input
from pipeline.data.records import Record, RecordError, Rejection
from pipeline.data.samples import PreparedSample, load_target_processor, prepare_sample
from pipeline.data.shard_stage import ShardResult, ShardStageOptions, result_of, shard_accounting
from pipeline.data.template import ChatTokenizer
from storage import checksum
from storage.chunk_compression import DEFAULT_CODEC
from storage.columns import DEFAULT_COMPRESSION_THREADS
from storage.layout import INDEX_NAME, read_index
from storage.sample import CapturedSample, SampleError
from storage.store import create_store, make_header, store_codec
from storage.writer import ShardWriter, commit_shard

log = logging.getLogger("stages.dump")


@dataclass(kw_only=True)
class DumpConfig(ShardStageOptions):
    """Options of stage 2 (``dump:`` section of a pipeline YAML); ``--input`` is stage 1's output
    directory (its completed shards) or a conversation jsonl."""

    store: str = opt("", "hidden-state store directory (created, or resumed when it exists)")
    batch_tokens: int = opt(16384, "padded tokens per forward (batch size x longest sample)")
    sort_window: int = opt(64, "records sorted by length together; up to two windows of captures wait in "
                               "RAM for the writer (~30 MB per 1k-token sample of a 7B)")
    max_length: int = opt(4096, "longest sample in tokens; longer ones are rejected unless --truncate")
    truncate: bool = opt(False, "cut over-long samples to --max-length instead of rejecting them")
    aux_layers: str = opt("auto", "aux layers 'auto' (= 1, L/2-1, L-4) or 'i,j,k', as outputs of decoder layer i")
    last_hidden: Literal["loss", "all"] = opt("loss", "store the final hidden state where the next token "
                                                      "carries loss, or at every position")
    dtype: str = dtype_opt("bf16", "target compute dtype (stored values are bf16 either way)", ("bf16", "fp32"))
    device: str = opt("cpu", "torch device: cpu, cuda or cuda:N")
    quantize: Literal["none", "fp8"] = opt("none", "fp8: per-row scaled e4m3 aux states and audio embeddings")
    store_codec: Literal["auto", "zstd", "lz4", "none"] = opt(
        "auto", "chunk codec of the hidden states: zstd (smallest), none (raw: ~1.4x the bytes, reads without "
                "decoding), lz4; auto = an existing store's, else zstd")
    compression_threads: int = opt(DEFAULT_COMPRESSION_THREADS,
                                   "threads compressing and writing chunks (the store's bytes do not depend on it)")

    def __post_init__(self) -> None:
        self.check_shard_options("store")
        for name in ("batch_tokens", "sort_window", "max_length", "compression_threads"):
            require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        require(self.device == "cpu" or self.device.startswith("cuda"), f"--device {self.device!r}: use cpu or cuda[:N]")


# ---- target and store -----------------------------------------------------------------------------


class Target:
    """The target's family, identity and layer ids at once (from its files); the model on first use."""

    def __init__(self, cfg: DumpConfig):
        from modeling.targets import UnsupportedTarget, family_of, target_identity, target_text_config

        self.cfg = cfg
        self.path = Path(cfg.target).resolve()
        try:
            self.family = family_of(self.path)
            self.identity = target_identity(self.path)
            text = target_text_config(self.path)
        except (UnsupportedTarget, ValueError) as err:
            raise ConfigError(f"--target {self.path}: {err}") from None
        self.num_layers, self.hidden_size = text["num_hidden_layers"], text["hidden_size"]
        try:
            self.aux_out, self.aux_in = aux_layer_ids(self.num_layers, cfg.aux_layers)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self._loaded: tuple[ChatTokenizer, TargetCapture] | None = None

    def load(self) -> tuple[ChatTokenizer, TargetCapture]:
        """The chat tokenizer and the hooked model, loaded once (a rerun of done shards never loads)."""
        if self._loaded is None:
            tokenizer, features = load_target_processor(self.path)
            chat = ChatTokenizer(tokenizer, self.family)
            model = self.family.load_model(self.path, self.cfg.dtype, self.cfg.device)
            capture = TargetCapture(model, self.family, features, aux_layers=self.aux_out,
                                    pad_token_id=tokenizer.pad_token_id, audio_token_id=chat.audio_token_id,
                                    last_hidden=self.cfg.last_hidden)
            self._loaded = (chat, capture)
        return self._loaded


def open_store_for(cfg: DumpConfig, target: Target, inputs: InputSet) -> Manifest:
    """Create the store or check that it was made from this target, layers, input and settings.

    An existing store keeps its read checksum (format 1: sha256) and, with ``--store-codec auto``,
    its codec, so a store written before format 2 is resumed exactly as it was begun.
    """
    existing = Manifest(cfg.store).load()
    is_store = existing.get("kind") == "hidden_state_store"
    codec = cfg.store_codec if cfg.store_codec != "auto" else store_codec(existing) if is_store else DEFAULT_CODEC
    header = make_header(
        target_path=str(target.path), target_config_hash=target.identity["sha256"], hidden_size=target.hidden_size,
        layer_ids=target.aux_out, layer_convention="decoder_layer",
        layer_ids_by_convention={"decoder_layer": target.aux_out, "hf_hidden_states": target.aux_in},
        dtype="bfloat16", quantization=cfg.quantize, codec=codec,
        checksum=checksum.store_checksum(existing) if is_store else checksum.DEFAULT)
    manifest = create_store(cfg.store, header)
    # what decides which samples exist and what they hold; a rerun must agree
    settings = {"input_sha256": inputs.sha256, "num_records": inputs.total, "num_shards": cfg.num_shards,
                "max_length": cfg.max_length, "truncate": cfg.truncate, "split_long_audio": cfg.split_long_audio,
                "last_hidden": cfg.last_hidden, "compute_dtype": cfg.dtype}

    def check(data: dict[str, Any]) -> None:
        data.setdefault("num_shards", cfg.num_shards)  # where stage 1's manifest keeps it too
        old = data.setdefault("dump", {"settings": settings, "input": [str(f.resolve()) for f in inputs.files]})
        diffs = [f"{k}: existing {old['settings'].get(k)!r} vs now {v!r}"
                 for k, v in settings.items() if old["settings"].get(k) != v]
        if diffs:
            raise ManifestMismatch(f"{manifest.path} was dumped with other settings ({'; '.join(diffs)}). "
                                   f"Use a new --store, or rerun with the original settings.")

    manifest.update(check)
    return manifest


# ---- one shard ----------------------------------------------------------------------------------


class RejectionLog:
    """A shard's rejections: appended durably as found (resume skips them), rewritten sorted at the end."""

    def __init__(self, path: Path):
        self.path = path
        self._log = DurableJsonl(path)
        self.rows = {row["index"]: row for row in self._log.read()}

    def add(self, rejections: Sequence[Rejection]) -> None:
        new = [r.to_dict() for r in rejections if r.index not in self.rows]
        self._log.append_many(new)
        self.rows.update((row["index"], row) for row in new)

    def finish(self) -> str:
        """Rewrite in input order, atomically; returns the file's sha256."""
        self.close()
        atomic_write_text(self.path, "".join(json.dumps(self.rows[i], sort_keys=True, ensure_ascii=False) + "\n"
                                             for i in sorted(self.rows)))
        return sha256_file(self.path)

    def close(self) -> None:
        self._log.close()

    def __enter__(self) -> RejectionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dump_shard(cfg: DumpConfig, shard: Shard, target: Target, inputs: InputSet) -> ShardResult:
    """Dump one shard into the store and record it in the manifest (after its data is durable)."""
    with ResourceMeter() as meter:  # the model's load counts: it is most of a small shard's memory
        return _dump_shard(cfg, shard, target, inputs, meter)


def _dump_shard(cfg: DumpConfig, shard: Shard, target: Target, inputs: InputSet, meter: ResourceMeter) -> ShardResult:
    start = time.monotonic()
    chat, capture = target.load()
    records = [r for r in inputs.records if shard.start <= r.index < shard.stop]
    tokens = 0
    with RejectionLog(Path(cfg.store) / f"errors-{shard.index:05d}.jsonl") as errors:
        errors.add([r for r in inputs.rejected if shard.start <= r.index < shard.stop])
        with ShardWriter(cfg.store, shard, resume=True, background=True, queue_size=cfg.sort_window,
                         compression_threads=cfg.compression_threads) as writer, \
                Progress(len(records), shard.name, unit="records") as progress:
            done = set(errors.rows) | _committed_indices(writer, records)
            for w0 in range(0, len(records), cfg.sort_window):
                window = records[w0: w0 + cfg.sort_window]
                if any(r.index not in done for r in window):
                    captured, rejected = _run_window(cfg, chat, capture, window, done)
                    if writer.num_written > writer.num_committed:
                        writer.flush()  # the previous window, written while this one ran forwards
                    errors.add(rejected + _write_in_order(writer, window, captured, done))
                    tokens += sum(c.num_tokens for c in captured.values())
                progress.update(len(window), tok_s=f"{tokens / max(time.monotonic() - start, 1e-9):.0f}")
            entry = writer.finish()
        counts = shard_accounting(shard, entry["num_samples"], errors.rows.values())
        entry.update(counts, errors_file=errors.path.name, errors_sha256=errors.finish(),
                     resources=meter.result(tokens))
    commit_shard(Manifest(cfg.store), shard, entry)
    return result_of(shard, counts, tokens, time.monotonic() - start)


def _committed_indices(writer: ShardWriter, records: list[Record]) -> set[int]:
    """Input indices of the samples the writer holds durably (a prefix of the accepted ones)."""
    ids = writer.committed_ids
    if len(ids) < writer.num_committed:  # the shard was finished (renamed) before a kill
        ids = read_index((writer.final_dir / INDEX_NAME).read_bytes()).column("id").to_pylist()
    by_id = {r.id: r.index for r in records}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise ManifestMismatch(f"{writer.tmp_dir}: holds samples {unknown[:3]} that are not in this shard's input")
    return {by_id[i] for i in ids}


def _run_window(cfg: DumpConfig, chat: ChatTokenizer, capture: TargetCapture, window: list[Record],
                done: set[int]) -> tuple[dict[int, CapturedSample], list[Rejection]]:
    """Prepare a window, batch it by length and capture every batch holding an undone sample.

    The batch plan covers the whole window (done samples included), so a resumed window runs
    exactly the batches, and so gets exactly the numbers, of an uninterrupted run.
    """
    limits = AudioLimits(max_seconds=chat.family.max_audio_seconds, split_long=cfg.split_long_audio)
    prepared: list[PreparedSample] = []
    rejected: list[Rejection] = []
    for rec in window:
        try:
            sample = prepare_sample(rec, chat, limits=limits, max_length=cfg.max_length, truncate=cfg.truncate)
            check_audio_spans(sample, chat.family.min_audio_tokens)
            prepared.append(sample)
        except RecordError as err:
            if rec.index not in done:
                rejected.append(rec.reject(err.field, err.reason))
    captured: dict[int, CapturedSample] = {}
    for batch in plan_batches([p.length for p in prepared], cfg.batch_tokens):
        group = [prepared[i] for i in batch]
        if all(p.record.index in done for p in group):
            continue
        for p, sample in zip(group, capture.capture(group), strict=True):
            captured[p.record.index] = sample
    return captured, rejected


def _write_in_order(writer: ShardWriter, window: list[Record], captured: dict[int, CapturedSample],
                    done: set[int]) -> list[Rejection]:
    """Hand the window's new samples to the writer in input order; NaN/Inf ones become rejections."""
    rejected = []
    for rec in window:
        sample = captured.get(rec.index)
        if sample is None or rec.index in done:
            continue
        try:
            writer.write(sample)  # validates shapes and finiteness before queueing
        except SampleError as err:
            rejected.append(rec.reject("hidden_states", str(err)))
    return rejected


# ---- entry point ----------------------------------------------------------------------------------


def run_dump(cfg: DumpConfig) -> list[ShardResult]:
    """Dump the selected shard (or every shard not yet complete); returns what this call did."""
    inputs = read_input(cfg.input)
    target = Target(cfg)
    manifest = open_store_for(cfg, target, inputs)
    shards = plan_shards(inputs.total, cfg.num_shards)
    index = resolve_shard_index(cfg.shard_index, cfg.num_shards)
    results: list[ShardResult] = []
    run_shards(cfg.store, shards, index, lambda s: results.append(dump_shard(cfg, s, target, inputs)), manifest)
    return results


def _dump_and_report(cfg: DumpConfig) -> int:
    for r in run_dump(cfg):
        log.info("%s: %d input = %d accepted + %d rejected; %d tokens in %.1f s (%.0f tokens/s)", r.shard.name,
                 len(r.shard), r.accepted, r.rejected, r.tokens, r.seconds, r.tokens / max(r.seconds, 1e-9))
    return 0


def is_complete(store: str | Path) -> bool:
    """Every planned shard of the store is committed (its manifest says so)."""
    return sharded_output_complete(Path(store))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit statuses as in :mod:`pipeline.core.cli`."""
    return stage_main("python -m stages.dump", DumpConfig, "dump",
                      "Stage 2: dump the target's aux hidden states into a hidden-state store.", argv,
                      _dump_and_report, input_errors=(ValueError, LockHeld))


if __name__ == "__main__":
    sys.exit(main())
