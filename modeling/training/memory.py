"""Training memory per process from the draft's shapes (docs/memory.md, "Training").

Four parts, in bytes per training process:

- ``frozen``: the target's embedding table and lm_head as read (``table_bytes`` per value), plus
  the teacher's copy of the lm_head in the compute dtype (a no-op cast in fp32 keeps one copy);
- ``states``: ZeRO's model states for P trainable parameters over N processes. fp32: params 4P,
  grads 4P, AdamW m and v 8P; bf16: params 2P and grads 2P, fp32 master weights 4P and AdamW 8P.
  ZeRO-1 partitions the optimizer states (AdamW, master weights), ZeRO-2 also the grads, ZeRO-3
  also the params, each to 1/N per process;
- ``activations``: one packed row of S tokens kept for the backward, per token the row's inputs
  (3 aux states, the target's final state, in fp32), and per TTT step the layer's tensors
  (the 2H input, q/k/v, attention output, o, three norms, the MLP's gate, up, product and down)
  and the logits' softmax and its gradient over the draft vocab plus the teacher's probabilities;
  and the attention probabilities CPU attention materialises for the backward, heads x S x S
  fp32 per step: an upper bound, since only the evaluated (loss) query rows are kept; a flash
  kernel on GPUs keeps none (``quadratic=False``);
- ``runtime``: what the process holds before the model (Python, torch, DeepSpeed, the store's
  index): measured, not modelled (:func:`benchmarks.bench_memory` reads it off a process).

It is a model of the large terms, not an allocator trace: temporaries of the forward (one step's
logits before the loss), allocator caching and DeepSpeed's buckets are not in it.
"""

from __future__ import annotations

from typing import Any

from modeling.draft.config import DraftConfig
from modeling.training.flops import draft_parameter_count

FP32 = 4


def zero_state_bytes(params: int, zero_stage: int, world: int, bf16: bool) -> int:
    """Model states per process under ZeRO ``zero_stage`` over ``world`` processes."""
    weights, grads, optimizer = (2 * params, 2 * params, 12 * params) if bf16 else (4 * params, 4 * params, 8 * params)
    return int(optimizer / world + (grads / world if zero_stage >= 2 else grads)
               + (weights / world if zero_stage >= 3 else weights))


def activation_bytes(cfg: DraftConfig, row_tokens: int, ttt_length: int, bf16: bool,
                     quadratic: bool = True) -> int:
    """Activations one packed row keeps for its backward."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.draft_vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    value = 2 if bf16 else FP32
    inputs = FP32 * 4 * cfg.target_hidden_size + value * h  # aux states + target state (fp32), fc output
    layer = value * (2 * h + q + 2 * kv + q + h + 3 * h + 4 * i + h)
    logits = FP32 * 3 * v  # log-softmax, its gradient, the teacher's probabilities
    linear = row_tokens * (inputs + ttt_length * (layer + logits))
    attention = ttt_length * cfg.num_attention_heads * row_tokens * row_tokens * FP32 if quadratic else 0
    return int(linear + attention)


def training_memory(cfg: DraftConfig, *, vocab_size: int, row_tokens: int, ttt_length: int, zero_stage: int,
                    world: int, bf16: bool, table_bytes: int, quadratic: bool = True) -> dict[str, Any]:
    """The model's parts and total (bytes per process, without the runtime)."""
    params = draft_parameter_count(cfg)
    tables = vocab_size * (cfg.hidden_size + cfg.target_hidden_size) * table_bytes
    teacher = 0 if (table_bytes == FP32 and not bf16) else vocab_size * cfg.target_hidden_size * (2 if bf16 else FP32)
    parts = {"params": params, "frozen": tables + teacher, "states": zero_state_bytes(params, zero_stage, world, bf16),
             "activations": activation_bytes(cfg, row_tokens, ttt_length, bf16, quadratic)}
    parts["total"] = parts["frozen"] + parts["states"] + parts["activations"]
    return parts
