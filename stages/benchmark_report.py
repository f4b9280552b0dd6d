"""The benchmark's RESULT.json and its printed table: speed, acceptance, losslessness, reproduction.

- Speed: median tokens/s of the timed passes with their range; speedup = ratio of the medians,
  its range the extreme ratios (slowest speculative pass / fastest plain pass, and the reverse).
- Lossless check (temperature 0): ``equal``; ``equal up to numerical ties`` when every prompt
  whose outputs differ parts at a near-tie of the fp32 target (:mod:`modeling.target_io.tie_check`); or
  ``NO: n real mismatches``.
- Reproduction: when the eval records carry stage 1's ``token_ids``, the share of prompts whose
  plain output equals them (a draft learns the answers stage 1 wrote; it can only be accepted
  where the served target still says them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.data.records import Rejection
from pipeline.data.wer import corpus_wer

# stages.benchmark's BenchmarkConfig, EvalPrompt and RunResult, read by attribute: stages.benchmark imports
# this module, so importing them back would close a circle
BenchmarkConfig = EvalPrompt = RunResult = Any

def word_error_rate(prompts: list[EvalPrompt], texts: list[str]) -> float | None:
    """Corpus WER over prompts with a non-empty reference; None when there are none."""
    pairs = [(p.reference, t) for p, t in zip(prompts, texts, strict=True) if p.reference]
    return corpus_wer([r for r, _ in pairs], [h for _, h in pairs])


def speedup(plain: RunResult, spec: RunResult) -> tuple[float, list[float]]:
    """Ratio of median tokens/s, and [worst, best] ratio over the passes."""
    p, s = plain.summary(), spec.summary()
    (p_lo, p_hi), (s_lo, s_hi) = p["output_tokens_per_s_range"], s["output_tokens_per_s_range"]
    return s["output_tokens_per_s"] / p["output_tokens_per_s"], [s_lo / p_hi, s_hi / p_lo]


def lossless_check(cfg: BenchmarkConfig, prompts: list[EvalPrompt], plain: RunResult,
                   spec: RunResult) -> dict[str, Any]:
    """Exact equality per prompt; divergences scored as near-tie or real mismatch."""
    from modeling.target_io.tie_check import DivergenceCase

    cases = [DivergenceCase(p.id, p.request.prompt_ids, p.request.audios, a.token_ids, b.token_ids)
             for p, a, b in zip(prompts, plain.results, spec.results, strict=True)
             if a.error is None and b.error is None and a.token_ids != b.token_ids]  # errors are not mismatches
    out: dict[str, Any] = {"outputs_equal": not cases, "num_mismatched": len(cases),
                           "mismatched_ids": [c.id for c in cases][:20], "num_numerical_ties": None,
                           "num_real_mismatches": None, "divergences": [], "engine_dtype": spec.dtype or plain.dtype}
    if cfg.temperature > 0:
        out["outputs_equal_note"] = "temperature > 0: sampled outputs are not expected to be equal"
        out["lossless_verdict"] = "not checked (temperature > 0)"
        return out
    if cases and cfg.tie_check:
        import torch

        from modeling.target_io.tie_check import TieChecker

        device = cfg.tie_check_device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        checker = TieChecker(cfg.target, device)
        try:
            scored = checker.score(cases, out["engine_dtype"] or "bf16")
        finally:
            checker.close()
        out["divergences"] = [d.to_dict() for d in scored]
        out["num_numerical_ties"] = sum(d.numerical_tie for d in scored)
        out["num_real_mismatches"] = len(scored) - out["num_numerical_ties"]
    elif not cases:
        out["num_numerical_ties"] = out["num_real_mismatches"] = 0
    n, total = len(cases), len(prompts)
    if not cases:
        verdict = "equal"
    elif out["num_real_mismatches"] is None:
        verdict = f"NO ({n}/{total} differ; tie check off)"
    elif out["num_real_mismatches"] == 0:
        verdict = f"equal up to numerical ties ({n}/{total} diverge at near-ties)"
    else:
        verdict = f"NO: {out['num_real_mismatches']} real mismatches ({n}/{total} differ)"
    out["lossless_verdict"] = verdict
    return out


def _same_answer(ref: list[int], ref_finish: str | None, got: list[int], got_finish: str | None) -> bool:
    """Equal ids, or equal up to where the shorter one was cut by a token limit."""
    m = min(len(ref), len(got))
    if ref[:m] != got[:m]:
        return False
    if len(ref) == len(got):
        return True
    return (ref_finish if len(ref) < len(got) else got_finish) == "length"


def reproduction(prompts: list[EvalPrompt], run: RunResult) -> dict[str, Any] | None:
    """How many prompts the served target answers exactly as stage 1 did (None: no stage 1 ids)."""
    pairs = [(p, r) for p, r in zip(prompts, run.results, strict=True)
             if p.reference_ids is not None and r.error is None]
    if not pairs:
        return None
    differ = [p.id for p, r in pairs
              if not _same_answer(p.reference_ids or [], p.reference_finish, r.token_ids, r.finish_reason)]
    return {"compared": len(pairs), "equal": len(pairs) - len(differ),
            "fraction": (len(pairs) - len(differ)) / len(pairs), "differing_ids": differ[:20]}


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
    plain, spec = runs.get("plain"), runs.get("speculative")
    report["acceptance"] = None if spec is None or spec.spec is None else spec.spec.summary(cfg.num_spec_tokens)
    report["speedup"], report["speedup_range"] = speedup(plain, spec) if plain and spec else (None, None)
    keys = ("outputs_equal", "num_mismatched", "mismatched_ids", "num_numerical_ties", "num_real_mismatches",
            "divergences", "lossless_verdict")
    report.update(lossless_check(cfg, prompts, plain, spec) if plain and spec else dict.fromkeys(keys))
    report["reference_reproduced"] = reproduction(prompts, plain or spec) if (plain or spec) else None
    rows = []
    for i, p in enumerate(prompts):
        row: dict[str, Any] = {"id": p.id, "reference": p.reference}
        for name, run in runs.items():
            r = run.results[i]  # prompt_tokens: as the engine counted them (audio expanded)
            row[name] = {"token_ids": r.token_ids, "text": texts[name][i], "prompt_tokens": r.prompt_tokens,
                         "error": r.error}
        rows.append(row)
    if cfg.draft:
        info = Path(cfg.draft) / "export_info.json"
        report["draft_export_info"] = json.loads(info.read_text()) if info.is_file() else None
    return report, rows


def _device() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        pass
    return {"gpu": gpu, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "cpu_native_bf16": any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))}


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec) if isinstance(value, float) else str(value)


def _with_range(value: float | None, span: list[float] | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" + (f" [{span[0]:.2f}-{span[1]:.2f}]" if span else "")


def format_table(report: dict[str, Any]) -> str:
    """The human-readable summary printed at the end."""
    plain, spec = report.get("plain") or {}, report.get("speculative") or {}
    w = 25  # "156.77 [128.35-161.81]" fits with room
    lines = [f"{'':24}{'plain':>{w}}{'eagle3':>{w}}"]
    for key, label in (("requests", "requests"), ("output_tokens", "output tokens"), ("repeats", "timed passes"),
                       ("wall_s", "wall time (s), median"), ("requests_per_s", "requests/s, median"),
                       ("wer", "WER"), ("errors", "errors"), ("dtype", "engine dtype")):
        lines.append(f"{label:24}{_fmt(plain.get(key)):>{w}}{_fmt(spec.get(key)):>{w}}")
    cells = [_with_range(r.get("output_tokens_per_s"), r.get("output_tokens_per_s_range")) for r in (plain, spec)]
    lines.append(f"{'output tokens/s [range]':24}{cells[0]:>{w}}{cells[1]:>{w}}")
    acc = report.get("acceptance") or {}
    k = report["config"]["num_spec_tokens"]
    speed = _with_range(report.get("speedup"), report.get("speedup_range"))
    lines.append(f"{'speedup [range]':24}{(speed + 'x') if report.get('speedup') else '-':>{2 * w}}")
    lines.append(f"{'mean acceptance length':24}{_fmt(acc.get('mean_acceptance_length')):>{2 * w}}  (k={k})")
    rates = acc.get("per_position_acceptance_rate")
    lines.append(f"{'per-position acceptance':24}{' '.join(f'{r:.3f}' for r in rates) if rates else '-':>{2 * w}}")
    lines.append(f"{'lossless':24}{report.get('lossless_verdict') or '-':>{2 * w}}")
    repro = report.get("reference_reproduced")
    if repro:
        text = f"{repro['equal']}/{repro['compared']} ({repro['fraction']:.0%})"
        lines.append(f"{'stage-1 answers repeated':24}{text:>{2 * w}}")
    return "\n".join(lines)
