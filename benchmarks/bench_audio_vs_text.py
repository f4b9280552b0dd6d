"""Audio-trained vs text-trained EAGLE-3 drafts on the SmolLM2 audio target (docs/audio-vs-text.md).

    python -m benchmarks.bench_audio_vs_text --workdir work/bench-audio-vs-text [--records 240]
        [--max-new-tokens 64 --train-steps 100 --seeds 0 1 --eval-prompts 12 --repeats 2]
        [--spoken-regen work/demo/regenerated]

Five drafts (``--no-hearing``: four), each trained with the same number of answer tokens, the same steps and seed:

| condition | training conversations (stage 1 regenerates every answer with the target) |
|---|---|
| ``audio`` | spoken prompts of the prompt generator's ``train`` split (what this pipeline is for) |
| ``text`` | the same prompts' words, typed |
| ``chat`` | general text chat (:mod:`modeling.smol_audio.chat_prompts`: what a text-only trainer gives) |
| ``mix`` | half the ``audio`` answer tokens, half the ``chat`` ones |
| ``audio-hearing`` | the ``audio`` store, the draft fed the target's audio embeddings (not the placeholder's) |

Each is exported and served by vLLM on held-out prompts (the ``eval`` split: prompts no draft and not
the target's encoder heard), spoken and typed: acceptance length, per-position rates, speed-up over one
plain run of the same prompts (median of ``--repeats`` passes, with range). Training cost per
condition: stage 1 and 2 wall time, store bytes per answer token, training tokens/s and the peak
resident memory of each stage's process tree (sampled at 2 Hz: vLLM's engine core and DeepSpeed's
ranks are child processes). Every step skips what a complete earlier run left (rerun to resume).
Writes ``WORKDIR/result.json`` and prints the table. The numbers describe this toy-sized target
(docs/smol-audio-target.md), not a 7B one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from stages import dump, export, regenerate, train

CONDITIONS = ("audio", "text", "chat", "mix")
# the audio condition's store again, the draft fed the target's audio embeddings at audio positions
# instead of the placeholder token's (served by the plugin's hearing draft class; docs/stage-train.md)
HEARING = "audio-hearing"
EVAL_SETS = ("spoken", "text")
# the demo's stage 1-3 settings (configs/demo.yaml): fp32 for batch-invariant greedy answers on CPU
REGEN = ["--max-new-tokens", "{max_new}", "--batch-size", "32", "--max-model-len", "1024", "--dtype", "fp32"]
DUMP = ["--batch-tokens", "4096", "--max-length", "1024", "--dtype", "fp32", "--device", "cpu"]
TRAIN = ["--nproc", "2", "--zero-stage", "2", "--precision", "fp32", "--epochs", "1000", "--lr", "0.002",
         "--warmup-ratio", "0.05", "--batch-tokens", "1024", "--draft-vocab-size", "4096", "--init-head", "target",
         "--eval-fraction", "0", "--log-every", "20", "--num-workers", "0"]


def run_measured(cmd: list[str], log_path: Path) -> dict[str, float]:
    """Run ``cmd`` (output to ``log_path``): wall seconds, CPU seconds (user + system of the whole reaped
    process tree: unlike wall time, not inflated when another job shares the cores) and the peak summed
    RSS of its process tree."""
    peak = 0
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log_path.open("w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            root = psutil.Process(proc.pid)
            while not done.wait(0.5):
                try:
                    procs = [root, *root.children(recursive=True)]
                    peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
                except psutil.Error:
                    pass

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        done.set()
        sampler.join()
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}); see {log_path}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": time.perf_counter() - start, "cpu_s": cpu_s, "peak_rss_bytes": peak}


def py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def stage1_rows(regen_dir: Path) -> list[dict[str, Any]]:
    """Stage 1's regenerated records, in input order."""
    rows = [json.loads(line) for f in sorted(regen_dir.glob("shard-*.jsonl")) for line in f.read_text().splitlines()]
    return sorted(rows, key=lambda r: r["source_index"])


def answer_tokens(row: dict[str, Any]) -> int:
    return sum(len(t.get("token_ids") or []) for t in row["conversations"] if t["role"] == "assistant")


def take_tokens(rows: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """The first records whose answers hold ``budget`` tokens (the last one may overshoot by < one answer)."""
    out, total = [], 0
    for row in rows:
        if total >= budget:
            break
        out.append(row)
        total += answer_tokens(row)
    return out


def selections(regen: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    """Each condition's training records, with equal answer-token totals (the smallest condition's)."""
    rows = {name: stage1_rows(path) for name, path in regen.items()}
    budget = min(sum(map(answer_tokens, r)) for r in rows.values())
    chosen = {name: take_tokens(r, budget) for name, r in rows.items()}
    chosen["mix"] = take_tokens(rows["audio"], budget // 2) + take_tokens(rows["chat"], budget // 2)
    return chosen


def write_selection(rows: list[dict[str, Any]], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "data.jsonl"
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def store_bytes(store: Path) -> int:
    return sum(f.stat().st_size for f in (store / "shards").rglob("*") if f.is_file())


def train_tokens_per_s(run: Path) -> float | None:
    rates = [r["tokens_per_s"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r.get("split") == "train" and r.get("tokens_per_s")]
    return statistics.median(rates) if rates else None


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args, self.root = args, Path(args.workdir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs = self.root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.cost_path = self.root / "costs.json"
        self.costs: dict[str, Any] = json.loads(self.cost_path.read_text()) if self.cost_path.is_file() else {}

    def measured(self, key: str, cmd: list[str], complete: bool) -> None:
        """Run a step unless the stage says its output is complete; its cost is kept across reruns."""
        if complete and key in self.costs:
            return
        print(f"[bench] {key}: {' '.join(cmd[2:5])} ...", flush=True)
        self.costs[key] = run_measured(cmd, self.logs / f"{key}.log")
        self.cost_path.write_text(json.dumps(self.costs, indent=1))

    def datasets(self) -> dict[str, Path]:
        from modeling.smol_audio.dataset import ensure_dataset

        a = self.args
        data = {}
        for name, kind in (("audio", "spoken"), ("text", "text"), ("chat", "chat")):
            data[name] = ensure_dataset(self.root / f"data-{name}", "train", a.records, 0, kind=kind) / "data.jsonl"
        for name, kind in (("eval-spoken", "spoken"), ("eval-text", "text")):
            data[name] = ensure_dataset(self.root / f"data-{name}", "eval", a.eval_prompts, 0, kind=kind) / "data.jsonl"
        return data

    def regenerate(self, data: dict[str, Path]) -> dict[str, Path]:
        a, out = self.args, {}
        for name in ("audio", "text", "chat"):
            if name == "audio" and a.spoken_regen:
                out[name] = Path(a.spoken_regen)
                continue
            out[name] = self.root / f"regen-{name}"
            cmd = py("stages.regenerate", "--target", a.target, "--input", str(data[name]), "--output", str(out[name]),
                     *[x.format(max_new=a.max_new_tokens) for x in REGEN])
            self.measured(f"stage1-{name}", cmd, regenerate.is_complete(out[name]))
        return out

    def dump(self, name: str, selection: Path) -> Path:
        store = self.root / f"store-{name}"
        cmd = py("stages.dump", "--target", self.args.target, "--input", str(selection), "--store", str(store), *DUMP)
        self.measured(f"stage2-{name}", cmd, dump.is_complete(store))
        return store

    def train_and_export(self, name: str, store: Path, seed: int) -> Path:
        a = self.args
        run, draft = self.root / f"run-{name}-seed{seed}", self.root / f"draft-{name}-seed{seed}"
        audio_input = "encoder" if name == HEARING else "placeholder"
        cmd = py("stages.train", "--store", str(store), "--target", a.target, "--output", str(run), *TRAIN,
                 "--max-steps", str(a.train_steps), "--save-every", str(a.train_steps), "--seed", str(seed),
                 "--draft-audio-input", audio_input)
        self.measured(f"train-{name}-seed{seed}", cmd, train.is_complete(run))
        self.measured(f"export-{name}-seed{seed}", py("stages.export", "--run", str(run), "--output", str(draft)),
                      export.is_complete(draft))
        self.costs[f"train-{name}-seed{seed}"]["tokens_per_s"] = train_tokens_per_s(run)
        return draft

    def serve(self, drafts: dict[str, Path], data: dict[str, Path]) -> dict[str, Any]:
        """One plain engine and one engine per draft over each held-out set, one at a time."""
        from stages.benchmark import BenchmarkConfig, build_prompts, run_offline
        from stages.benchmark_report import build_report

        a, results = self.args, {}
        for eval_set in EVAL_SETS:
            path = self.root / f"served-{eval_set}.json"
            done = json.loads(path.read_text()) if path.is_file() else {}
            cfg = BenchmarkConfig(target=a.target, input=str(data[f"eval-{eval_set}"]), output=str(path),
                                  num_spec_tokens=a.k, max_new_tokens=a.max_new_tokens, num_prompts=a.eval_prompts,
                                  max_model_len=1024, dtype="fp32", repeats=a.repeats, tie_check=False)
            prompts, _ = build_prompts(cfg)
            plain = None
            for name, draft in drafts.items():
                if name in done:
                    continue
                if plain is None:
                    print(f"[bench] serve {eval_set}: plain", flush=True)
                    plain = run_offline(cfg, prompts, None)
                print(f"[bench] serve {eval_set}: {name}", flush=True)
                spec = run_offline(cfg, prompts, str(draft))
                report, _ = build_report(cfg, prompts, {"plain": plain, "speculative": spec}, str, [])
                done[name] = {k: report[k] for k in ("acceptance", "speedup", "speedup_range", "outputs_equal")}
                done[name]["plain_tokens_per_s"] = report["plain"]["output_tokens_per_s"]
                path.write_text(json.dumps(done, indent=1))
            results[eval_set] = done
        return results

    def run(self) -> dict[str, Any]:
        from modeling.smol_audio.build import build

        a = self.args
        build(a.target)
        data = self.datasets()
        regen = self.regenerate(data)
        chosen = selections(regen)
        regenerated = {n: sum(map(answer_tokens, stage1_rows(path))) for n, path in regen.items()}
        drafts, cost = {}, {}
        for name in CONDITIONS:
            rows = chosen[name]
            store = self.dump(name, write_selection(rows, self.root / f"select-{name}"))
            tokens = sum(map(answer_tokens, rows))
            cost[name] = {"records": len(rows), "answer_tokens": tokens,
                          "store_bytes_per_answer_token": store_bytes(store) / tokens,
                          "stage1_cpu_ms_per_answer_token": _stage1_rate(self.costs, regenerated, name),
                          "stage2_cpu_ms_per_answer_token": 1e3 * self.costs[f"stage2-{name}"]["cpu_s"] / tokens}
            for seed in a.seeds:
                drafts[f"{name}-seed{seed}"] = self.train_and_export(name, store, seed)
                if name == "audio" and a.hearing:
                    drafts[f"{HEARING}-seed{seed}"] = self.train_and_export(HEARING, store, seed)
        if a.hearing:
            cost[HEARING] = cost["audio"]
        served = self.serve(drafts, data)
        result = {"args": vars(a), "conditions": cost, "costs": self.costs, "served": served,
                  "cpu": _cpu(), "time": time.time()}
        (self.root / "result.json").write_text(json.dumps(result, indent=1))
        return result


def _stage1_rate(costs: dict[str, Any], regenerated: dict[str, int], name: str) -> float | None:
    """Stage 1's CPU milliseconds per regenerated answer token; ``mix`` pays the mean of its two halves."""
    parts = ("audio", "chat") if name == "mix" else (name,)
    rates = [1e3 * costs[f"stage1-{n}"]["cpu_s"] / regenerated[n] for n in parts if "cpu_s" in costs.get(f"stage1-{n}", {})]
    return statistics.mean(rates) if len(rates) == len(parts) else None


def _cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    flags = [f for f in ("amx_bf16", "avx512_bf16") if f in out]
    return f"{model}, {os.cpu_count()} cores, bf16 units: {', '.join(flags) or 'none'}"


def table(result: dict[str, Any]) -> str:
    """Acceptance per held-out set (median over seeds, [min-max]), speed-up, and each condition's cost."""
    a, costs = result["args"], result["costs"]
    lines = [f"k={a['k']}, {a['train_steps']} steps, seeds {a['seeds']}, {a['eval_prompts']} held-out prompts per set; "
             f"{result['cpu']}",
             "| draft trained on | spoken: acceptance | per position | speedup | typed: acceptance | per position "
             "| speedup | answer tokens | stage 1 CPU ms/token | stage 2 CPU ms/token | store B/token | train tok/s "
             "| train peak RSS GiB |",
             "|---" * 13 + "|"]
    for name in CONDITIONS + ((HEARING,) if a.get("hearing") else ()):
        cells = []
        for eval_set in EVAL_SETS:
            runs = [result["served"][eval_set][f"{name}-seed{s}"] for s in a["seeds"]]
            acc = [r["acceptance"]["mean_acceptance_length"] for r in runs]
            rates = [r["acceptance"]["per_position_acceptance_rate"] for r in runs]
            pos = [statistics.median(col) for col in zip(*rates, strict=True)]
            speed = [r["speedup"] for r in runs]
            cells += [_median_range(acc), "/".join(f"{p:.2f}" for p in pos), _median_range(speed, "x")]
        cond = result["conditions"][name]
        trains = [costs[f"train-{name}-seed{s}"] for s in a["seeds"]]
        stage1 = cond["stage1_cpu_ms_per_answer_token"]
        cells += [str(cond["answer_tokens"]), f"{stage1:.0f}" if stage1 is not None else "reused",
                  f"{cond['stage2_cpu_ms_per_answer_token']:.0f}", f"{cond['store_bytes_per_answer_token']:.0f}",
                  f"{statistics.median(t['tokens_per_s'] for t in trains):.0f}",
                  f"{max(t['peak_rss_bytes'] for t in trains) / 2**30:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _median_range(values: list[float], unit: str = "") -> str:
    med = statistics.median(values)
    return f"{med:.2f}{unit}" + (f" [{min(values):.2f}-{max(values):.2f}]" if len(values) > 1 else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="work/bench-audio-vs-text")
    parser.add_argument("--target", default="work/smol-audio-target", help="built when missing")
    parser.add_argument("--records", type=int, default=240, help="training records per condition before "
                        "equalising answer tokens")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval-prompts", type=int, default=12, help="held-out prompts per set (spoken, typed)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per engine")
    parser.add_argument("-k", type=int, default=4, help="draft tokens per step")
    parser.add_argument("--no-hearing", dest="hearing", action="store_false",
                        help="skip the fifth draft: the audio store, trained and served with the audio embeddings")
    parser.add_argument("--spoken-regen", default="", help="reuse a stage-1 output of the spoken train split "
                        "(e.g. make demo's work/demo/regenerated) instead of regenerating it")
    args = parser.parse_args(argv)
    result = Bench(args).run()
    print(table(result))


if __name__ == "__main__":
    main()
