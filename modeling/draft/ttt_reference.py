"""Plain TTT loss, written the way the public trainers unroll it: the reference ``ttt_loss`` is checked
against (tests/test_draft.py) and timed against (benchmarks/bench_ttt_step.py); training never runs it.

Every step runs the whole [B, S] grid, appends its keys/values to a cache, concatenates
the cache to (k+1)*S keys and masks it with an explicit [S, (k+1)S] matrix (block-diagonal
causal for step 0, identity for each later step). The teacher is the full-vocab softmax
at every position, and ids, teacher and mask are shifted one position left per step.
Same alignment and normalisation as ``modeling.draft.ttt.ttt_loss``, so the two must agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from modeling.draft.model import Eagle3Draft, apply_rotary
from modeling.draft.ttt import TTTResult, chain_stats, simulated_acceptance


def _left(x: Tensor, fill: float | int | bool = 0) -> Tensor:
    """Shift one position left along dim 1 (the next position's value), padding the end."""
    pad = torch.full_like(x[:, :1], fill)
    return torch.cat((x[:, 1:], pad), dim=1)


def ttt_loss_reference(draft: Eagle3Draft, input_ids: Tensor, loss_mask: Tensor, aux_hidden: Tensor,
                       target_hidden: Tensor, target_lm_head: Tensor, *,
                       attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                       ttt_length: int = 7, loss_decay: float = 0.8) -> TTTResult:
    """Reference TTT loss; same arguments and result as ``modeling.draft.ttt.ttt_loss``."""
    b, s = input_ids.shape
    cfg, layer = draft.config, draft.midlayer
    attn, d = layer.self_attn, cfg.head_dim
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    pos = position_ids.long() if position_ids is not None else torch.arange(s).expand(b, s)
    seg = torch.cumsum((pos == 0).long(), dim=1)
    if attention_mask is not None:
        seg = seg.masked_fill(attention_mask == 0, -1)

    with torch.no_grad():
        logits_t = (target_hidden.to(target_lm_head.dtype) @ target_lm_head.T).float()
        tgt_tok = _left(logits_t.argmax(-1))
        tgt_p = _left(torch.softmax(logits_t[..., draft.t2d], dim=-1))
        del logits_t
    ids_in = _left(input_ids)
    pred_ok = _left(_left(loss_mask.bool() & (seg >= 0), False), False)  # token t+2 supervised
    pred_seg = _left(_left(seg, -2), -2)

    same = seg.unsqueeze(2) == seg.unsqueeze(1)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    block0 = same & causal
    eye = torch.eye(s, dtype=torch.bool).expand(b, s, s)

    hidden = draft.combine_hidden_states(aux_hidden)
    cache_k: list[Tensor] = []
    cache_v: list[Tensor] = []
    total = torch.zeros(())
    sums, corrects, counts, loss_counts = [], [], [], []
    evaluated0 = pred_ok & (pred_seg == seg)
    alive, chain_len = evaluated0.clone(), torch.zeros(b, s, dtype=torch.long)
    for k in range(ttt_length):
        evaluated = pred_ok & (pred_seg == seg)  # counted in the accuracy, in the draft vocab or not
        pmask = evaluated & draft.t2d[tgt_tok]  # carries loss
        x, residual = layer.attn_input(draft.embed(ids_in), hidden)
        cos, sin = draft.rotary(pos + k)
        q = apply_rotary(attn.q_proj(x).view(b, s, -1, d), cos, sin)
        cache_k.append(apply_rotary(attn.k_proj(x).view(b, s, -1, d), cos, sin))
        cache_v.append(attn.v_proj(x).view(b, s, -1, d))
        keys = torch.cat(cache_k, dim=1).repeat_interleave(groups, dim=2)
        values = torch.cat(cache_v, dim=1).repeat_interleave(groups, dim=2)
        mask = torch.cat([block0] + [eye] * k, dim=2)  # [B, S, (k+1)S]
        scores = torch.einsum("bshd,bthd->bhst", q, keys).float() * draft.scale
        weights = torch.softmax(scores.masked_fill(~mask.unsqueeze(1), float("-inf")), dim=-1)
        out = torch.einsum("bhst,bthd->bshd", weights.to(values.dtype), values)
        mlp_out, residual = layer.finish(out.reshape(b, s, -1), residual)
        normed, hidden = draft.norm(mlp_out, residual)
        logp = F.log_softmax(draft.compute_logits(normed).float(), dim=-1)
        ce_sum = (-(tgt_p * logp).sum(-1) * pmask).sum()
        n = int(pmask.sum())
        total = total + loss_decay**k * ce_sum / max(n, 1)
        with torch.no_grad():
            hit = draft.draft_to_target(logp.argmax(-1)) == tgt_tok
            sums.append(float(ce_sum))
            corrects.append(int((hit & pmask).sum()))
            counts.append(int(evaluated.sum()))
            loss_counts.append(n)
            alive &= hit & pmask
            chain_len += alive
        # Shift ids, teacher AND mask together (SpecForge issue #885 shifted only some).
        ids_in, tgt_tok, tgt_p = _left(ids_in), _left(tgt_tok), _left(tgt_p)
        pred_ok, pred_seg = _left(pred_ok, False), _left(pred_seg, -2)
    loss_sum = torch.tensor(sums)
    correct, count, loss_count = torch.tensor(corrects), torch.tensor(counts), torch.tensor(loss_counts)
    acc = torch.where(count > 0, correct.float() / count.clamp_min(1), 0.0)
    return TTTResult(total, loss_sum / loss_count.clamp_min(1), loss_sum, correct, count, acc,
                     simulated_acceptance(acc), loss_count, chain_stats(chain_len, evaluated0, seg, ttt_length))
