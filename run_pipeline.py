"""Run the whole chain: regenerate -> dump -> train -> export -> benchmark.

    python run_pipeline.py --config configs/demo.yaml            # run what is not complete
    python run_pipeline.py status --config configs/demo.yaml     # per-stage, per-shard progress
    python run_pipeline.py emit-slurm --config configs/qwen2-audio-7b.yaml --out slurm/

Each stage runs as its own process (``python -m stages.<name> --config FILE`` plus the paths
that link it to its neighbours), so a stage here behaves exactly like the documented per-stage
command. A stage that says it is complete (``stages.<name>.is_complete`` on its output) is
skipped; an incomplete one is rerun and resumes by itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from pipeline.cluster.orchestrate import (
    Paths,
    PipelineConfig,
    check_extra_stores,
    load_pipeline_config,
    prepare_inputs,
    stage_complete,
    stage_path_args,
    status_report,
    training_vs_serving,
)
from pipeline.core.cli import EXIT_MEANING
from pipeline.core.progress import setup_logging

log = logging.getLogger("run_pipeline")


def run_stage(stage: str, cfg: PipelineConfig, config_path: str, paths: Paths, extra: list[str] | None = None) -> None:
    cmd = [sys.executable, "-m", f"stages.{stage}", "--config", config_path, *stage_path_args(stage, cfg, paths),
           *(extra or [])]
    log.info("stage %s: %s", stage, " ".join(cmd))
    start = time.monotonic()
    result = subprocess.run(cmd)
    if result.returncode != 0:
        meaning = EXIT_MEANING.get(result.returncode, "rerun the same command to resume")
        print(f"run_pipeline: stage {stage} failed with exit code {result.returncode}: {meaning}", file=sys.stderr)
        raise SystemExit(result.returncode)  # the stage's status, for a batch script to act on
    log.info("stage %s: done in %.1f s", stage, time.monotonic() - start)


def export_untrained(config_path: str, paths: Paths) -> bool:
    """Export the run's step-0 draft (the untrained reference); False when the run kept no step 0."""
    from modeling.draft.snapshot import SnapshotError, find_step

    try:
        find_step(paths.run, 0)
    except SnapshotError:
        log.warning("no step-000000 checkpoint in %s: skipping the untrained baseline", paths.run)
        return False
    subprocess.run([sys.executable, "-m", "stages.export", "--config", config_path, "--run", str(paths.run),
                    "--step", "0", "--output", str(paths.untrained_draft)], check=True)
    return True


def untrained_result(paths: Paths) -> Path:
    return paths.root / "benchmark-untrained.json"


def run_benchmark(cfg: PipelineConfig, config_path: str, paths: Paths) -> None:
    """The benchmark stage, with the untrained draft of the same shape as the reference when configured:
    both drafts against one plain run (one plain engine fewer, ~100 s on 2 CPU cores)."""
    extra: list[str] = []
    if cfg.baseline_untrained and not untrained_result(paths).exists() and export_untrained(config_path, paths):
        extra = ["--compare-draft", str(paths.untrained_draft), "--compare-output", str(untrained_result(paths))]
    run_stage("benchmark", cfg, config_path, paths, extra)


def run_untrained_baseline(cfg: PipelineConfig, config_path: str, paths: Paths) -> None:
    """A benchmark that completed without the untrained reference (configured later): measure it alone."""
    if untrained_result(paths).exists() or not export_untrained(config_path, paths):
        return
    # the benchmark's own linking flags; the later --draft and --output win
    subprocess.run([sys.executable, "-m", "stages.benchmark", "--config", config_path,
                    *stage_path_args("benchmark", cfg, paths), "--draft", str(paths.untrained_draft),
                    "--output", str(untrained_result(paths))], check=True)


def run(config_path: str, only: list[str] | None) -> int:
    cfg, _raw = load_pipeline_config(config_path)
    paths = Paths(Path(cfg.workdir))
    check_extra_stores(cfg, [s for s in cfg.stages if not only or s in only])
    paths.root.mkdir(parents=True, exist_ok=True)
    prepare_inputs(cfg)
    for stage in cfg.stages:
        if only and stage not in only:
            continue
        if stage_complete(stage, paths):
            log.info("stage %s: complete, skipping", stage)
            if stage == "benchmark" and cfg.baseline_untrained:
                run_untrained_baseline(cfg, config_path, paths)
            continue
        if stage == "benchmark":
            run_benchmark(cfg, config_path, paths)
        else:
            run_stage(stage, cfg, config_path, paths)
    print_summary(paths, "eval" if cfg.eval_input else "fit")
    return 0


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def stage_resources(paths: Paths) -> dict[str, dict]:
    """Each stage's ``resources`` record (docs/memory.md), shards and ranks combined into one row."""
    from pipeline.core.resources import combine

    def shards(manifest: Path) -> dict:
        entries = _read_json(manifest).get("shards", {}).values()
        return combine([e.get("resources", {}) for e in entries if e.get("status") == "done"])

    return {"regenerate": shards(paths.regen / "manifest.json"), "dump": shards(paths.store / "manifest.json"),
            "train": _read_json(paths.run / "FINISHED").get("resources", {}),
            "export": _read_json(paths.draft / "export_info.json").get("resources", {}),
            "benchmark": _read_json(paths.benchmark).get("resources", {})}


def print_summary(paths: Paths, split: str = "fit") -> None:
    from pipeline.core.resources import format_table as resources_table
    from stages.benchmark_report import format_table

    rows = {stage: r for stage, r in stage_resources(paths).items() if r}
    if rows:
        print("\n== resources per stage (peaks: GiB; docs/memory.md) ==")
        print(resources_table(rows))
    for name in ("benchmark-untrained.json", "benchmark.json"):
        path = paths.root / name
        if path.exists():
            print(f"\n== {name} ==")
            print(format_table(json.loads(path.read_text())))
    rows = training_vs_serving(paths, split)
    if rows:
        where = "training prompts" if split == "fit" else "held-out: the trainer's eval rows vs the eval prompts"
        print(f"\n== training's estimate vs vLLM (mean acceptance length; {where}) ==")
        print(f"{'draft':10}{'step':>6}{'k':>3}{'training walk':>15}{'independent':>13}{'vLLM':>8}{'diff':>8}"
              f"{'stage-1 answers repeated':>26}")
        for r in rows:
            diff = "-" if r["relative_difference"] is None else f"{r['relative_difference']:+.0%}"
            vllm = "-" if r["vllm_acceptance"] is None else f"{r['vllm_acceptance']:.2f}"
            repro = "-" if r["reproduced"] is None else f"{r['reproduced']:.0%}"
            print(f"{r['draft']:10}{r['step']:>6}{r['k']:>3}{r['training_walk_estimate']:>15.2f}"
                  f"{r['training_independent_estimate']:>13.2f}{vllm:>8}{diff:>8}{repro:>26}")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="run", choices=["run", "status", "emit-slurm"])
    parser.add_argument("--config", required=True, help="pipeline YAML (top-level paths + one section per stage)")
    parser.add_argument("--only", action="append", help="run only this stage (repeatable)")
    parser.add_argument("--out", default="slurm", help="emit-slurm: folder for the sbatch scripts")
    args = parser.parse_args(argv)
    if args.command == "status":
        cfg, _ = load_pipeline_config(args.config)
        print(status_report(Paths(Path(cfg.workdir))))
        return 0
    if args.command == "emit-slurm":
        from pipeline.cluster.slurm import emit_slurm

        prepare_inputs(load_pipeline_config(args.config)[0])  # jobs read them: build them first

        for path in emit_slurm(args.config, Path(args.out)):
            print(path)
        return 0
    return run(args.config, args.only)


if __name__ == "__main__":
    raise SystemExit(main())
