"""Measure an exported EAGLE-3 draft: acceptance, speed-up and output equality against the plain target.

    python -m stages.benchmark --target DIR --draft DRAFT_DIR --input EVAL.jsonl --output RESULT.json \\
        [--num-spec-tokens 4 --max-new-tokens 256 --temperature 0 --num-prompts 100 --max-num-seqs 1]
    python -m stages.benchmark --target DIR --input EVAL.jsonl --output RESULT.json \\
        --server http://HOST:8000 [--baseline-server http://HOST:8001]

Each eval record gives one prompt: the conversation up to its first assistant turn (audio +
instruction), built as token ids by :class:`pipeline.template.ChatTokenizer` exactly as stage 1
does; that assistant turn's text, when present, is the reference for WER. Offline mode runs the
target alone, frees it, then runs it with the draft (two engines never share the host memory),
each after one warm-up request. Acceptance comes from vLLM's spec-decode counters, read before and
after the timed run (``LLM.get_metrics()`` offline, the server's Prometheus ``/metrics`` online):
mean acceptance length = 1 + accepted / drafts, per-position rate = accepted_at_pos / drafts.

Writes RESULT.json (see the README, "Export, serve and benchmark"), ``RESULT.outputs.jsonl`` (per prompt:
both runs' token ids and texts) and prints a table.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import re
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.audio import AudioLimits
from pipeline.cli import stage_main
from pipeline.config import opt, require
from pipeline.data import RecordError, Rejection, read_conversations
from pipeline.durable import atomic_write_json, atomic_write_text
from pipeline.engine import Generator, GenRequest, GenResult, Sampling

log = logging.getLogger("stages.benchmark")
SPEC_PREFIX = "vllm:spec_decode_"


@dataclass(kw_only=True)
class BenchmarkConfig:
    """Options of the benchmark (``benchmark:`` section of a pipeline YAML)."""

    target: str = opt("", "target model directory (its tokenizer builds the prompts in every mode)")
    draft: str = opt("", "exported draft directory (stages.export --engine vllm); empty: plain run only")
    input: str = opt("", "eval conversation jsonl; the first assistant turn of each record is the reference")
    output: str = opt("", "RESULT.json path (RESULT.outputs.jsonl is written next to it)")
    num_spec_tokens: int = opt(4, "draft tokens proposed per step (k)")
    max_new_tokens: int = opt(256, "generated tokens per prompt at most")
    temperature: float = opt(0.0, "sampling temperature; outputs are compared for equality only at 0")
    num_prompts: int = opt(100, "prompts taken from the start of --input")
    max_num_seqs: int = opt(1, "sequences decoded at once (offline) / requests in flight (server); 1 = latency")
    max_model_len: int | None = opt(None, "context length of the offline engines (default: the model's)")
    dtype: str = opt("auto", "weight dtype of the offline engines")
    seed: int = opt(0, "engine seed; request i samples with seed + i")
    warmup_requests: int = opt(1, "untimed requests before each timed run (kernel set-up, caches)")
    server: str = opt("", "URL of a running server WITH the draft: benchmark it instead of offline engines")
    baseline_server: str = opt("", "URL of a running server WITHOUT the draft (server mode baseline)")
    request_timeout_s: float = opt(600.0, "server mode: seconds before a request fails")

    def __post_init__(self) -> None:
        for name in ("target", "input", "output"):
            require(bool(getattr(self, name)), f"--{name.replace('_', '-')} is required")
        require(self.num_spec_tokens >= 1, f"--num-spec-tokens must be >= 1, got {self.num_spec_tokens}")
        require(self.max_new_tokens >= 1 and self.num_prompts >= 1 and self.max_num_seqs >= 1,
                "--max-new-tokens, --num-prompts and --max-num-seqs must be >= 1")
        require(self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}")
        require(not self.baseline_server or bool(self.server), "--baseline-server needs --server")


@dataclass
class EvalPrompt:
    id: str
    request: GenRequest
    reference: str | None


def build_prompts(cfg: BenchmarkConfig) -> tuple[list[EvalPrompt], list[Rejection]]:
    """The first ``num_prompts`` usable records as requests, and every record passed over on the
    way, each with its reason (unreadable line, bad audio, prompt + answer over the context)."""
    from pipeline.samples import load_record_audio, load_target_processor, target_context_length
    from pipeline.template import ChatTokenizer, num_audio_tokens

    chat = ChatTokenizer(load_target_processor(cfg.target)[0])
    context = cfg.max_model_len or target_context_length(cfg.target)
    read = read_conversations(cfg.input, require_assistant=False)
    rejected: list[Rejection] = []
    prompts: list[EvalPrompt] = []
    stop = read.total  # input records from here on were not needed
    for rec in read.records:
        turns = rec.turns
        t = next((j for j, turn in enumerate(turns) if turn.role == "assistant"), len(turns))
        try:
            audios = load_record_audio(rec, AudioLimits())[: sum(len(turn.audio_paths) for turn in turns[:t])]
        except RecordError as err:
            rejected.append(rec.reject(err.field, err.reason))
            continue
        ids = chat.encode(turns, until_turn=t).input_ids.tolist()
        # vLLM expands each <|AUDIO|> placeholder to the encoder's token count
        length = len(ids) + sum(num_audio_tokens(a.shape[0]) - 1 for a in audios)
        if context and length + cfg.max_new_tokens > context:
            rejected.append(rec.reject("conversations", f"prompt of {length} tokens + --max-new-tokens "
                                       f"{cfg.max_new_tokens} is longer than the context ({context})"))
            continue
        sampling = Sampling(cfg.max_new_tokens, cfg.temperature, 1.0, cfg.seed + len(prompts))
        reference = turns[t].text if t < len(turns) and turns[t].text.strip() else None
        prompts.append(EvalPrompt(rec.id, GenRequest(ids, audios, sampling, turns[:t]), reference))
        if len(prompts) == cfg.num_prompts:
            stop = rec.index + 1
            break
    rejected = sorted(rejected + [r for r in read.rejected if r.index < stop], key=lambda r: r.index)
    for rej in rejected:
        log.warning("skipped %s", rej.message())
    if not prompts:
        raise ValueError(f"{cfg.input}: no usable records ({len(rejected)} rejected)")
    return prompts, rejected


@dataclass
class SpecCounters:
    """vLLM's cumulative spec-decode counters (summed over engines/labels)."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted: int = 0
    accepted_per_pos: list[int] = dataclasses.field(default_factory=list)

    def __sub__(self, before: SpecCounters) -> SpecCounters:
        pos = [a - (before.accepted_per_pos[i] if i < len(before.accepted_per_pos) else 0)
               for i, a in enumerate(self.accepted_per_pos)]
        return SpecCounters(self.drafts - before.drafts, self.draft_tokens - before.draft_tokens,
                            self.accepted - before.accepted, pos)

    def _add(self, name: str, value: float, position: str | None) -> None:
        key = name.removeprefix(SPEC_PREFIX).removesuffix("_total")
        if key == "num_accepted_tokens_per_pos" and position is not None:
            i = int(position)
            self.accepted_per_pos += [0] * (i + 1 - len(self.accepted_per_pos))
            self.accepted_per_pos[i] += int(value)
        elif key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            field = {"num_drafts": "drafts", "num_draft_tokens": "draft_tokens", "num_accepted_tokens": "accepted"}[key]
            setattr(self, field, getattr(self, field) + int(value))

    @classmethod
    def from_snapshot(cls, metrics: list[Any]) -> SpecCounters:
        """From ``LLM.get_metrics()`` (Counter / Vector objects)."""
        out = cls()
        for m in metrics:
            if not m.name.startswith(SPEC_PREFIX):
                continue
            if hasattr(m, "values"):  # the per-position Vector
                for i, v in enumerate(m.values):
                    out._add(m.name, v, str(i))
            elif hasattr(m, "value"):
                out._add(m.name, m.value, None)
        return out

    @classmethod
    def from_prometheus(cls, text: str) -> SpecCounters:
        """From a server's ``/metrics`` page."""
        from prometheus_client.parser import text_string_to_metric_families

        out = cls()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith(SPEC_PREFIX) and s.name.endswith("_total"):
                    out._add(s.name, s.value, s.labels.get("position"))
        return out

    def summary(self, k: int) -> dict[str, Any]:
        drafts = max(self.drafts, 1)
        pos = (self.accepted_per_pos + [0] * k)[:k]
        return {"mean_acceptance_length": 1 + self.accepted / drafts if self.drafts else None,
                "per_position_acceptance_rate": [p / drafts for p in pos] if self.drafts else None,
                "draft_acceptance_rate": self.accepted / self.draft_tokens if self.draft_tokens else None,
                "num_drafts": self.drafts, "num_draft_tokens": self.draft_tokens, "num_accepted_tokens": self.accepted}


@dataclass
class RunResult:
    results: list[GenResult]
    wall_s: float
    spec: SpecCounters | None = None

    def summary(self) -> dict[str, Any]:
        tokens = sum(len(r.token_ids) for r in self.results)
        return {"requests": len(self.results), "errors": sum(r.error is not None for r in self.results),
                "output_tokens": tokens, "wall_s": self.wall_s, "output_tokens_per_s": tokens / self.wall_s,
                "requests_per_s": len(self.results) / self.wall_s}


def _timed(engine: Generator, prompts: list[EvalPrompt], warmup: int,
           read_spec: Callable[[], SpecCounters | None]) -> RunResult:
    """Warm up, then time one pass over every prompt, reading the spec counters around it."""
    if warmup:
        engine.generate([dataclasses.replace(p.request, sampling=Sampling(min(16, p.request.sampling.max_tokens)))
                         for p in prompts[:warmup]])
    before = read_spec()
    start = time.perf_counter()
    results = engine.generate([p.request for p in prompts])
    wall = time.perf_counter() - start
    after = read_spec()
    return RunResult(results, wall, None if before is None else after - before)


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
    from pipeline.engine import OfflineGenerator, build_llm

    # stats on in both runs: the counters need them, and both runs then pay the same overhead
    extra: dict[str, Any] = {"max_num_seqs": cfg.max_num_seqs, "disable_log_stats": False}
    if draft:
        extra["speculative_config"] = {"method": "eagle3", "model": str(draft),
                                       "num_speculative_tokens": cfg.num_spec_tokens}
    llm = build_llm(cfg.target, max_model_len=cfg.max_model_len, dtype=cfg.dtype, seed=cfg.seed, **extra)
    engine = OfflineGenerator(llm)
    try:
        read = (lambda: SpecCounters.from_snapshot(llm.get_metrics())) if draft else (lambda: None)
        return _timed(engine, prompts, cfg.warmup_requests, read)
    finally:
        engine.close()  # stops the engine process, which holds the weights and KV cache


def scrape_spec(url: str, timeout_s: float = 30.0) -> SpecCounters:
    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout_s) as resp:
        return SpecCounters.from_prometheus(resp.read().decode("utf-8"))


def run_server(cfg: BenchmarkConfig, prompts: list[EvalPrompt], url: str, spec: bool) -> RunResult:
    from pipeline.server_client import ServerClient, ServerGenerator

    engine = ServerGenerator(ServerClient([url], timeout_s=cfg.request_timeout_s), max_concurrency=cfg.max_num_seqs)
    return _timed(engine, prompts, cfg.warmup_requests, (lambda: scrape_spec(url)) if spec else (lambda: None))


def normalize_text(text: str) -> str:
    """Lower case, punctuation removed, single spaces: the usual ASR scoring normalisation."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def word_error_rate(prompts: list[EvalPrompt], texts: list[str]) -> float | None:
    """Corpus WER over prompts with a non-empty reference; None when there are none."""
    import jiwer

    pairs = [(normalize_text(p.reference), normalize_text(t)) for p, t in zip(prompts, texts, strict=True)
             if p.reference and normalize_text(p.reference)]
    return float(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs])) if pairs else None


def build_report(cfg: BenchmarkConfig, prompts: list[EvalPrompt], runs: dict[str, RunResult],
                 decode: Callable[[list[int]], str],
                 rejected: list[Rejection]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """RESULT.json contents and the per-prompt output rows."""
    report: dict[str, Any] = {"config": dataclasses.asdict(cfg), "mode": "server" if cfg.server else "offline",
                              "num_prompts": len(prompts), "rejected_records": len(rejected),
                              "rejected": [r.to_dict() for r in rejected], "device": _device()}
    texts = {name: [decode(r.token_ids) for r in run.results] for name, run in runs.items()}
    for name in ("plain", "speculative"):
        run = runs.get(name)
        report[name] = None if run is None else {**run.summary(), "wer": word_error_rate(prompts, texts[name])}
    spec = runs.get("speculative")
    report["acceptance"] = None if spec is None or spec.spec is None else spec.spec.summary(cfg.num_spec_tokens)
    both = report["plain"] is not None and report["speculative"] is not None
    report["speedup"] = (report["speculative"]["output_tokens_per_s"] / report["plain"]["output_tokens_per_s"]
                         if both else None)
    rows, mismatched = [], []
    for i, p in enumerate(prompts):
        row: dict[str, Any] = {"id": p.id, "reference": p.reference}
        for name, run in runs.items():
            r = run.results[i]  # prompt_tokens: as the engine counted them (audio expanded)
            row[name] = {"token_ids": r.token_ids, "text": texts[name][i], "prompt_tokens": r.prompt_tokens,
                         "error": r.error}
        pair = [runs["plain"].results[i], spec.results[i]] if both else []  # type: ignore[union-attr]
        if pair and all(r.error is None for r in pair) and pair[0].token_ids != pair[1].token_ids:
            mismatched.append(p.id)  # failed requests count as errors, not as mismatches
        rows.append(row)
    report["outputs_equal"] = (not mismatched) if both else None
    report["num_mismatched"] = len(mismatched) if both else None
    report["mismatched_ids"] = mismatched[:20]
    if both and cfg.temperature > 0:
        report["outputs_equal_note"] = "temperature > 0: sampled outputs are not expected to be equal"
    if cfg.draft:
        info = Path(cfg.draft) / "export_info.json"
        report["draft_export_info"] = json.loads(info.read_text()) if info.is_file() else None
    return report, rows


def _device() -> dict[str, Any]:
    import os
    import platform

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"gpu": gpu, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec) if isinstance(value, float) else str(value)


def format_table(report: dict[str, Any]) -> str:
    """The human-readable summary printed at the end."""
    lines = [f"{'':24}{'plain':>12}{'eagle3':>12}"]
    for key, label in (("requests", "requests"), ("output_tokens", "output tokens"), ("wall_s", "wall time (s)"),
                       ("output_tokens_per_s", "output tokens/s"), ("requests_per_s", "requests/s"),
                       ("wer", "WER"), ("errors", "errors")):
        cells = [_fmt((report.get(n) or {}).get(key)) for n in ("plain", "speculative")]
        lines.append(f"{label:24}{cells[0]:>12}{cells[1]:>12}")
    acc = report.get("acceptance") or {}
    k = report["config"]["num_spec_tokens"]
    lines.append(f"{'speedup':24}{_fmt(report.get('speedup')) + 'x':>24}")
    lines.append(f"{'mean acceptance length':24}{_fmt(acc.get('mean_acceptance_length')):>24}  (k={k})")
    rates = acc.get("per_position_acceptance_rate")
    lines.append(f"{'per-position acceptance':24}{' '.join(f'{r:.3f}' for r in rates) if rates else '-':>24}")
    equal = report.get("outputs_equal")
    verdict = "-" if equal is None else f"{'yes' if equal else 'NO'} ({report['num_mismatched']}/{report['num_prompts']} differ)"
    lines.append(f"{'outputs equal':24}{verdict:>24}")
    return "\n".join(lines)


def run(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Run the benchmark, write RESULT.json and the outputs file; returns the report."""
    from pipeline.samples import load_target_processor

    if cfg.draft and not cfg.server:
        check_vllm_draft(cfg.draft)  # before minutes of plain decoding, not after
    prompts, rejected = build_prompts(cfg)
    runs: dict[str, RunResult] = {}
    if cfg.server:
        if cfg.baseline_server:
            runs["plain"] = run_server(cfg, prompts, cfg.baseline_server, spec=False)
        runs["speculative"] = run_server(cfg, prompts, cfg.server, spec=True)
    else:
        runs["plain"] = run_offline(cfg, prompts, None)
        gc.collect()  # drop the first engine's client objects before the second starts
        if cfg.draft:
            runs["speculative"] = run_offline(cfg, prompts, cfg.draft)
    tokenizer = load_target_processor(cfg.target)[0]
    report, rows = build_report(cfg, prompts, runs, lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                                rejected)
    out = Path(cfg.output)
    outputs_path = out.with_name(out.stem + ".outputs.jsonl")
    report["outputs_file"] = str(outputs_path)
    atomic_write_text(outputs_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_json(out, report)
    return report


def _run_and_print(cfg: BenchmarkConfig) -> int:
    print(format_table(run(cfg)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit statuses as in :mod:`pipeline.cli`."""
    return stage_main("python -m stages.benchmark", BenchmarkConfig, "benchmark",
                      "Benchmark an EAGLE-3 draft against the plain target (vLLM).", argv, _run_and_print,
                      input_errors=(ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
