"""EAGLE-3 training-time-test (TTT) loss over a packed batch.

Alignment (raw, unshifted per-token inputs): at step k the draft query for position t
represents serving position t+k. It embeds token ``ids[t+k+1]``, carries the draft's own
pre-norm hidden from step k-1 (step 0: ``fc(aux[t])``), sees step-0 keys of its sample at
positions <= t plus its own keys from steps 1..k, and is trained towards the target's
distribution at j = t+k+1 (``lm_head(target_hidden[j])``), which predicts token t+k+2.
Supervision: token t+k+2 has ``loss_mask == 1`` and is in the same sample as t (the position
is *evaluated*), and the target's argmax at j lies in the draft vocab (it also carries *loss*).
An evaluated position whose target token the draft vocab lacks is a miss in every accuracy: the
draft can never propose that token. Ids, teacher and mask all move with k.

Acceptance estimates (all for a chain draft of k tokens, k = 1..T):
- ``acceptance_length``: 1 + sum_k prod_{i<=k} acc_i, as if steps were independent (reads high).
- chain: from each start position, the number of consecutive correct steps (capped at k), mean + 1.
- walk: a greedy decode over each answer as a serving engine runs it: the first draft starts where
  the target has produced the answer's first token, each draft accepts its correct prefix, the
  target adds one token, and the next draft starts after it; 1 + accepted / drafts. This is the
  number vLLM reports as mean acceptance length when the served target repeats the data.

Why it is cheaper than the public trainers' loop (:mod:`modeling.draft.ttt_reference`):
- Only *active* positions (supervised at some step >= k) run queries, o_proj, MLP and
  lm_head at step k; step 0 still projects keys/values for every position. Audio prompts
  are mostly unsupervised audio frames, so most positions drop out at once.
- The teacher (full-vocab logits, argmax, draft-vocab softmax) is computed only at
  supervised target positions, in row chunks, without gradients.
- Cross-step attention never builds the [S, (k+1)S] mask or score matrix: the diagonal
  keys are elementwise dot products folded into one SDPA call (see ``segment_attention``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from modeling.draft.model import Eagle3Draft, apply_rotary, segment_attention


@dataclass
class TTTResult:
    """Loss and metrics of one TTT unroll; everything but ``loss`` is detached."""

    loss: Tensor
    """Scalar to backprop: sum_k decay**k * step_loss[k]."""
    step_loss: Tensor
    """[T] mean soft cross-entropy over the supervised positions of each step."""
    step_loss_sum: Tensor
    """[T] summed cross-entropy (adds up across micro-batches and packed samples)."""
    step_correct: Tensor
    """[T] positions where the draft argmax (mapped by d2t) equals the target argmax."""
    step_count: Tensor
    """[T] evaluated positions per step (target token in the draft vocab or not)."""
    step_accuracy: Tensor
    """[T] step_correct / step_count (0 where a step has no positions)."""
    acceptance_length: float
    """1 + sum_k prod_{i<=k} acc_i (independent steps: an optimistic estimate)."""
    step_loss_count: Tensor | None = None
    """[T] positions carrying loss (evaluated and target token in the draft vocab)."""
    chain: ChainStats | None = None
    """Chain and decode-walk acceptance sums for k = 1..T."""
    teacher_agreement: Tensor | None = None
    """[2] (positions where the teacher's argmax is the data's next token, supervised positions):
    below 1 where the store's hidden states do not reproduce the answers stage 1 wrote."""


@dataclass
class ChainStats:
    """Sums behind the chain and walk estimates, for draft lengths k = 1..T (index k - 1)."""

    chain_accepted: Tensor  # [T] sum over start positions of min(consecutive correct, k)
    chain_starts: Tensor  # [1] start positions
    walk_accepted: Tensor  # [T] accepted draft tokens in the decode walk
    walk_drafts: Tensor  # [T] drafts in the decode walk

    def as_tensor(self) -> Tensor:
        return torch.cat([self.chain_accepted, self.chain_starts, self.walk_accepted, self.walk_drafts]).double()


def chain_stats(chain_len: Tensor, evaluated: Tensor, seg: Tensor, ttt_length: int) -> ChainStats:
    """Chain and walk sums from per-position chain lengths [B, S] (consecutive correct steps from
    step 0) and the positions evaluated at step 0 [B, S]. Within one answer the evaluated positions
    are contiguous; the first of them predicts the answer's second token from its first, which the
    target itself produced, so drafts start one position later."""
    t = ttt_length
    chain_acc = torch.zeros(t, dtype=torch.float64)
    walk_acc = torch.zeros(t, dtype=torch.float64)
    walk_drafts = torch.zeros(t, dtype=torch.float64)
    starts = 0
    lengths = chain_len.detach().cpu().numpy()
    ev = evaluated.detach().cpu().numpy()
    sg = seg.detach().cpu().numpy()
    for b in range(ev.shape[0]):
        pos = np.flatnonzero(ev[b])
        if pos.size == 0:
            continue
        breaks = np.flatnonzero((np.diff(pos) != 1) | (sg[b, pos[1:]] != sg[b, pos[:-1]])) + 1
        for run in np.split(pos, breaks):
            drafts_from = run[1:]  # draft start positions of this answer, in order
            if drafts_from.size == 0:
                continue
            c = lengths[b, drafts_from]
            starts += drafts_from.size
            for k in range(1, t + 1):
                chain_acc[k - 1] += float(np.minimum(c, k).sum())
                i, n_drafts, accepted = 0, 0, 0
                while i < c.size:
                    a = min(int(c[i]), k)
                    n_drafts += 1
                    accepted += a
                    i += a + 1
                walk_acc[k - 1] += accepted
                walk_drafts[k - 1] += n_drafts
    return ChainStats(chain_acc, torch.tensor([float(starts)], dtype=torch.float64), walk_acc, walk_drafts)


def chain_estimates(sums: Tensor, ttt_length: int) -> tuple[list[float], list[float]]:
    """(chain, walk) acceptance lengths for k = 1..T from summed :meth:`ChainStats.as_tensor`."""
    t = ttt_length
    chain_acc, starts, walk_acc, walk_drafts = sums[:t], sums[t], sums[t + 1:2 * t + 1], sums[2 * t + 1:3 * t + 1]
    chain = [1.0 + float(a) / float(starts) if starts > 0 else 1.0 for a in chain_acc]
    walk = [1.0 + float(a) / float(d) if d > 0 else 1.0 for a, d in zip(walk_acc, walk_drafts, strict=True)]
    return chain, walk


def simulated_acceptance(step_accuracy: Tensor) -> float:
    """1 (the target's bonus token) + expected accepted drafts if step i is right w.p. acc_i."""
    return 1.0 + float(torch.cumprod(step_accuracy.double(), 0).sum())


def packing_layout(input_ids: Tensor, attention_mask: Tensor | None,
                   position_ids: Tensor | None) -> tuple[Tensor, Tensor]:
    """(positions, sample ids) [B, S]: a sample starts where position_ids is 0; padding gets -1."""
    b, s = input_ids.shape
    dev = input_ids.device
    pos = position_ids.long() if position_ids is not None else torch.arange(s, device=dev).expand(b, s)
    seg = torch.cumsum((pos == 0).long(), dim=1)
    if attention_mask is not None:
        seg = seg.masked_fill(attention_mask == 0, -1)
    return pos, seg


@torch.no_grad()
def teacher_targets(hidden: Tensor, lm_head: Tensor, t2d: Tensor,
                    chunk: int = 512) -> tuple[Tensor, Tensor, Tensor]:
    """Target argmax [N], draft-vocab probabilities [N, Vd] (fp32) and in-draft flag [N].

    The matmul runs in ``lm_head``'s dtype (pass fp32 for an fp32 teacher); a 512-row chunk
    of 156k-vocab fp32 logits is 320 MB.
    """
    draft_cols = t2d.nonzero().squeeze(1)
    toks, probs = [], []
    for rows in hidden.split(chunk):
        logits = (rows.to(lm_head.dtype) @ lm_head.T).float()
        toks.append(logits.argmax(-1))
        probs.append(torch.softmax(logits[:, draft_cols], dim=-1))
    if not toks:
        return (torch.empty(0, dtype=torch.long, device=hidden.device),
                torch.empty(0, draft_cols.numel(), device=hidden.device), t2d.new_zeros(0))
    tok = torch.cat(toks)
    return tok, torch.cat(probs), t2d[tok]


def _shift(x: Tensor, n: int, fill: int = 0) -> Tensor:
    """x[:, t + n] at t, ``fill`` past the end."""
    out = torch.full_like(x, fill)
    if n < x.shape[1]:
        out[:, : x.shape[1] - n] = x[:, n:]
    return out


def ttt_loss(draft: Eagle3Draft, input_ids: Tensor, loss_mask: Tensor, aux_hidden: Tensor,
             target_hidden: Tensor, target_lm_head: Tensor, *, attention_mask: Tensor | None = None,
             position_ids: Tensor | None = None, ttt_length: int = 7, loss_decay: float = 0.8,
             teacher_chunk: int = 512) -> TTTResult:
    """TTT loss of ``draft`` on a packed batch.

    input_ids, loss_mask [B, S]; aux_hidden [B, S, 3*Ht]; target_hidden [B, S, Ht] is the
    target's final post-norm hidden state (only read where supervision needs it, so it may
    be zero elsewhere); target_lm_head [vocab, Ht] frozen. Packed samples restart
    ``position_ids`` at 0; ``attention_mask == 0`` marks padding.
    """
    b, s = input_ids.shape
    cfg, layer = draft.config, draft.midlayer
    attn, d = layer.self_attn, cfg.head_dim
    pos, seg = packing_layout(input_ids, attention_mask, position_ids)
    lm = loss_mask.bool() & (seg >= 0)

    # Teacher row for each target index j whose next token is supervised in the same sample.
    sup = torch.zeros_like(lm)
    sup[:, :-1] = lm[:, 1:] & (seg[:, 1:] == seg[:, :-1])
    sup_idx = sup.reshape(-1).nonzero().squeeze(1)
    tok, probs, ok = teacher_targets(target_hidden.reshape(b * s, -1)[sup_idx], target_lm_head,
                                     draft.t2d, teacher_chunk)
    dev = input_ids.device
    agree = torch.tensor([int((tok == input_ids.reshape(-1)[sup_idx + 1]).sum()), int(sup_idx.numel())])
    trow = torch.full((b * s,), -1, dtype=torch.long, device=dev)
    trow[sup_idx[ok]] = torch.arange(int(ok.sum()), device=dev)
    tok, probs, trow = tok[ok], probs[ok], trow.view(b, s)

    # Per step: teacher row at position t (j = t+k+1, same sample) or -1; active = any later step.
    same = [seg == _shift(seg, k + 1, -2) for k in range(ttt_length)]
    steps = [torch.where(same[k], _shift(trow, k + 1, -1), -1) for k in range(ttt_length)]
    evaluated = [same[k] & _shift(sup, k + 1, 0).bool() for k in range(ttt_length)]
    active = [r >= 0 for r in steps]
    for k in range(ttt_length - 2, -1, -1):
        active[k] = active[k] | active[k + 1]

    zero = torch.zeros(ttt_length)
    count = torch.tensor([int(e.sum()) for e in evaluated], dtype=torch.long)
    alive = evaluated[0].reshape(-1).clone()  # still correct at every step so far
    chain_len = torch.zeros(b * s, dtype=torch.long, device=dev)

    def finish(loss: Tensor, loss_sum: Tensor, correct: Tensor, loss_count: Tensor) -> TTTResult:
        acc = torch.where(count > 0, correct.float() / count.clamp_min(1), 0.0)
        return TTTResult(loss, loss_sum / loss_count.clamp_min(1), loss_sum, correct, count, acc,
                         simulated_acceptance(acc), loss_count,
                         chain_stats(chain_len.view(b, s), evaluated[0], seg, ttt_length), agree)

    act = active[0].reshape(-1).nonzero().squeeze(1)
    if act.numel() == 0:  # keep a graph so backward() and DDP still work
        return finish(draft.lm_head.weight.sum() * 0.0, zero, zero.long(), zero.long())

    # Step 0: keys/values for every position, queries only where needed.
    x, residual = layer.attn_input(draft.embed(_shift(input_ids, 1)), draft.combine_hidden_states(aux_hidden))
    cos, sin = draft.rotary(pos)
    keys = apply_rotary(attn.k_proj(x).view(b, s, -1, d), cos, sin)
    values = attn.v_proj(x).view(b, s, -1, d)
    xq, res = x.reshape(b * s, -1)[act], residual.reshape(b * s, -1)[act]
    q = apply_rotary(attn.q_proj(xq).view(act.numel(), -1, d), cos.reshape(b * s, -1)[act],
                     sin.reshape(b * s, -1)[act])
    diag_k: list[Tensor] = []
    diag_v: list[Tensor] = []
    hidden: Tensor | None = None
    total = draft.lm_head.weight.new_zeros((), dtype=torch.float32)
    loss_sum, correct, loss_count = zero.clone(), zero.long(), zero.long()
    for k in range(ttt_length):
        n = act.numel()
        if k > 0:
            assert hidden is not None
            xk, res = layer.attn_input(draft.embed(_shift(input_ids, k + 1).reshape(-1)[act]), hidden)
            cos, sin = draft.rotary(pos.reshape(-1)[act] + k)
            q = apply_rotary(attn.q_proj(xk).view(n, -1, d), cos, sin)
            diag_k.append(apply_rotary(attn.k_proj(xk).view(n, -1, d), cos, sin))
            diag_v.append(attn.v_proj(xk).view(n, -1, d))
        out = segment_attention(q, act // s, act % s, keys, values, seg, draft.scale, diag_k, diag_v)
        mlp_out, res = layer.finish(out.reshape(n, -1), res)
        normed, hidden = draft.norm(mlp_out, res)

        rows = steps[k].reshape(-1)[act]
        sel = (rows >= 0).nonzero().squeeze(1)
        logp = F.log_softmax(draft.compute_logits(normed[sel]).float(), dim=-1)
        ce = -(probs[rows[sel]] * logp).sum()
        total = total + loss_decay**k * ce / max(sel.numel(), 1)
        with torch.no_grad():
            hit = draft.draft_to_target(logp.argmax(-1)) == tok[rows[sel]]
            loss_sum[k], loss_count[k] = ce.detach().float(), sel.numel()
            correct[k] = hit.sum()
            right = torch.zeros_like(alive)
            right[act[sel]] = hit
            alive &= right  # an evaluated position without loss (target token outside the vocab) is a miss
            chain_len += alive

        if k + 1 < ttt_length:  # drop positions with no supervision left
            keep = active[k + 1].reshape(-1)[act]
            if not bool(keep.any()):
                break
            if not bool(keep.all()):
                act, hidden = act[keep], hidden[keep]
                diag_k = [t[keep] for t in diag_k]
                diag_v = [t[keep] for t in diag_v]
    return finish(total, loss_sum, correct, loss_count)
