"""Stage 1: regenerate every assistant turn with the target model, sharded and resumable.

    python -m stages.regenerate --target DIR --input IN.jsonl --output OUT_DIR \\
        [--num-shards N --shard-index I] [--server URL ...] [--config configs/regenerate.yaml]

EAGLE-3 drafts learn the target's own distribution, so the answers in the training data are
replaced by what the target generates for the same prompts. The default engine is vLLM in-process,
fed the exact token ids of :class:`pipeline.data.template.ChatTokenizer` (one ``<|AUDIO|>`` per clip;
vLLM expands it), so stage 2 later sees the very prompt vLLM saw. Assistant turns are regenerated
in order and later turns are conditioned on the generated ids of earlier ones; a conversation
that ends with a user turn gets one assistant turn appended. With ``--server`` the requests go to
OpenAI-compatible servers instead (see :mod:`pipeline.engine.server` for why multi-turn records
there are conditioned on re-tokenized text).

Output in OUT_DIR: ``shard-XXXXX-of-YYYYY.jsonl`` (records with the generated text and, per
regenerated turn, ``token_ids``, ``finish_reason``, ``prompt_tokens``), ``errors-XXXXX.jsonl`` (one
line per rejected input record) and ``manifest.json`` (settings, per-shard counts and hashes).
Inside a shard every batch is appended durably to ``progress/<shard>.jsonl``; a rerun skips the
records found there. Batches are cut at fixed positions of the shard, so a resumed run sends vLLM
the same batches as an uninterrupted one, and per-request seeds come from (seed, record, k, turn),
so sampling does not depend on batching or sharding either.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from modeling.targets import family_of, target_identity
from pipeline.core.cli import stage_main
from pipeline.core.config import ConfigError, config_hash, dtype_opt, opt, require
from pipeline.core.durable import DurableJsonl, atomic_write_bytes, fsync_dir, sha256_bytes
from pipeline.core.locks import LockHeld
from pipeline.core.manifest import Manifest, ManifestMismatch, sharded_output_complete
from pipeline.core.progress import Progress
from pipeline.core.resources import ResourceMeter
from pipeline.core.shards import Shard, plan_shards, resolve_shard_index, run_shards
from pipeline.core.stage1_layout import shard_files
from pipeline.data.audio import AudioLimits
from pipeline.data.clip_files import vad_records, with_clip_files
from pipeline.data.records import Part, Record, RecordError, Rejection, Turn, sampled_answer_id
from pipeline.data.samples import load_record_audio, split_audio_parts
from pipeline.data.shard_stage import ShardResult, ShardStageOptions, result_of, shard_accounting
from pipeline.data.sources import InputSource, SourceOptions, open_source
from pipeline.data.template import ChatTokenizer
from pipeline.engine.offline import Generator, GenRequest, GenResult, Sampling
from pipeline.engine.server import RequestFailed

log = logging.getLogger("stages.regenerate")

# Options that do not change the output: a rerun may change them and still resume.
RUNTIME_OPTIONS = ("target", "input", "output", "shard_index", "batch_size", "server", "tensor_parallel_size",
                   "request_timeout_s", "max_concurrency", "retries", "log_every_s")
MUST_MATCH = ("stage", "input_sha256", "target_config_hash", "sampling", "config_hash", "num_shards", "engine")


@dataclass(kw_only=True)
class RegenerateConfig(ShardStageOptions, SourceOptions):
    """Stage 1 settings; every field is also a ``--flag`` and a YAML key."""

    output: str = opt("", "output directory: shard files, error files, manifest.json")
    max_new_tokens: int = opt(512, "generated tokens per assistant turn at most")
    temperature: float = opt(0.0, "sampling temperature; 0 = greedy")
    top_p: float = opt(1.0, "nucleus sampling threshold")
    n: int = opt(1, "responses per prompt; each is its own record with id '<id>#<k>' when n > 1")
    seed: int = opt(0, "base seed; each request's seed is derived from (seed, record index, k, turn)")
    batch_size: int = opt(64, "records per engine call and per durable checkpoint inside a shard")
    server: list[str] = opt([], "OpenAI-compatible server URL(s), repeatable; default: in-process vLLM",
                            repeatable=True)
    tensor_parallel_size: int = opt(1, "GPUs per model replica (offline engine)")
    max_model_len: int | None = opt(None, "context length: the offline engine's, and the prompt + answer limit "
                                    "in both modes (default: what the model or server reports)")
    dtype: str = dtype_opt("auto", "weight dtype for the offline engine", hashed_long=True)  # resumes old runs
    request_timeout_s: float = opt(600.0, "server mode: seconds before a request is abandoned and retried")
    max_concurrency: int = opt(16, "server mode: requests in flight at once, over all servers")
    retries: int = opt(3, "server mode: retries per request (exponential backoff, next server each time)")
    vad_split: bool = opt(False, "cut a record's one clip over the audio window at pauses (voice activity "
                                 "detection) into pieces, each its own record with parent_id and offsets")
    vad_detector: str = opt("silero", "--vad-split's detector: silero, webrtc or energy (pipeline/data/vad.py)")
    log_every_s: float = opt(30.0, "seconds between progress lines when stderr is not a terminal")

    def __post_init__(self) -> None:
        self.check_shard_options("output")
        require(self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        require(self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}")
        require(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        require(self.n >= 1, f"--n must be >= 1, got {self.n}")
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(self.max_concurrency >= 1 and self.retries >= 0, "--max-concurrency >= 1 and --retries >= 0")
        require(not (self.vad_split and self.split_long_audio), "give --vad-split or --split-long-audio, not both")
        from pipeline.data.vad import DETECTORS

        require(self.vad_detector in DETECTORS, f"--vad-detector must be one of {list(DETECTORS)}")

    def limits(self, family: Any) -> AudioLimits:
        return AudioLimits(max_seconds=family.max_audio_seconds, split_long=self.split_long_audio)


def derive_seed(seed: int, index: int, k: int, turn: int) -> int:
    """A request's seed from its identity alone, so batching and sharding cannot change it."""
    digest = hashlib.sha256(f"{seed}:{index}:{k}:{turn}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@functools.lru_cache(maxsize=2)
def _tokenizer(target: str) -> Any:
    from pipeline.data.samples import load_target_processor

    return load_target_processor(target)[0]


def make_engine(cfg: RegenerateConfig) -> Generator:
    """The offline vLLM engine, or a client of ``cfg.server`` URLs."""
    if cfg.server:
        from pipeline.engine.server import ServerClient, ServerGenerator

        client = ServerClient(cfg.server, timeout_s=cfg.request_timeout_s, retries=cfg.retries)
        return ServerGenerator(client, family_of(cfg.target), max_concurrency=cfg.max_concurrency)
    from pipeline.engine.offline import OfflineGenerator, build_llm

    return OfflineGenerator(build_llm(cfg.target, tensor_parallel_size=cfg.tensor_parallel_size,
                                      max_model_len=cfg.max_model_len, dtype=cfg.dtype, seed=cfg.seed))



class EngineUnavailable(RuntimeError):
    """Every request of a batch failed: the engine or all servers are down."""


@dataclass
class _Chain:
    """One response (k) to one record: its turns fill in as assistant turns are generated."""

    record: Record
    k: int
    turns: list[Turn]
    targets: list[int]  # indices of the assistant turns to generate, in order
    audios: list[Any]
    counts: list[int]  # audio tokens per clip after vLLM's expansion
    tokens: int = 0
    error: Rejection | None = None


def _with_final_turn(turns: list[Turn]) -> list[Turn]:
    """A conversation ending with a user turn gets an (empty) assistant turn to generate."""
    if turns[-1].role == "assistant":
        return list(turns)
    return [*turns, Turn("assistant", [Part("text", text="")], content_is_string=True)]


def _output_turn(raw: dict[str, Any], turn: Turn, original: Turn) -> dict[str, Any]:
    """The JSON turn: generated answers with their ids; user audio paths made absolute, because
    the output lives in another folder than the input the relative paths were written for."""
    if turn.role == "assistant":
        out = {k: v for k, v in raw.items() if k not in ("content", "token_ids", "finish_reason", "prompt_tokens")}
        content: Any = turn.text if turn.content_is_string else [{"type": "text", "text": turn.text}]
        out.update(role="assistant", content=content, token_ids=turn.token_ids, **turn.extra)
        return out
    out = dict(raw)
    if isinstance(raw.get("content"), list):
        items = []
        for item, part in zip(raw["content"], original.parts, strict=True):
            item = dict(item)
            if part.kind == "audio":
                item.pop("audio_url", None)
                item.update(type="audio", audio=str(part.audio))
            items.append(item)
        out["content"] = items
    return out


def output_record(chain: _Chain, n: int) -> dict[str, Any]:
    """The regenerated record: the input's fields, new answers, provenance of the source line."""
    rec = chain.record
    raw_turns = rec.raw["conversations"]
    out = {k: v for k, v in rec.raw.items() if k != "conversations"}
    out["id"] = sampled_answer_id(rec.id, chain.k, n)
    out.update(source_id=rec.id, source_hash=rec.source_hash, source_index=rec.index)
    out["conversations"] = [
        _output_turn(raw_turns[i] if i < len(raw_turns) else {}, turn, rec.turns[i] if i < len(rec.turns) else turn)
        for i, turn in enumerate(chain.turns)
    ]
    return out


class _ShardWork:
    """Generation for the records of one shard, batch by batch."""

    def __init__(self, cfg: RegenerateConfig, engine: Generator, shard: Shard):
        self.cfg, self.engine = cfg, engine
        self.tokenizer = _tokenizer(str(Path(cfg.target).resolve()))
        self.chat = ChatTokenizer(self.tokenizer, family_of(cfg.target))
        self.limits = cfg.limits(self.chat.family)
        self.audio_dir = Path(cfg.output) / "audio" / shard.name  # clips without a file, VAD pieces
        self.vad_limits = replace(self.limits, split_long=True, vad=True, vad_detector=cfg.vad_detector)
        limits = [n for n in (engine.max_model_len, cfg.max_model_len) if n]
        self.context = min(limits) if limits else sys.maxsize

    def _chains(self, rec: Record) -> list[_Chain]:
        """One chain per response; raises RecordError for unusable audio."""
        audios = load_record_audio(rec, self.limits)
        # split clips become several placeholders; only the prompt sees them, the output keeps
        # the original parts (stage 2 splits them the same way with the same flag)
        prompt_rec = split_audio_parts(rec, self.limits) if self.cfg.split_long_audio else rec
        turns = _with_final_turn(prompt_rec.turns)
        targets = [i for i, t in enumerate(turns) if t.role == "assistant"]
        counts = [self.chat.num_audio_tokens(a.shape[0]) for a in audios]
        return [_Chain(rec, k, list(turns), targets, audios, counts) for k in range(self.cfg.n)]

    def _request(self, chain: _Chain, t: int) -> GenRequest | Rejection:
        ids = self.chat.encode(chain.turns, until_turn=t).input_ids.tolist()
        n_audio = sum(len(turn.audio_paths) for turn in chain.turns[:t])
        length = len(ids) - n_audio + sum(chain.counts[:n_audio])
        room = self.context - length
        if room < 1:
            rec = chain.record
            return rec.reject(f"conversations[{t}]",
                             f"prompt longer than the model's context ({length} tokens with audio expanded, "
                             f"max_model_len {self.context})")
        cfg = self.cfg
        # capped to the room left so that both engines stop at the context end instead of erroring
        sampling = Sampling(min(cfg.max_new_tokens, room), cfg.temperature, cfg.top_p,
                            derive_seed(cfg.seed, chain.record.index, chain.k, t))
        return GenRequest(ids, chain.audios[:n_audio], sampling, chain.turns[:t])

    def _accept(self, chain: _Chain, t: int, result: GenResult) -> None:
        rec = chain.record
        if result.error is not None:
            chain.error = rec.reject("engine", result.error)
            return
        # the text is decoded from the ids, so ids and text can never disagree
        text = self.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        old = chain.turns[t]
        chain.turns[t] = replace(old, parts=[Part("text", text=text)], token_ids=result.token_ids,
                                 extra={"finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens})
        chain.tokens += len(result.token_ids)

    def _generate(self, chains: list[_Chain]) -> None:
        """Round r generates the r-th assistant turn of every chain that has one."""
        for r in range(max((len(c.targets) for c in chains), default=0)):
            todo: list[tuple[_Chain, int, GenRequest]] = []
            for chain in chains:
                if r >= len(chain.targets) or chain.error is not None:
                    continue
                req = self._request(chain, chain.targets[r])
                if isinstance(req, Rejection):
                    chain.error = req
                else:
                    todo.append((chain, chain.targets[r], req))
            results = self.engine.generate([req for _, _, req in todo])
            if results and all(res.error is not None for res in results):
                # an outage, not bad records: fail the job so a rerun retries instead of
                # committing the rest of the shard as rejected
                raise EngineUnavailable(f"every request of a batch failed, e.g. {results[0].error}")
            for (chain, t, _), result in zip(todo, results, strict=True):
                self._accept(chain, t, result)

    def _write(self, rec: Record, name: str, data: bytes) -> Path:
        path = self.audio_dir / f"{rec.index:09d}-{name}"
        atomic_write_bytes(path, data)  # durable before the progress row that names it
        return path.resolve()

    def batch_rows(self, records: list[Record]) -> list[dict[str, Any]]:
        """One progress-log row per record: its output lines and token count, or its error."""
        chains: list[_Chain] = []
        failed: dict[int, Rejection] = {}
        for rec in records:
            try:
                pieces = vad_records(rec, self.vad_limits, self._write) if self.cfg.vad_split else [rec]
                for piece in pieces:
                    chains.extend(self._chains(piece))
            except RecordError as err:
                failed[rec.index] = rec.reject(err.field, err.reason)
        self._generate(chains)
        written: dict[str, Record] = {}
        for chain in chains:
            if chain.error is None and not failed.get(chain.record.index):
                rec = chain.record
                chain.record = written.setdefault(rec.id, with_clip_files(rec, self._write))
        by_record: dict[int, list[_Chain]] = {}
        for chain in chains:
            by_record.setdefault(chain.record.index, []).append(chain)
        rows = []
        for rec in records:
            mine = by_record.get(rec.index, [])
            error = failed.get(rec.index) or next((c.error for c in mine if c.error is not None), None)
            if error is not None:
                rows.append({"index": rec.index, "error": error.to_dict()})
                continue
            lines = [json.dumps(output_record(c, self.cfg.n), ensure_ascii=False) for c in mine]
            rows.append({"index": rec.index, "lines": lines, "tokens": sum(c.tokens for c in mine)})
        return rows


def _batches(items: Iterable[Record | Rejection], shard: Shard, size: int,
             rejected: list[Rejection]) -> Iterator[list[Record]]:
    """The shard's records in batches cut at fixed input positions (every ``size`` indices), so a
    resumed run sends the engine the same batches; the reader's rejections go to ``rejected``.
    Only one batch of records (with its in-dataset audio) is held at a time."""
    batch: list[Record] = []
    end = shard.start + size
    for item in items:
        while item.index >= end:
            yield batch
            batch, end = [], end + size
        (rejected if isinstance(item, Rejection) else batch).append(item)
    yield batch


def regenerate_shard(cfg: RegenerateConfig, shard: Shard, items: Iterable[Record | Rejection],
                     engine: Generator) -> ShardResult:
    """Generate the shard's records (resuming from its progress log), then commit the shard:
    records and errors files atomically, then the manifest entry, then drop the log.

    ``items`` are the reader's records and rejections of the shard, one per input index in order.
    """
    start = time.monotonic()
    meter = ResourceMeter()
    progress_path = shard_files(cfg.output, shard)[2]
    work = _ShardWork(cfg, engine, shard)
    rejected: list[Rejection] = []
    with meter, DurableJsonl(progress_path) as progress_log:
        rows = {row["index"]: row for row in progress_log.read()}
        if rows:
            log.info("%s: resuming, %d of %d records already durable", shard.name, len(rows), len(shard))
        with Progress(len(shard), shard.name, unit="rec", log_every_s=cfg.log_every_s, logger=log) as bar:
            tokens = 0
            for batch in _batches(items, shard, cfg.batch_size, rejected):
                todo = [r for r in batch if r.index not in rows]
                bar.update(len(batch) - len(todo))
                if not todo:
                    continue
                new = work.batch_rows(todo)
                progress_log.append_many(new)
                rows.update((row["index"], row) for row in new)
                tokens += sum(row.get("tokens", 0) for row in new)
                bar.update(len(todo), tok_s=f"{tokens / (time.monotonic() - start):.1f}")
    bar.update(len(rejected))
    result = _commit(cfg, shard, rows, rejected, meter.result(tokens))
    progress_path.unlink()
    fsync_dir(progress_path.parent)
    result.seconds = time.monotonic() - start
    return result


def _commit(cfg: RegenerateConfig, shard: Shard, rows: dict[int, dict[str, Any]],
            rejected: list[Rejection], resources: dict[str, Any]) -> ShardResult:
    """Write the shard's files and manifest entry; checks that every input record is accounted for."""
    records_path, errors_path, _ = shard_files(cfg.output, shard)
    read_errors = {r.index: r.to_dict() for r in rejected}
    lines: list[str] = []
    errors: list[dict[str, Any]] = []
    accepted = tokens = 0
    for index in range(shard.start, shard.stop):
        row = rows.get(index)
        error = read_errors.get(index) or (row or {}).get("error")
        if (row is None) == (index not in read_errors):
            raise RuntimeError(f"{shard.name}: record {index} has {'no' if row is None else 'two'} outcomes")
        if error is not None:
            errors.append(error)
        else:
            lines.extend(row["lines"])
            accepted += 1
            tokens += row["tokens"]
    counts = shard_accounting(shard, accepted, errors)
    result = result_of(shard, counts, tokens, 0.0)
    result.output_records = len(lines)
    files = {}
    error_lines = [json.dumps(e, ensure_ascii=False, sort_keys=True) for e in errors]
    for path, body in ((records_path, lines), (errors_path, error_lines)):
        data = "".join(line + "\n" for line in body).encode("utf-8")
        atomic_write_bytes(path, data)
        files[path.name] = {"sha256": sha256_bytes(data), "bytes": len(data), "lines": len(body)}
    Manifest(cfg.output).mark_shard(shard.index, {
        "status": "done", "records": [shard.start, shard.stop], **counts, "output_records": result.output_records,
        "generated_tokens": result.tokens, "files": files, "resources": resources,
    })
    log.info("%s: committed %d records (%d output records, %d rejected) to %s", shard.name, result.accepted,
             result.output_records, result.rejected, records_path)
    return result


def manifest_header(cfg: RegenerateConfig, source: InputSource) -> dict[str, Any]:
    """The run's identity; resuming requires the :data:`MUST_MATCH` keys to be equal."""
    spec = cfg.input if set("*?[") & set(cfg.input) else str(Path(cfg.input).resolve())
    return {
        "stage": "regenerate", "input": spec, "input_sha256": source.fingerprint(),
        "input_records": source.total, "input_source": source.describe(), "target": str(Path(cfg.target).resolve()),
        "target_config_hash": target_identity(cfg.target)["sha256"], "num_shards": cfg.num_shards,
        "sampling": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
                     "n": cfg.n, "seed": cfg.seed},
        "engine": "server" if cfg.server else "offline", "config_hash": config_hash(cfg, exclude=RUNTIME_OPTIONS),
        "config": {k: v for k, v in vars(cfg).items() if k not in ("server",)},
    }


def _log_summary(results: list[ShardResult], busy: list[int], seconds: float) -> None:
    if busy:
        log.warning("shards %s are locked by other jobs and were left to them", busy)
    if not results:
        log.info("nothing to do: the selected shards are complete%s", " or busy" if busy else "")
        return
    accepted = sum(r.accepted for r in results)
    rejected = sum(r.rejected for r in results)
    tokens = sum(r.tokens for r in results)
    log.info("done: %d shard(s), %d input records: %d regenerated (%d output records), %d rejected; "
             "%d tokens in %.1f s (%.1f tokens/s overall, engine start included)", len(results),
             accepted + rejected, accepted, sum(r.output_records for r in results), rejected, tokens, seconds,
             tokens / max(seconds, 1e-9))
    for reason, count in sum((r.reasons for r in results), Counter()).most_common():
        log.info("  rejected %5d  %s", count, reason)


def run(cfg: RegenerateConfig, engine: Generator | None = None) -> list[ShardResult]:
    """Regenerate the selected shard (or all of them); ``engine`` defaults to :func:`make_engine`,
    built only once a shard actually needs work."""
    start = time.monotonic()
    # audio is decoded per shard while generating, not here: every job of a 1000-task array
    # would otherwise decode the whole dataset's audio just to find its own records
    family_of(cfg.target)  # an unsupported target is refused before any work
    source = open_source(cfg.input, cfg)  # counts records; reads them only shard by shard
    shards = plan_shards(source.total, cfg.num_shards)
    try:
        shard_index = resolve_shard_index(cfg.shard_index, cfg.num_shards)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    manifest = Manifest(cfg.output)
    manifest.init(manifest_header(cfg, source), MUST_MATCH)
    if cfg.n > 1 and cfg.temperature == 0:
        log.warning("--n %d with --temperature 0 gives %d identical responses per prompt", cfg.n, cfg.n)
    results: list[ShardResult] = []
    owned = engine is None

    def process(shard: Shard) -> None:
        nonlocal engine
        if engine is None:
            engine = make_engine(cfg)
        results.append(regenerate_shard(cfg, shard, source.read(shard.start, shard.stop), engine))

    try:
        summary = run_shards(cfg.output, shards, shard_index, process, manifest)
    finally:
        if owned and engine is not None:
            engine.close()
    _log_summary(results, summary.busy, time.monotonic() - start)
    return results


def is_complete(output: str | Path) -> bool:
    """Every planned shard of the output directory is committed (its manifest says so)."""
    return sharded_output_complete(Path(output))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit statuses as in :mod:`pipeline.core.cli` (1: the engine or every server failed)."""
    return stage_main("python -m stages.regenerate", RegenerateConfig, "regenerate", __doc__.split("\n\n")[0],
                      argv, run, input_errors=(LockHeld, ConfigError, ManifestMismatch, FileNotFoundError,
                                               RequestFailed),
                      service_errors=(EngineUnavailable,))


if __name__ == "__main__":
    sys.exit(main())
