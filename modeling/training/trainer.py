"""One training process of stage 3: DeepSpeed engine, train loop, eval, checkpoints.

Every rank runs :func:`train`; collectives (ZeRO reductions, metric sums, checkpoint barriers)
happen at the same micro-batches everywhere because the schedule gives each rank the same
number of rows. Resume: the newest committed checkpoint restores weights, optimizer, LR
schedule and RNG, and the loader restarts at ``step * grad_accum`` micro-batches of the same
deterministic schedule, so a resumed run computes exactly what the uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from modeling.draft.snapshot import save_draft_snapshot
from modeling.draft.vocab import VocabMapping
from modeling.training.checkpoint import load_checkpoint, remove_partial, save_checkpoint
from modeling.training.config import TrainConfig
from modeling.training.data import PackedRows, Packing, Schedule, dequantize_row, eval_rows, train_loader
from modeling.training.metrics import MetricSinks, MetricWindow
from modeling.training.model import (
    TrainDraft,
    TrainModule,
    WarmupCosine,
    deepspeed_config,
    init_head_from_target,
    use_bf16,
    warmup_steps,
)
from modeling.training.setup import TrainInputs, check_run_dir, load_vocab, run_lock_path, write_run_files
from modeling.training.utilisation import training_resources
from pipeline.core.durable import atomic_write_json, atomic_write_text
from pipeline.core.faults import crash_point
from pipeline.core.locks import FileLock
from pipeline.core.resources import ResourceMeter

log = logging.getLogger("stages.train")
FINISHED = "FINISHED"


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int
    world: int
    local_rank: int
    device: torch.device


def free_port() -> int:
    """An unused TCP port for a local rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed() -> Dist:
    """Join the job the launcher (deepspeed, torchrun) set up, or form a one-process job."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    on_cpu = acc.device_name() == "cpu"
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else acc.communication_backend_name())
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if on_cpu:
        unlink_shm_allreduce_buffer()
        # the launcher starts every rank with all cores: split them, or 2 ranks x N threads thrash
        local_size = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_size))
        device = torch.device("cpu")
    else:
        acc.set_device(local)
        device = torch.device(acc.device_name(local))
    return Dist(dist.get_rank(), dist.get_world_size(), local, device)


def shm_allreduce_buffer_path(rank: int) -> Path:
    """Where DeepSpeed's CPU all-reduce puts this rank's shared-memory buffer (csrc/cpu/comm/shm.cpp names it)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}"
                               f"_{os.environ.get('MASTER_PORT', '')}_{rank}")


def unlink_shm_allreduce_buffer() -> None:
    """Remove this rank's name for DeepSpeed's CPU all-reduce buffer once every rank has mapped every buffer.

    DeepSpeed creates one 66 MiB POSIX shared-memory buffer per local rank at init and never unlinks it, so each
    CPU run left 132 MiB in /dev/shm (RAM) for good: 294 of them filled 18 GiB of this 24 GiB machine until vLLM
    could not start. The mappings stay valid after the name goes (POSIX), and unlinking right after init means a
    rank killed later leaks nothing either.
    """
    dist.barrier()  # DeepSpeed's init returns only after this rank has mapped all its peers' buffers
    shm_allreduce_buffer_path(dist.get_rank()).unlink(missing_ok=True)


def build_engine(cfg: TrainConfig, inputs: TrainInputs, vocab: VocabMapping, total_steps: int, ctx: Dist) -> Any:
    """The DeepSpeed engine around a freshly initialised draft (same init on every rank)."""
    import deepspeed

    torch.manual_seed(cfg.schedule.seed)
    draft = TrainDraft(inputs.draft_config, inputs.embed_table)
    draft.set_vocab_mapping(vocab.d2t, vocab.t2d)
    if cfg.draft.init_head == "target":
        assert inputs.final_norm is not None  # check_inputs reads it for --init-head target
        init_head_from_target(draft, inputs.lm_head, inputs.final_norm)
    # the teacher matmul runs in the compute dtype: bf16 on GPUs as the serving target does
    dtype = torch.bfloat16 if use_bf16(cfg, ctx.device.type == "cpu") else torch.float32
    module = TrainModule(draft, inputs.lm_head.to(dtype), cfg.draft.ttt_length, cfg.draft.loss_decay)
    module.to_device(ctx.device)
    schedule = WarmupCosine(total_steps, warmup_steps(total_steps, cfg.optimizer.warmup_ratio))
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=[p for p in module.parameters() if p.requires_grad],
        config=deepspeed_config(cfg, ctx.device.type == "cpu"),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    return engine


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The row on the device; fp8 rows (uint8 + scales: half the bytes) are dequantized there."""
    moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return dequantize_row(moved, dtype)


class Trainer:
    """The loop of one rank: train, log, evaluate and checkpoint at the same steps on every rank."""

    def __init__(self, cfg: TrainConfig, inputs: TrainInputs, ctx: Dist):
        self.cfg, self.inputs, self.ctx = cfg, inputs, ctx
        self.run_dir = Path(cfg.checkpointing.output)
        self.packing = Packing(cfg.data.batch_tokens, cfg.data.pack_window, cfg.schedule.seed, ctx.world, cfg.optimizer.grad_accum)
        self.schedule = Schedule(inputs.split.train, inputs.lengths, self.packing, ctx.rank, cfg.schedule.epochs, cfg.schedule.max_steps)
        self.audio = cfg.draft.draft_audio_input == "encoder"
        # fp8 stores: a GPU gets uint8 rows + scales and dequantizes them itself; a CPU run keeps
        # the loader's numpy dequantization (2.4x faster than torch's there, and in the workers)
        self.dequantize_in_loader = ctx.device.type == "cpu"
        rows, counted = eval_rows(inputs.split.eval, inputs.lengths, self.packing, ctx.rank, cfg.monitoring.eval_max_batches)
        self.eval_data = PackedRows(inputs.store, rows, cfg.data.batch_tokens, self.audio, counted,
                                    self.dequantize_in_loader)
        rows, counted = (eval_rows(inputs.split.train, inputs.lengths, self.packing, ctx.rank, cfg.monitoring.eval_max_batches)
                         if cfg.monitoring.fit_eval else ([], []))
        self.fit_data = PackedRows(inputs.store, rows, cfg.data.batch_tokens, self.audio, counted,
                                   self.dequantize_in_loader)
        self.vocab = self._prepare_run_dir()
        self.engine = build_engine(cfg, inputs, self.vocab, self.schedule.total_steps, ctx)
        self.sinks: MetricSinks | None = None
        self.skipped_path = self.run_dir / f"skipped-samples-rank{ctx.rank:05d}.jsonl"
        self.skipped = {r["id"]: r for r in _read_jsonl(self.skipped_path)}  # kept across a resume
        self.trained_tokens, self.train_seconds = 0, 0.0

    def _prepare_run_dir(self) -> VocabMapping:
        """Rank 0 creates or checks the run directory; everyone then reads the same vocab."""
        if self.ctx.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            removed = remove_partial(self.run_dir)
            if removed:
                log.info("removed uncommitted checkpoint dirs of a killed run: %s", removed)
            if check_run_dir(self.cfg, self.ctx.world) is None:
                write_run_files(self.cfg, self.inputs, self.ctx.world, self.schedule.total_steps)
        dist.barrier()
        return load_vocab(self.run_dir)

    def run(self, meter: ResourceMeter) -> int:
        """Train to the end of the schedule (resuming if possible); returns the final step. ``meter``
        measures this rank since before its set-up; its numbers go to ``FINISHED``."""
        state = load_checkpoint(self.engine, self.run_dir, self.ctx.rank)
        step = int(state["step"]) if state else 0
        if state:
            log.info("rank %d resumed from step %d (epoch %d)", self.ctx.rank, step, state["loader"]["epoch"])
        if self.ctx.rank == 0:
            self.sinks = MetricSinks(self.run_dir, step if state else None, self.schedule.total_steps)
        try:
            if state is None:  # step 0: the untrained reference for eval and export
                self._evaluate(0)
                self._evaluate(0, "fit")
                self._save(0)
            step = self._train_from(step)
        finally:
            if self.sinks is not None:
                self.sinks.close()
        if self.skipped:
            log.warning("rank %d: %d samples could not be read and were skipped; listed in %s",
                        self.ctx.rank, len(self.skipped), self.skipped_path)
        meter.stop()
        cfg = self.cfg
        resources = training_resources(meter, self.trained_tokens, self.train_seconds, self.inputs.draft_config,
                                       ttt_length=cfg.draft.ttt_length, row_tokens=cfg.data.batch_tokens,
                                       device_type=self.ctx.device.type, precision=self.engine_precision(),
                                       peak_tflops=cfg.launch.peak_tflops)
        if self.ctx.rank == 0:
            log.info("trained %s tokens at %s tokens/s; MFU %s (peak: %s); peak RSS per rank %.2f GiB",
                     resources["tokens"], resources["tokens_per_s"],
                     "-" if resources["mfu"] is None else f"{resources['mfu']:.2%}", resources["peak_source"],
                     resources["peak_rss_bytes"] / 2**30)
            atomic_write_json(self.run_dir / FINISHED, {"step": step, "time": time.time(), "resources": resources})
        return step

    def engine_precision(self) -> str:
        """The precision the draft's matmuls run in (what the MFU's peak is for)."""
        return "bf16" if use_bf16(self.cfg, self.ctx.device.type == "cpu") else "fp32"

    def _note_skipped(self, skipped: list[dict[str, Any]]) -> None:
        """Warn once per sample a row left out (each epoch meets it again) and remember it."""
        new = [rec for rec in skipped if rec["id"] not in self.skipped]
        for rec in new:
            log.warning("rank %d: skipped sample %r (%s row %d): %s", self.ctx.rank, rec["id"], rec["shard"],
                        rec["row"], rec["reason"])
            self.skipped[rec["id"]] = rec
        if new:  # once per row, not per sample: a whole damaged shard is thousands of them
            self._write_skipped()

    def _write_skipped(self) -> None:
        rows = sorted(self.skipped.values(), key=lambda r: r["index"])
        atomic_write_text(self.skipped_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def _train_from(self, step: int) -> int:
        cfg, ga, total = self.cfg, self.cfg.optimizer.grad_accum, self.schedule.total_steps
        loader = train_loader(self.inputs.store, self.schedule, step * ga, self.audio, cfg.data.num_workers,
                              pin_memory=self.ctx.device.type == "cuda", dequantize=self.dequantize_in_loader)
        window = MetricWindow(cfg.draft.ttt_length, cfg.monitoring.num_spec_tokens)
        self.engine.train()
        started, paused_s = time.monotonic(), 0.0
        for micro, batch in enumerate(loader, start=step * ga):
            self.trained_tokens += int(batch["num_tokens"])
            self._note_skipped(batch["skipped"])
            res = self.engine(_to_device(batch, self.ctx.device, self.inputs.store.dtype))
            self.engine.backward(res["loss"])
            lr = self.engine.get_lr()[0]
            self.engine.step()
            window.add(res, batch["num_tokens"], len(batch["skipped"]))
            if (micro + 1) % ga:
                continue
            step = (micro + 1) // ga
            crash_point("train-step", str(step))
            if step % cfg.monitoring.log_every == 0 or step == total:
                self._log("train", step, window.summary(cfg.draft.loss_decay, self.ctx.device),
                          lr=lr, epoch=self.schedule.position(micro + 1)["epoch"])
                window.reset()
            paused = time.monotonic()
            if step % cfg.checkpointing.save_every == 0 or step == total or (cfg.monitoring.eval_every and step % cfg.monitoring.eval_every == 0):
                self._evaluate(step)
            if step == total:  # the final weights on training rows: what vLLM should measure on them
                self._evaluate(step, "fit")
            if step % cfg.checkpointing.save_every == 0 or step == total:
                self._save(step)
            window.start += time.monotonic() - paused  # tokens/s counts training time only
            paused_s += time.monotonic() - paused
        self.train_seconds += time.monotonic() - started - paused_s
        return step

    def _log(self, split: str, step: int, values: dict[str, Any], **extra: Any) -> None:
        if self.sinks is not None:
            self.sinks.write(split, step, {**values, **extra})
            if split == "train":
                self.sinks.advance(step, loss=f"{values['loss']:.3f}", acc_len=f"{values['acceptance_length']:.2f}")

    def _evaluate(self, step: int, split: str = "eval") -> None:
        """TTT metrics on the held-out rows, or ("fit") on up to --eval-max-batches training rows
        (all ranks; padding rows are run but not counted)."""
        data = self.eval_data if split == "eval" else self.fit_data
        if not len(data):
            return
        window = MetricWindow(self.cfg.draft.ttt_length, self.cfg.monitoring.num_spec_tokens)
        self.engine.eval()
        with torch.no_grad():
            for i in range(len(data)):
                batch = data[i]
                self._note_skipped(batch["skipped"])
                res = self.engine(_to_device(batch, self.ctx.device, self.inputs.store.dtype))
                if batch["counted"]:
                    window.add(res, batch["num_tokens"], len(batch["skipped"]))
        self.engine.train()
        self._log(split, step, window.summary(self.cfg.draft.loss_decay, self.ctx.device))

    def _save(self, step: int) -> None:
        state = {"step": step, "loader": self.schedule.position(step * self.cfg.optimizer.grad_accum),
                 "total_steps": self.schedule.total_steps, "seed": self.cfg.schedule.seed}

        def snapshot(step_dir: Path, weights: dict[str, torch.Tensor]) -> None:
            save_draft_snapshot(step_dir, weights, self.inputs.draft_config, self.vocab,
                                list(self.inputs.draft_config.aux_layer_ids), self.inputs.target_info)

        save_checkpoint(self.engine, self.run_dir, step, state, self.ctx.rank, snapshot, self.cfg.checkpointing.keep_checkpoints)


def train(cfg: TrainConfig, inputs: TrainInputs) -> int:
    """Entry of every training process: join the job, hold the run lock on rank 0, train."""
    ctx = init_distributed()
    check_run_dir(cfg, ctx.world)  # every rank fails alike on a mismatched resume
    lock = FileLock(run_lock_path(cfg)) if ctx.rank == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        with ResourceMeter() as meter:
            return Trainer(cfg, inputs, ctx).run(meter)
    finally:
        if lock is not None:
            lock.release()
        dist.destroy_process_group()
