"""Model FLOPs of one trained token, from the draft's shapes (the numerator of training's MFU).

A matmul of an [n, a] input with an [a, b] weight costs 2ab FLOPs per row. Per token and step:

- ``fc`` (3 aux states -> hidden), once per token: 2 * 3Ht * H;
- each of the ``ttt_length`` unrolled steps runs the decoder layer and ``lm_head`` again:
  q/k/v from the 2H input (embedding and hidden concatenated), o, the gated MLP (3 matrices),
  ``lm_head`` over the draft vocab, and attention: scores and values, 2 * 2 * heads * head_dim
  per key, over the half row a causal token sees on average plus the k earlier steps' keys.

Training is forward + backward = 3x the forward (the backward computes gradients of inputs and
of weights). The frozen teacher (the target's lm_head over the full vocab at loss positions) and
elementwise work (norms, RoPE, softmax) are not counted: the resulting MFU is a lower bound of
what the device did.
"""

from __future__ import annotations

from modeling.draft.config import DraftConfig


def draft_forward_flops_per_token(cfg: DraftConfig, ttt_length: int, row_tokens: int) -> float:
    """Forward FLOPs per token of a packed row of ``row_tokens`` over all TTT steps."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    fc = 2 * 3 * cfg.target_hidden_size * h
    layer = 2 * 2 * h * (q + 2 * kv) + 2 * q * h + 2 * 3 * h * cfg.intermediate_size
    head = 2 * h * cfg.draft_vocab_size
    attention = sum(2 * 2 * q * (row_tokens / 2 + k) for k in range(ttt_length))
    return fc + ttt_length * (layer + head) + attention


def draft_train_flops_per_token(cfg: DraftConfig, ttt_length: int, row_tokens: int) -> float:
    """Forward + backward FLOPs per trained token."""
    return 3 * draft_forward_flops_per_token(cfg, ttt_length, row_tokens)


def draft_parameter_count(cfg: DraftConfig) -> int:
    """Trainable parameters: fc, the decoder layer (attention, MLP, its input, hidden and post-attention
    norms), final norm and lm_head (the frozen embedding table is not trained)."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    attention = 2 * h * (q + 2 * kv) + q * h
    mlp = 3 * h * cfg.intermediate_size
    return 3 * cfg.target_hidden_size * h + attention + mlp + 4 * h + h * cfg.draft_vocab_size
