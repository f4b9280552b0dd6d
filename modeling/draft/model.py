"""The EAGLE-3 draft model, numerically mirroring vLLM's ``llama_eagle3`` draft.

What is matched against vLLM 0.32 (``model_executor/models/llama_eagle3.py``):
- RMSNorm in fp32, cast to the weight dtype before the weight multiply; the residual adds
  of ``post_attention_layernorm`` and the final ``norm`` are fused "add then norm" in fp32.
- The hidden passed to the next draft step is the *pre-norm* sum (vLLM's ``aux_output``);
  logits come from ``lm_head(norm(...))`` over the draft vocab, mapped by ``d2t``.
- RoPE: default rope type, neox style (rotate halves), cos/sin built in fp32 from integer
  positions and cast to the activation dtype; attention scale ``head_dim ** -0.5``.
- The parameter names are the checkpoint names (``midlayer.*``); vLLM renames them on load.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.draft.config import DraftConfig


def _norm_fp32(x32: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32.to(weight.dtype) * weight).to(out_dtype)


class RMSNorm(nn.Module):
    """RMSNorm with vLLM's numerics; ``forward(x, residual)`` is its fused add-and-norm."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if residual is None:
            return _norm_fp32(x.float(), self.weight, self.eps, x.dtype)
        total = x.float() + residual.float()
        return _norm_fp32(total, self.weight, self.eps, x.dtype), total.to(x.dtype)


class Rotary(nn.Module):
    """Default (unscaled) RoPE tables; no persistent state, so nothing is exported."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin of shape [*positions.shape, head_dim // 2] in fp32."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        return freqs.cos(), freqs.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Neox-style rotation of x [..., heads, D] with cos/sin [..., D/2] (cast like vLLM)."""
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Eagle3Attention(nn.Module):
    """Projections only; the attention pattern lives in ``segment_attention``."""

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(2 * h, cfg.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(2 * h, cfg.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(2 * h, cfg.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=False)


class Eagle3MLP(nn.Module):
    """SiLU-gated MLP (vLLM fuses gate/up; same math)."""

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Eagle3DecoderLayer(nn.Module):
    """The draft's single decoder layer, split so TTT can run parts on a subset of tokens."""

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        self.self_attn = Eagle3Attention(cfg)
        self.mlp = Eagle3MLP(cfg)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_before_residual = cfg.norm_before_residual

    def attn_input(self, embeds: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(x = [norm(emb), norm(hidden)] of width 2H, residual)."""
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        return torch.cat((self.input_layernorm(embeds), normed), dim=-1), residual

    def finish(self, attn: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """o_proj, fused add+norm, MLP: returns (mlp_out, residual) like vLLM's layer."""
        normed, residual = self.post_attention_layernorm(self.self_attn.o_proj(attn), residual)
        return self.mlp(normed), residual


def segment_attention(q: Tensor, q_rows: Tensor, q_cols: Tensor, keys: Tensor, values: Tensor,
                      segments: Tensor, scale: float, diag_k: list[Tensor] | None = None,
                      diag_v: list[Tensor] | None = None) -> Tensor:
    """Attention of scattered queries over per-row step-0 keys, plus per-query diagonal keys.

    q: [N, nh, D] for the tokens at (q_rows, q_cols), grouped by row in ascending order.
    keys/values: [B, S, nkv, D]. A query at column t of row b sees keys at columns <= t of
    row b with the same segment id (packing: block-diagonal causal). ``diag_k/diag_v``
    ([N, nkv, D] each, one per earlier TTT step) add keys that only their own query sees.
    The diagonal terms are fused into one SDPA call as "sink" keys: the query gets extra
    channels holding its diagonal dot products, each sink key is a unit vector on one such
    channel and its value a unit vector on one extra output channel, so SDPA returns the
    exact joint softmax and the diagonal weights without an [S, (k+1)S] mask.
    """
    n, nh, d = q.shape
    nkv = keys.shape[2]
    g = nh // nkv
    k = len(diag_k or [])
    if k:
        dk = torch.stack(diag_k, dim=2)  # [N, nkv, k, D]
        raw = torch.einsum("nvgd,nvkd->nvgk", q.view(n, nkv, g, d), dk).reshape(n, nh, k)
        q = torch.cat((q, raw), dim=-1)
        sink = F.pad(torch.eye(k, dtype=q.dtype, device=q.device), (d, 0)).expand(nkv, k, d + k)
    rows, counts = torch.unique_consecutive(q_rows, return_counts=True)
    outs, start = [], 0
    for row, cnt in zip(rows.tolist(), counts.tolist(), strict=True):
        cols = q_cols[start:start + cnt]
        length = int(cols.max()) + 1  # later keys are never visible
        seg = segments[row, :length]
        mask = (seg.unsqueeze(0) == seg[cols].unsqueeze(1)) & (
            torch.arange(length, device=q.device).unsqueeze(0) <= cols.unsqueeze(1))
        kb, vb = keys[row, :length].transpose(0, 1), values[row, :length].transpose(0, 1)
        if k:
            kb = torch.cat((F.pad(kb, (0, k)), sink), dim=1)
            vb = torch.cat((F.pad(vb, (0, k)), sink), dim=1)
            mask = F.pad(mask, (0, k), value=True)
        qb = q[start:start + cnt].transpose(0, 1)
        o = F.scaled_dot_product_attention(qb.unsqueeze(0), kb.unsqueeze(0), vb.unsqueeze(0),
                                           attn_mask=mask[None, None], scale=scale, enable_gqa=g > 1)
        outs.append(o[0].transpose(0, 1))
        start += cnt
    out = torch.cat(outs, dim=0)
    if not k:
        return out
    beta = out[..., d:].reshape(n, nkv, g, k)
    dv = torch.stack(diag_v, dim=2)  # [N, nkv, k, D]
    return out[..., :d] + torch.einsum("nvgk,nvkd->nvgd", beta, dv).reshape(n, nh, d)


class Eagle3Draft(nn.Module):
    """EAGLE-3 draft: frozen target embedding, ``fc`` over 3 aux states, one layer, draft head."""

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)  # the target's table, never trained
        self.fc = nn.Linear(3 * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.midlayer = Eagle3DecoderLayer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        t2d[: cfg.draft_vocab_size] = True  # identity mapping until a real vocab is set
        self.register_buffer("t2d", t2d)
        # The embedding is the target's: keep it out of checkpoints and tolerate its absence.
        self.register_state_dict_post_hook(_drop_embedding)
        self.register_load_state_dict_post_hook(_allow_missing_embedding)

    @property
    def scale(self) -> float:
        """Attention softmax scale, head_dim ** -0.5 as in vLLM."""
        return self.config.head_dim ** -0.5

    def set_vocab_mapping(self, d2t: Tensor, t2d: Tensor) -> None:
        """Install a draft vocab (offsets ``d2t`` [draft_vocab], mask ``t2d`` [vocab])."""
        if d2t.shape != self.d2t.shape or t2d.shape != self.t2d.shape:
            raise ValueError(f"vocab mapping shapes {tuple(d2t.shape)}/{tuple(t2d.shape)} do not match "
                             f"the draft's {tuple(self.d2t.shape)}/{tuple(self.t2d.shape)}")
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    def load_target_embedding(self, checkpoint_dir: str | Path) -> None:
        """Copy the target's input embedding table, reading only that tensor from disk."""
        from modeling.target_io.weights import read_target_embedding

        weight = read_target_embedding(checkpoint_dir)
        if weight.shape != self.embed_tokens.weight.shape:
            raise ValueError(f"target embedding {tuple(weight.shape)} does not fit the draft's "
                             f"{tuple(self.embed_tokens.weight.shape)}")
        with torch.no_grad():
            self.embed_tokens.weight.copy_(weight)

    def combine_hidden_states(self, aux_hidden: Tensor) -> Tensor:
        """fc over the concatenated aux hidden states [.., 3*Ht] -> [.., H]."""
        return self.fc(aux_hidden.to(self.fc.weight.dtype))

    def embed(self, ids: Tensor) -> Tensor:
        """Frozen target embeddings in the draft's compute dtype."""
        return self.embed_tokens(ids).to(self.fc.weight.dtype)

    def forward(self, input_ids: Tensor, hidden_states: Tensor, position_ids: Tensor | None = None,
                segment_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One draft pass over whole rows, as vLLM runs the draft on accepted tokens.

        input_ids [B, S] are the draft's inputs (token t+1 sits at position t);
        hidden_states [B, S, H] come from ``combine_hidden_states`` or an earlier pass.
        Rows are causal; ``segment_ids`` (default all 0) keeps packed samples apart.
        Returns (normed [B,S,H] for ``compute_logits``, pre-norm hidden for the next step).
        """
        b, s = input_ids.shape
        cfg = self.config
        dev = input_ids.device
        pos = position_ids if position_ids is not None else torch.arange(s, device=dev).expand(b, s)
        seg = segment_ids if segment_ids is not None else torch.zeros(b, s, dtype=torch.long, device=dev)
        x, residual = self.midlayer.attn_input(self.embed(input_ids), hidden_states)
        cos, sin = self.rotary(pos)
        attn = self.midlayer.self_attn
        q = apply_rotary(attn.q_proj(x).view(b, s, -1, cfg.head_dim), cos, sin)
        keys = apply_rotary(attn.k_proj(x).view(b, s, -1, cfg.head_dim), cos, sin)
        values = attn.v_proj(x).view(b, s, -1, cfg.head_dim)
        rows = torch.arange(b, device=dev).repeat_interleave(s)
        cols = torch.arange(s, device=dev).repeat(b)
        out = segment_attention(q.reshape(b * s, -1, cfg.head_dim), rows, cols, keys, values, seg, self.scale)
        mlp_out, residual = self.midlayer.finish(out.reshape(b, s, -1), residual)
        return self.norm(mlp_out, residual)

    def compute_logits(self, normed: Tensor) -> Tensor:
        """Draft-vocab logits; map argmax ids to target ids with ``draft_to_target``."""
        return self.lm_head(normed)

    def draft_to_target(self, draft_ids: Tensor) -> Tensor:
        """Map draft-vocab ids to target ids (``i + d2t[i]``)."""
        return draft_ids + self.d2t[draft_ids]

    def export_state_dict(self) -> dict[str, Tensor]:
        """Tensors for ``model.safetensors``: no embedding; no d2t/t2d for a full-vocab draft."""
        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.draft_vocab_size == self.config.vocab_size:
            sd.pop("d2t")  # vLLM has no parameter for it then and refuses to load it
            sd.pop("t2d")
        return sd


def _drop_embedding(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    state_dict.pop(prefix + "embed_tokens.weight", None)


def _allow_missing_embedding(module: nn.Module, incompatible: object) -> None:
    missing = incompatible.missing_keys  # type: ignore[attr-defined]
    for key in [k for k in missing if k.endswith("embed_tokens.weight")]:
        missing.remove(key)
