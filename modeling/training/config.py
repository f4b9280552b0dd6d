"""Options of stage 3 (``python -m stages.train``; ``train:`` section of a pipeline YAML).

Seven sections (docs/stage-train.md, "Options"): ``data``, ``draft``, ``optimizer``, ``schedule``,
``monitoring``, ``checkpointing``, ``launch``. Flags stay flat (``--lr``), and a YAML file may
give an option flat (``lr: 0.001``) or in its section (``optimizer: {lr: 0.001}``). Defaults follow
the public EAGLE-3 recipes (SpecForge: lr 1e-4, 1.5% warmup, AdamW wd 0, cosine; EAGLE: grad clip
0.5, ZeRO-2; AngelSlim audio: 20 epochs, ZeRO-3).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.core.config import config_hash, dtype_opt, opt, require, section

# Options that may change between a run and its resume: they do not change the trained weights.
RESUMABLE_CHANGES = ("output", "nproc", "log_every", "save_every", "keep_checkpoints", "num_workers",
                     "eval_every", "eval_max_batches", "master_port", "num_spec_tokens", "fit_eval",
                     "peak_tflops")


def _at_least(options: Any, minimum: int, *names: str) -> None:
    for name in names:
        require(getattr(options, name) >= minimum, f"--{name.replace('_', '-')} must be >= {minimum}")


def parse_draft_config(value: Any, where: str) -> dict[str, Any]:
    """DraftConfig overrides: a YAML mapping, or a JSON object string (the flag's spelling)."""
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: --draft-config is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: --draft-config must be a mapping (YAML) or a JSON object of DraftConfig "
                         f"fields, got {value!r}")
    return dict(value)


def parse_stores(value: Any, where: str) -> str:
    """One store, or several read as one: a YAML list or a comma-separated string, kept as the
    comma-separated string (so a single store's run identity is what it always was)."""
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, str) and v.strip() and "," not in v for v in value):
            raise ValueError(f"{where}: --store takes store paths without commas, got {value!r}")
        return ",".join(v.strip() for v in value)
    if not isinstance(value, str):
        raise ValueError(f"{where}: --store must be a path or a list of paths, got {value!r}")
    return value


def store_paths(store: str) -> list[str]:
    """The store paths of a ``--store`` value, in order."""
    return [p.strip() for p in store.split(",") if p.strip()]


def _draft_config_hash_value(value: dict[str, Any]) -> str:
    # the JSON string earlier releases hashed ("" when empty), so their run directories resume
    return json.dumps(value, sort_keys=True) if value else ""


@dataclass(kw_only=True)
class DataOptions:
    store: str = opt("", "hidden-state store written by stage 2; several stores of the same target and stage-2 "
                         "settings (comma-separated, or a YAML list) train as one mixed set", parse=parse_stores)
    target: str = opt("", "target model directory (embedding table and lm_head are read from it)")
    batch_tokens: int = opt(8192, "tokens per packed row (one micro-batch); longer samples are cut to this")
    pack_window: int = opt(512, "samples sorted by length together before packing into rows")
    eval_fraction: float = opt(0.05, "held-out share of samples, chosen by a stable hash of the sample id")
    num_workers: int = opt(2, "DataLoader worker processes per training process")

    def __post_init__(self) -> None:
        for name in ("store", "target"):
            require(bool(getattr(self, name)), f"--{name} is required")
        self.store = parse_stores(self.store, "--store")
        require(bool(store_paths(self.store)), "--store names no store")
        _at_least(self, 1, "batch_tokens", "pack_window")
        _at_least(self, 0, "num_workers")
        require(0.0 <= self.eval_fraction < 1.0, f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")


@dataclass(kw_only=True)
class DraftOptions:
    ttt_length: int = opt(7, "training-time-test unroll length")
    loss_decay: float = opt(0.8, "weight decay**k of TTT step k in the loss")
    draft_vocab_size: int = opt(32000, "draft vocab: most frequent supervised tokens (< target vocab)")
    draft_audio_input: Literal["placeholder", "encoder"] = opt(
        "placeholder", "what the draft embeds at audio positions: the <|AUDIO|> id (what vLLM feeds) "
                       "or the stored audio-encoder embeddings (needs an engine that passes them)")
    init_head: Literal["random", "target"] = opt(
        "random", "initial draft lm_head and final norm: random, or copied from the target (its lm_head rows of "
                  "the draft vocab and its final norm; needs the draft's hidden size = the target's)")
    draft_config: dict[str, Any] = opt({}, "DraftConfig fields to override: a mapping in YAML, a JSON object on the "
                                           "command line, e.g. '{\"intermediate_size\": 8192}'",
                                       parse=parse_draft_config, hash=_draft_config_hash_value)

    def __post_init__(self) -> None:
        _at_least(self, 1, "ttt_length", "draft_vocab_size")
        require(0.0 < self.loss_decay <= 1.0, f"--loss-decay must be in (0, 1], got {self.loss_decay}")
        self.draft_config = parse_draft_config(self.draft_config, "--draft-config")


@dataclass(kw_only=True)
class OptimizerOptions:
    lr: float = opt(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.0, "AdamW weight decay (0 as in the public recipes; 0.1 changed the demo's "
                                   "held-out acceptance by <1%)")
    warmup_ratio: float = opt(0.015, "fraction of the steps with linear warmup before the cosine decay")
    grad_accum: int = opt(1, "micro-batches per optimizer step and process")

    def __post_init__(self) -> None:
        require(self.lr > 0, f"--lr must be positive, got {self.lr}")
        require(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        require(0.0 <= self.warmup_ratio < 1.0, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        _at_least(self, 1, "grad_accum")


@dataclass(kw_only=True)
class ScheduleOptions:
    epochs: int = opt(10, "passes over the training split")
    max_steps: int = opt(0, "stop after this many optimizer steps (0: run all epochs)")
    seed: int = opt(0, "seed of the draft init and the data order")

    def __post_init__(self) -> None:
        _at_least(self, 1, "epochs")
        _at_least(self, 0, "max_steps")


@dataclass(kw_only=True)
class MonitoringOptions:
    log_every: int = opt(10, "optimizer steps per metrics line (stdout, metrics.jsonl, TensorBoard)")
    eval_every: int = opt(0, "evaluate every N steps (0: at every checkpoint)")
    eval_max_batches: int = opt(200, "packed rows per evaluation, over all processes (0: the whole split)")
    fit_eval: bool = opt(True, "after the last step, the final weights' metrics on up to --eval-max-batches "
                               "training rows (split 'fit' in metrics.jsonl: the acceptance vLLM should "
                               "measure on the training prompts when the served target repeats them)")
    num_spec_tokens: int = opt(4, "draft length k of the chain/walk acceptance estimate in the log line (the "
                                  "benchmark's --num-spec-tokens; metrics.jsonl has every k up to --ttt-length)")

    def __post_init__(self) -> None:
        _at_least(self, 1, "log_every", "num_spec_tokens")
        _at_least(self, 0, "eval_every", "eval_max_batches")


@dataclass(kw_only=True)
class CheckpointOptions:
    output: str = opt("", "run directory (created; rerunning the same command resumes it)")
    save_every: int = opt(500, "checkpoint every N optimizer steps (and at the end)")
    keep_checkpoints: int = opt(3, "committed checkpoints kept (plus step 0, the untrained reference)")

    def __post_init__(self) -> None:
        require(bool(self.output), "--output is required")
        _at_least(self, 1, "save_every", "keep_checkpoints")


@dataclass(kw_only=True)
class LaunchOptions:
    nproc: int = opt(0, "launch N local processes through the deepspeed launcher (CPU: DS_ACCELERATOR=cpu, "
                        "gloo); 0 = already launched (deepspeed/torchrun) or a single process")
    master_port: int = opt(0, "rendezvous port for --nproc (0: a free port)")
    zero_stage: int = opt(2, "DeepSpeed ZeRO stage 1, 2 or 3")
    offload_optimizer: bool = opt(False, "keep optimizer state and the update on the CPU (ZeRO-Offload)")
    precision: str = dtype_opt(
        "auto", "bf16 params with fp32 master weights, or plain fp32; auto: bf16 on GPUs, fp32 on CPUs "
                "(bf16 matmuls without CPU bf16 units ran 10x slower than fp32 here)", ("auto", "bf16", "fp32"))
    peak_tflops: float = opt(0.0, "the devices' peak TFLOP/s for the MFU in FINISHED's resources (0: from "
                                  "the machine: GPU table or CPU cores x clock x FLOPs/cycle; docs/memory.md)")

    def __post_init__(self) -> None:
        require(self.zero_stage in (1, 2, 3), f"--zero-stage must be 1, 2 or 3, got {self.zero_stage}")
        _at_least(self, 0, "nproc", "master_port")
        require(self.peak_tflops >= 0, f"--peak-tflops must be >= 0, got {self.peak_tflops}")


@dataclass(kw_only=True)
class TrainConfig:
    """Everything stage 3 needs; the run's identity is the hash of the non-resumable options."""

    data: DataOptions = section(DataOptions, "the store, the target, and how samples become packed rows")
    draft: DraftOptions = section(DraftOptions, "the draft's shape, vocab, initialisation and TTT loss")
    optimizer: OptimizerOptions = section(OptimizerOptions, "AdamW and its warmup + cosine schedule")
    schedule: ScheduleOptions = section(ScheduleOptions, "how long to train, and the seed")
    monitoring: MonitoringOptions = section(MonitoringOptions, "metrics lines and evaluations")
    checkpointing: CheckpointOptions = section(CheckpointOptions, "the run directory and its checkpoints")
    launch: LaunchOptions = section(LaunchOptions, "processes, DeepSpeed ZeRO, precision and the MFU's peak")

    def identity(self) -> str:
        """Hash of the options that decide the trained weights (a resume must match it); equal to
        the hash of the same options before they were grouped into sections."""
        return config_hash(self, exclude=RESUMABLE_CHANGES)
