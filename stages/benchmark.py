"""Measure an exported EAGLE-3 draft: acceptance, speed-up and losslessness against the plain target.

    python -m stages.benchmark --target DIR --draft DRAFT_DIR --input EVAL.jsonl --output RESULT.json \\
        [--num-spec-tokens 4 --max-new-tokens 256 --temperature 0 --num-prompts 100 --max-num-seqs 1]
    python -m stages.benchmark --target DIR --input EVAL.jsonl --output RESULT.json \\
        --server http://HOST:8000 [--baseline-server http://HOST:8001]

Each eval record gives one prompt: the conversation up to its first assistant turn (audio +
instruction), built as token ids by :class:`pipeline.data.template.ChatTokenizer` exactly as stage 1
does; that turn's text, when present, is the reference for WER, and its ``token_ids`` (stage 1's
output directory is a valid ``--input``) show whether the served target still says what stage 1
wrote. Offline mode runs the target alone, frees it, then runs it with the draft (two engines
never share the host memory); each engine gets one warm-up request, then ``--repeats`` timed
passes over all prompts (medians and ranges in the report). Acceptance comes from vLLM's
spec-decode counters (:mod:`pipeline.engine.spec_counters`) read around the timed passes.

At temperature 0, prompts whose plain and speculative outputs differ are checked by
:mod:`modeling.target_io.tie_check`: a divergence at a near-tie of the fp32 target is rounding noise of the
engine's dtype, anything else a real mismatch. Writes RESULT.json (README, "Export, serve and
benchmark"), ``RESULT.outputs.jsonl`` (per prompt: both runs' ids and texts) and prints a table.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.cli import stage_main
from pipeline.core.config import dtype_opt, opt, require
from pipeline.core.dtypes import from_engine
from pipeline.core.durable import atomic_write_json, atomic_write_text
from pipeline.core.resources import ResourceMeter
from pipeline.data.audio import AudioLimits
from pipeline.data.records import RecordError, Rejection
from pipeline.data.sources import SourceOptions, open_source
from pipeline.engine.offline import Generator, GenRequest, GenResult, Sampling
from pipeline.engine.spec_counters import SpecCounters, scrape_spec
from stages.benchmark_report import build_report, format_table

log = logging.getLogger("stages.benchmark")


@dataclass(kw_only=True)
class BenchmarkConfig(SourceOptions):
    """Options of the benchmark (``benchmark:`` section of a pipeline YAML)."""

    target: str = opt("", "target model directory (its tokenizer builds the prompts in every mode)")
    draft: str = opt("", "exported draft directory (stages.export --engine vllm); empty: plain run only")
    input: str = opt("", "eval records: a conversation jsonl, a glob, parquet files, a save_to_disk dataset, "
                         "WebDataset shards or stage 1's output (docs/inputs.md); the first assistant turn of "
                         "each record, or a pair dataset's text column, is the reference")
    output: str = opt("", "RESULT.json path (RESULT.outputs.jsonl is written next to it)")
    num_spec_tokens: int = opt(4, "draft tokens proposed per step (k)")
    max_new_tokens: int = opt(256, "generated tokens per prompt at most")
    temperature: float = opt(0.0, "sampling temperature; outputs are compared for equality only at 0")
    num_prompts: int = opt(100, "prompts taken from the start of --input")
    max_num_seqs: int = opt(1, "sequences decoded at once (offline) / requests in flight (server); 1 = latency")
    max_model_len: int | None = opt(None, "context length of the offline engines (default: the model's)")
    dtype: str = dtype_opt("auto", "compute dtype of the offline engines (fp32 on CPU: batch-invariant greedy "
                                   "output; bf16 outputs are equal only up to near-ties)")
    seed: int = opt(0, "engine seed; request i samples with seed + i")
    warmup_requests: int = opt(1, "untimed requests before each engine's timed passes (kernel set-up, caches)")
    repeats: int = opt(3, "timed passes over all prompts per engine; tok/s and speedup are medians with ranges")
    tie_check: bool = opt(True, "score each plain/speculative divergence with the fp32 target (transformers) "
                                "to tell near-ties from real mismatches")
    tie_check_device: str = opt("auto", "device of the tie check's target: auto (cuda if available), cpu, cuda")
    server: str = opt("", "URL of a running server WITH the draft: benchmark it instead of offline engines")
    baseline_server: str = opt("", "URL of a running server WITHOUT the draft (server mode baseline)")
    request_timeout_s: float = opt(600.0, "server mode: seconds before a request fails")
    compare_draft: str = opt("", "offline: a second exported draft (e.g. the untrained one) measured against the "
                                 "same plain run, so one plain engine serves both (~100 s less on 2 CPU cores)")
    compare_output: str = opt("", "RESULT.json of --compare-draft (written before --output)")

    def __post_init__(self) -> None:
        for name in ("target", "input", "output"):
            require(bool(getattr(self, name)), f"--{name.replace('_', '-')} is required")
        require(self.num_spec_tokens >= 1, f"--num-spec-tokens must be >= 1, got {self.num_spec_tokens}")
        require(self.max_new_tokens >= 1 and self.num_prompts >= 1 and self.max_num_seqs >= 1,
                "--max-new-tokens, --num-prompts and --max-num-seqs must be >= 1")
        require(self.repeats >= 1, f"--repeats must be >= 1, got {self.repeats}")
        require(self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}")
        require(not self.baseline_server or bool(self.server), "--baseline-server needs --server")
        require(not self.compare_draft or (bool(self.compare_output) and bool(self.draft) and not self.server),
                "--compare-draft needs --compare-output and --draft, and runs offline (no --server)")
        require(self.tie_check_device in ("auto", "cpu", "cuda") or self.tie_check_device.startswith("cuda:"),
                f"--tie-check-device must be auto, cpu or cuda[:N], got {self.tie_check_device!r}")


@dataclass
class EvalPrompt:
    id: str
    request: GenRequest
    reference: str | None
    reference_ids: list[int] | None = None  # stage 1's generated ids for this turn
    reference_finish: str | None = None


def build_prompts(cfg: BenchmarkConfig) -> tuple[list[EvalPrompt], list[Rejection]]:
    """The first ``num_prompts`` usable records as requests, and every record passed over on the
    way, each with its reason (unreadable line, bad audio, prompt + answer over the context)."""
    from modeling.targets import chat_tokenizer_for, target_context_length
    from pipeline.data.samples import load_record_audio

    chat = chat_tokenizer_for(cfg.target)
    limits = AudioLimits(max_seconds=chat.family.max_audio_seconds)
    context = cfg.max_model_len or target_context_length(cfg.target)
    source = open_source(cfg.input, cfg)
    rejected: list[Rejection] = []
    prompts: list[EvalPrompt] = []
    for rec in source.read():  # streamed: stops reading once num_prompts are usable
        if isinstance(rec, Rejection):
            rejected.append(rec)
            continue
        turns = rec.turns
        t = next((j for j, turn in enumerate(turns) if turn.role == "assistant"), len(turns))
        try:
            audios = load_record_audio(rec, limits)[: sum(len(turn.audio_paths) for turn in turns[:t])]
        except RecordError as err:
            rejected.append(rec.reject(err.field, err.reason))
            continue
        ids = chat.encode(turns, until_turn=t).input_ids.tolist()
        # vLLM expands each audio placeholder to the encoder's token count
        length = len(ids) + sum(chat.num_audio_tokens(a.shape[0]) - 1 for a in audios)
        if context and length + cfg.max_new_tokens > context:
            rejected.append(rec.reject("conversations", f"prompt of {length} tokens + --max-new-tokens "
                                       f"{cfg.max_new_tokens} is longer than the context ({context})"))
            continue
        sampling = Sampling(cfg.max_new_tokens, cfg.temperature, 1.0, cfg.seed + len(prompts))
        answer = turns[t] if t < len(turns) else None
        reference = answer.text if answer is not None and answer.text.strip() else None
        if reference is None and isinstance(rec.raw.get("reference"), str) and rec.raw["reference"].strip():
            reference = rec.raw["reference"]  # a pair dataset's text column
        prompts.append(EvalPrompt(rec.id, GenRequest(ids, audios, sampling, turns[:t]), reference,
                                  None if answer is None else answer.token_ids,
                                  None if answer is None else answer.extra.get("finish_reason")))
        if len(prompts) == cfg.num_prompts:
            break
    for rej in rejected:
        log.warning("skipped %s", rej.message())
    if not prompts:
        raise ValueError(f"{cfg.input}: no usable records ({len(rejected)} rejected)")
    return prompts, rejected


@dataclass
class RunResult:
    """One engine's timed passes: the outputs of the first, the wall time of each."""

    results: list[GenResult]
    wall_s: list[float]
    spec: SpecCounters | None = None
    dtype: str | None = None  # the engine's compute dtype (offline), None if unknown (server)
    repeats_equal: bool = True  # every timed pass produced the same ids

    def summary(self) -> dict[str, Any]:
        tokens = sum(len(r.token_ids) for r in self.results)
        rates = [tokens / w for w in self.wall_s]
        return {"requests": len(self.results), "errors": sum(r.error is not None for r in self.results),
                "output_tokens": tokens, "repeats": len(self.wall_s), "wall_s": statistics.median(self.wall_s),
                "wall_s_all": [round(w, 4) for w in self.wall_s],
                "output_tokens_per_s": statistics.median(rates),
                "output_tokens_per_s_range": [min(rates), max(rates)],
                "requests_per_s": len(self.results) / statistics.median(self.wall_s),
                "dtype": self.dtype, "repeat_outputs_equal": self.repeats_equal}


def _timed(engine: Generator, prompts: list[EvalPrompt], warmup: int, repeats: int,
           read_spec: Callable[[], SpecCounters | None]) -> RunResult:
    """Warm up, then time ``repeats`` passes over every prompt, reading the spec counters around them."""
    if warmup:
        engine.generate([dataclasses.replace(p.request, sampling=Sampling(min(16, p.request.sampling.max_tokens)))
                         for p in prompts[:warmup]])
    before = read_spec()
    passes, walls = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        passes.append(engine.generate([p.request for p in prompts]))
        walls.append(time.perf_counter() - start)
    after = read_spec()
    equal = all([r.token_ids for r in p] == [r.token_ids for r in passes[0]] for p in passes[1:])
    return RunResult(passes[0], walls, None if before is None or after is None else after - before,
                     repeats_equal=equal)


def check_vllm_draft(draft: str | Path) -> None:
    """Refuse a draft exported for SGLang: its aux layer ids are one lower than vLLM's."""
    info_path = Path(draft) / "export_info.json"
    if not (Path(draft) / "config.json").is_file():
        raise ValueError(f"{draft}: no config.json (export the draft with `python -m stages.export`)")
    if info_path.is_file() and json.loads(info_path.read_text()).get("engine") != "vllm":
        raise ValueError(f"{draft} was exported for SGLang (aux layer ids off by one for vLLM); "
                         "export it again with --engine vllm")


def run_offline(cfg: BenchmarkConfig, prompts: list[EvalPrompt], draft: str | None) -> RunResult:
    """One engine (with ``draft`` as EAGLE-3 draft, if given) over the prompts; freed afterwards."""
    from pipeline.engine.offline import OfflineGenerator, build_llm

    # stats on in both runs: the counters need them, and both runs then pay the same overhead;
    # no prefix cache: every timed pass then does the same work (a cache would make passes 2.. cheaper)
    extra: dict[str, Any] = {"max_num_seqs": cfg.max_num_seqs, "disable_log_stats": False,
                             "enable_prefix_caching": False}
    if draft:
        extra["speculative_config"] = {"method": "eagle3", "model": str(draft),
                                       "num_speculative_tokens": cfg.num_spec_tokens}
    llm = build_llm(cfg.target, max_model_len=cfg.max_model_len, dtype=cfg.dtype, seed=cfg.seed, **extra)
    engine = OfflineGenerator(llm)
    try:
        read = (lambda: SpecCounters.from_snapshot(llm.get_metrics())) if draft else (lambda: None)
        result = _timed(engine, prompts, cfg.warmup_requests, cfg.repeats, read)
        result.dtype = from_engine(str(llm.llm_engine.model_config.dtype))
        return result
    finally:
        engine.close()  # stops the engine process, which holds the weights and KV cache


def run_server(cfg: BenchmarkConfig, prompts: list[EvalPrompt], url: str, spec: bool) -> RunResult:
    from modeling.targets import family_of
    from pipeline.engine.server import ServerClient, ServerGenerator

    engine = ServerGenerator(ServerClient([url], timeout_s=cfg.request_timeout_s), family_of(cfg.target),
                             max_concurrency=cfg.max_num_seqs)
    return _timed(engine, prompts, cfg.warmup_requests, cfg.repeats,
                  (lambda: scrape_spec(url)) if spec else (lambda: None))


def run(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Run the benchmark, write RESULT.json and the outputs file; returns the report."""
    for draft in (cfg.draft, cfg.compare_draft) if not cfg.server else ():
        if draft:
            check_vllm_draft(draft)  # before minutes of plain decoding, not after
    with ResourceMeter() as meter:
        report = _run_engines(cfg, meter)
    return report


def _run_engines(cfg: BenchmarkConfig, meter: ResourceMeter) -> dict[str, Any]:
    from pipeline.data.samples import load_target_processor

    prompts, rejected = build_prompts(cfg)
    runs: dict[str, RunResult] = {}
    compared: RunResult | None = None
    if cfg.server:
        if cfg.baseline_server:
            runs["plain"] = run_server(cfg, prompts, cfg.baseline_server, spec=False)
        runs["speculative"] = run_server(cfg, prompts, cfg.server, spec=True)
    else:
        runs["plain"] = run_offline(cfg, prompts, None)
        gc.collect()  # drop the first engine's client objects before the second starts
        if cfg.draft:
            runs["speculative"] = run_offline(cfg, prompts, cfg.draft)
        if cfg.compare_draft:
            gc.collect()
            compared = run_offline(cfg, prompts, cfg.compare_draft)
    tokenizer = load_target_processor(cfg.target)[0]

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    reports = [build_report(cfg, prompts, runs, decode, rejected) + (cfg,)]
    if compared is not None:  # written first: --output, written last, means complete
        other = dataclasses.replace(cfg, draft=cfg.compare_draft, output=cfg.compare_output, compare_draft="",
                                    compare_output="")
        reports.insert(0, build_report(other, prompts, {"plain": runs["plain"], "speculative": compared}, decode,
                                       rejected) + (other,))
    # decode tokens/s over every timed pass of every engine; peaks over the whole stage (engines in-process)
    timed = [r.summary() for r in (*runs.values(), *([compared] if compared else []))]
    resources = meter.result(sum(s["output_tokens"] * s["repeats"] for s in timed),
                             wall_s=sum(sum(s["wall_s_all"]) for s in timed))
    for report, rows, config in reports:
        _write(config, report, rows, resources)
    return reports[-1][0]


def _write(cfg: BenchmarkConfig, report: dict[str, Any], rows: list[dict[str, Any]],
           resources: dict[str, Any]) -> dict[str, Any]:
    """RESULT.json (atomically, last) and RESULT.outputs.jsonl beside it."""
    report["resources"] = resources
    out = Path(cfg.output)
    outputs_path = out.with_name(out.stem + ".outputs.jsonl")
    report["outputs_file"] = str(outputs_path)
    atomic_write_text(outputs_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_json(out, report)
    return report


def _run_and_print(cfg: BenchmarkConfig) -> int:
    report = run(cfg)
    if cfg.compare_draft:
        print(f"{cfg.compare_draft}:\n{format_table(json.loads(Path(cfg.compare_output).read_text()))}\n\n{cfg.draft}:")
    print(format_table(report))
    return 0


def is_complete(output: str | Path) -> bool:
    """The result file exists (written atomically, last)."""
    return Path(output).is_file()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit statuses as in :mod:`pipeline.core.cli`."""
    return stage_main("python -m stages.benchmark", BenchmarkConfig, "benchmark",
                      "Benchmark an EAGLE-3 draft against the plain target (vLLM).", argv, _run_and_print,
                      input_errors=(ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
