"""Options of stage 3 (``python -m stages.train``; ``train:`` section of a pipeline YAML).

Defaults follow the public EAGLE-3 recipes (SpecForge: lr 1e-4, 1.5% warmup, AdamW wd 0,
cosine; EAGLE: grad clip 0.5, ZeRO-2; AngelSlim audio: 20 epochs, ZeRO-3).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.core.config import config_hash, opt, require

# Options that may change between a run and its resume: they do not change the trained weights.
RESUMABLE_CHANGES = ("output", "nproc", "log_every", "save_every", "keep_checkpoints", "num_workers",
                     "eval_every", "eval_max_batches", "master_port", "num_spec_tokens", "fit_eval")


@dataclass(kw_only=True)
class TrainConfig:
    """Everything stage 3 needs; the run's identity is the hash of the non-resumable fields."""

    store: str = opt("", "hidden-state store written by stage 2")
    target: str = opt("", "target model directory (embedding table and lm_head are read from it)")
    output: str = opt("", "run directory (created; rerunning the same command resumes it)")
    nproc: int = opt(0, "launch N local processes through the deepspeed launcher (CPU: DS_ACCELERATOR=cpu, "
                        "gloo); 0 = already launched (deepspeed/torchrun) or a single process")
    master_port: int = opt(0, "rendezvous port for --nproc (0: a free port)")
    zero_stage: int = opt(2, "DeepSpeed ZeRO stage 1, 2 or 3")
    offload_optimizer: bool = opt(False, "keep optimizer state and the update on the CPU (ZeRO-Offload)")
    epochs: int = opt(10, "passes over the training split")
    max_steps: int = opt(0, "stop after this many optimizer steps (0: run all epochs)")
    lr: float = opt(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.0, "AdamW weight decay (0 as in the public recipes; 0.1 changed the demo's "
                                   "held-out acceptance by <1%)")
    warmup_ratio: float = opt(0.015, "fraction of the steps with linear warmup before the cosine decay")
    batch_tokens: int = opt(8192, "tokens per packed row (one micro-batch); longer samples are cut to this")
    grad_accum: int = opt(1, "micro-batches per optimizer step and process")
    precision: Literal["auto", "bf16", "fp32"] = opt(
        "auto", "bf16 params with fp32 master weights, or plain fp32; auto: bf16 on GPUs, fp32 on CPUs "
                "(bf16 matmuls without CPU bf16 units ran 10x slower than fp32 here)")
    ttt_length: int = opt(7, "training-time-test unroll length")
    loss_decay: float = opt(0.8, "weight decay**k of TTT step k in the loss")
    draft_vocab_size: int = opt(32000, "draft vocab: most frequent supervised tokens (< target vocab)")
    draft_audio_input: Literal["placeholder", "encoder"] = opt(
        "placeholder", "what the draft embeds at audio positions: the <|AUDIO|> id (what vLLM feeds) "
                       "or the stored audio-encoder embeddings (needs an engine that passes them)")
    init_head: Literal["random", "target"] = opt(
        "random", "initial draft lm_head and final norm: random, or copied from the target (its lm_head rows of "
                  "the draft vocab and its final norm; needs the draft's hidden size = the target's)")
    draft_config: str = opt("", "JSON object overriding DraftConfig fields, e.g. '{\"intermediate_size\": 8192}'")
    eval_fraction: float = opt(0.05, "held-out share of samples, chosen by a stable hash of the sample id")
    eval_every: int = opt(0, "evaluate every N steps (0: at every checkpoint)")
    eval_max_batches: int = opt(200, "packed rows per evaluation, over all processes (0: the whole split)")
    fit_eval: bool = opt(True, "after the last step, the final weights' metrics on up to --eval-max-batches "
                               "training rows (split 'fit' in metrics.jsonl: the acceptance vLLM should "
                               "measure on the training prompts when the served target repeats them)")
    num_spec_tokens: int = opt(4, "draft length k of the chain/walk acceptance estimate in the log line (the "
                                  "benchmark's --num-spec-tokens; metrics.jsonl has every k up to --ttt-length)")
    save_every: int = opt(500, "checkpoint every N optimizer steps (and at the end)")
    keep_checkpoints: int = opt(3, "committed checkpoints kept (plus step 0, the untrained reference)")
    log_every: int = opt(10, "optimizer steps per metrics line (stdout, metrics.jsonl, TensorBoard)")
    seed: int = opt(0, "seed of the draft init and the data order")
    pack_window: int = opt(512, "samples sorted by length together before packing into rows")
    num_workers: int = opt(2, "DataLoader worker processes per training process")

    def __post_init__(self) -> None:
        for name in ("store", "target", "output"):
            require(bool(getattr(self, name)), f"--{name} is required")
        require(self.zero_stage in (1, 2, 3), f"--zero-stage must be 1, 2 or 3, got {self.zero_stage}")
        for name in ("epochs", "batch_tokens", "grad_accum", "ttt_length", "draft_vocab_size", "save_every",
                     "keep_checkpoints", "log_every", "pack_window", "num_spec_tokens"):
            require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        for name in ("nproc", "max_steps", "eval_every", "eval_max_batches", "num_workers", "master_port"):
            require(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0")
        require(self.lr > 0, f"--lr must be positive, got {self.lr}")
        require(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        require(0.0 <= self.warmup_ratio < 1.0, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        require(0.0 < self.loss_decay <= 1.0, f"--loss-decay must be in (0, 1], got {self.loss_decay}")
        require(0.0 <= self.eval_fraction < 1.0, f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        self.draft_overrides()  # fail on bad JSON now, not after the launch

    def draft_overrides(self) -> dict[str, Any]:
        """The ``--draft-config`` JSON as a dict (validated against DraftConfig when the draft is built)."""
        if not self.draft_config:
            return {}
        try:
            value = json.loads(self.draft_config)
        except json.JSONDecodeError as err:
            require(False, f"--draft-config is not valid JSON: {err}")
        require(isinstance(value, dict), "--draft-config must be a JSON object of DraftConfig fields")
        return value

    def identity(self) -> str:
        """Hash of the options that decide the trained weights (a resume must match it)."""
        return config_hash(self, exclude=RESUMABLE_CHANGES)
