"""The draft as DeepSpeed trains it: module wrapper, DeepSpeed config and learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.draft.config import DraftConfig
from modeling.draft.model import Eagle3Draft
from modeling.draft.ttt import TTTResult, ttt_loss
from modeling.training.config import TrainConfig

GRAD_CLIP = 0.5  # EAGLE's ds_config
ADAM_BETAS = (0.9, 0.999)  # torch AdamW defaults, as SpecForge uses them


class TrainDraft(Eagle3Draft):
    """``Eagle3Draft`` whose frozen embedding is a plain tensor, not a parameter.

    ZeRO therefore never shards, casts or checkpoints it (Qwen2-Audio-7B: 156k x 4096 bf16 =
    1.3 GB, which ZeRO-3 would otherwise all-gather for each of the 7 TTT steps and write into
    every checkpoint). ``audio_rows`` switches ``embed`` to the encoder-embedding mode: ids
    ``>= vocab_size`` then name rows of that table (see :func:`with_audio_ids`).
    """

    def __init__(self, cfg: DraftConfig, embed_table: Tensor):
        super().__init__(cfg)
        del self.embed_tokens
        if tuple(embed_table.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise ValueError(f"target embedding {tuple(embed_table.shape)} does not fit the draft "
                             f"({cfg.vocab_size}, {cfg.hidden_size})")
        self.embed_table = embed_table.detach()
        self.audio_rows: Tensor | None = None

    def embed(self, ids: Tensor) -> Tensor:
        """Target embeddings in the draft's compute dtype; audio rows where ids point past the vocab."""
        if self.audio_rows is None:
            return F.embedding(ids, self.embed_table).to(self.fc.weight.dtype)
        audio = ids >= self.config.vocab_size
        out = F.embedding(ids.masked_fill(audio, 0), self.embed_table)
        out[audio] = self.audio_rows[ids[audio] - self.config.vocab_size].to(out.dtype)
        return out.to(self.fc.weight.dtype)


def init_head_from_target(draft: Eagle3Draft, target_lm_head: Tensor, target_norm: Tensor) -> None:
    """Start the draft's head where the target's is: its lm_head rows of the draft vocab (``d2t``
    must be set) and its final norm. A draft trained on a few thousand answer tokens otherwise
    learns an output row only for tokens it saw often; copied rows already separate every token
    of the draft vocab. Trained tiny target, 400 clips, 200 steps: held-out walk acceptance at
    k=4 2.31 vs 2.17 from a random head."""
    rows = target_lm_head[draft.draft_to_target(torch.arange(draft.config.draft_vocab_size))]
    with torch.no_grad():
        draft.lm_head.weight.copy_(rows.to(draft.lm_head.weight.dtype))
        draft.norm.weight.copy_(target_norm.to(draft.norm.weight.dtype))


def with_audio_ids(input_ids: Tensor, positions: Tensor, vocab_size: int) -> Tensor:
    """Ids where audio position i (row-major in the packed batch) becomes ``vocab_size + i``.

    The TTT loss reads ids only through ``draft.embed`` (shifted per step), so this tags each
    audio token with its stored embedding row without changing the loss code.
    """
    ids = input_ids.clone()
    ids.view(-1)[positions] = vocab_size + torch.arange(positions.numel(), device=ids.device)
    return ids


class TrainModule(nn.Module):
    """What the DeepSpeed engine wraps: ``forward(batch)`` is the TTT loss of the draft.

    Running the loss inside one module forward keeps ZeRO-3's parameter fetching in the
    hook order it expects. The target lm_head (the frozen teacher) is a plain tensor.
    """

    def __init__(self, draft: TrainDraft, target_lm_head: Tensor, ttt_length: int, loss_decay: float):
        super().__init__()
        self.draft = draft
        self.target_lm_head = target_lm_head.detach()
        self.ttt_length, self.loss_decay = ttt_length, loss_decay

    def to_device(self, device: torch.device | str) -> None:
        """Move the two frozen tables (DeepSpeed moves only parameters and buffers)."""
        self.target_lm_head = self.target_lm_head.to(device)
        self.draft.embed_table = self.draft.embed_table.to(device)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The TTT loss and its per-step sums (a dict: ZeRO-3's hooks see only tensors in containers)."""
        res = self._ttt(batch)
        assert res.chain is not None and res.step_loss_count is not None and res.teacher_agreement is not None
        return {"loss": res.loss, "step_loss_sum": res.step_loss_sum, "step_correct": res.step_correct,
                "step_count": res.step_count, "step_loss_count": res.step_loss_count,
                "chain": res.chain.as_tensor(), "teacher_agreement": res.teacher_agreement}

    def _ttt(self, batch: dict[str, Any]) -> TTTResult:
        ids = batch["input_ids"]
        if "audio_positions" in batch:
            ids = with_audio_ids(ids, batch["audio_positions"], self.draft.config.vocab_size)
            self.draft.audio_rows = batch["audio_embeds"]
        try:
            return ttt_loss(self.draft, ids, batch["loss_mask"], batch["aux_hidden"], batch["target_hidden"],
                            self.target_lm_head, position_ids=batch["position_ids"],
                            ttt_length=self.ttt_length, loss_decay=self.loss_decay)
        finally:
            self.draft.audio_rows = None


class WarmupCosine:
    """LR factor for scheduler step s: linear warmup to 1, then cosine to 0 at ``total``."""

    def __init__(self, total: int, warmup: int):
        self.total, self.warmup = total, warmup

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - self.warmup) / span)))


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length: ``ceil(ratio * total)`` (1.5% of 10k steps = 150)."""
    return math.ceil(warmup_ratio * total_steps)


def use_bf16(cfg: TrainConfig, on_cpu: bool) -> bool:
    """bf16 params + fp32 master weights (``--precision``; auto: on GPUs only)."""
    return cfg.launch.precision == "bf16" or (cfg.launch.precision == "auto" and not on_cpu)


def deepspeed_config(cfg: TrainConfig, on_cpu: bool) -> dict[str, Any]:
    """ZeRO ``cfg.launch.zero_stage``, bf16 (see :func:`use_bf16`) or fp32, AdamW, clip 0.5."""
    zero: dict[str, Any] = {"stage": cfg.launch.zero_stage, "contiguous_gradients": True,
                            "overlap_comm": not on_cpu}
    if cfg.launch.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not on_cpu}
    adam = {"lr": cfg.optimizer.lr, "betas": list(ADAM_BETAS), "eps": 1e-8, "weight_decay": cfg.optimizer.weight_decay}
    if not cfg.launch.offload_optimizer:
        # torch's AdamW (foreach kernels on GPUs): DeepSpeed's FusedAdam would JIT-build with nvcc and
        # does not exist on CPU. Offload uses DeepSpeedCPUAdam (a C++ build, ~2.5 min on first use here).
        adam["torch_adam"] = True
    return {
        "train_micro_batch_size_per_gpu": 1,  # one packed row of --batch-tokens
        "gradient_accumulation_steps": cfg.optimizer.grad_accum,
        "gradient_clipping": GRAD_CLIP,
        "bf16": {"enabled": use_bf16(cfg, on_cpu)},
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,  # the trainer logs its own metrics
        "wall_clock_breakdown": False,
    }
