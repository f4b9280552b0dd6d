"""Draft model, draft vocab, target weight readers and the TTT loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from modeling.draft.config import DraftConfig, aux_ids_for_engine, default_aux_layer_ids
from modeling.draft.model import Eagle3Draft
from modeling.draft.ttt import chain_estimates, chain_stats, ttt_loss
from modeling.draft.ttt_reference import ttt_loss_reference
from modeling.draft.vocab import VocabMapping, build_draft_vocab, count_supervised_tokens
from modeling.target_io.weights import read_target_embedding, read_target_lm_head

EXPORT_NAMES = {
    "fc.weight", "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight", "midlayer.self_attn.o_proj.weight",
    "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight",
    "midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight",
    "midlayer.post_attention_layernorm.weight", "norm.weight", "lm_head.weight", "d2t", "t2d",
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on a shared 2-core box: a second thread costs up to 10x from contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**kw: object) -> DraftConfig:
    base = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, vocab_size=160, draft_vocab_size=96, target_hidden_size=48,
                num_target_layers=8, rope_theta=500.0)
    base.update(kw)
    return DraftConfig(**base)  # type: ignore[arg-type]


def random_draft(cfg: DraftConfig, seed: int = 0) -> Eagle3Draft:
    """Draft with non-trivial norms and embeddings so every weight matters."""
    torch.manual_seed(seed)
    draft = Eagle3Draft(cfg)
    with torch.no_grad():
        draft.embed_tokens.weight.normal_()
        for name, p in draft.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return draft


def random_batch(cfg: DraftConfig, lengths: list[list[int]], seq: int, seed: int = 1) -> dict:
    """Packed rows of samples with the given lengths (rest padding) and a teacher whose argmax
    is often but not always inside a draft vocab built from the supervised tokens."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    ids = torch.randint(0, cfg.vocab_size, (b, seq), generator=g)
    pos = torch.zeros(b, seq, dtype=torch.long)
    am = torch.zeros(b, seq, dtype=torch.long)
    for r, lens in enumerate(lengths):
        start = 0
        for n in lens:
            pos[r, start:start + n] = torch.arange(n)
            am[r, start:start + n] = 1
            start += n
    lm = ((torch.rand(b, seq, generator=g) < 0.7) & am.bool()).long()
    head = torch.randn(cfg.vocab_size, cfg.target_hidden_size, generator=g)
    th = torch.randn(b, seq, cfg.target_hidden_size, generator=g)
    counts = count_supervised_tokens((th @ head.T).argmax(-1), lm, cfg.vocab_size)
    return dict(input_ids=ids, loss_mask=lm, aux_hidden=torch.randn(b, seq, 3 * cfg.target_hidden_size, generator=g),
                target_hidden=th, target_lm_head=head, attention_mask=am, position_ids=pos, counts=counts)


def run(fn, draft: Eagle3Draft, batch: dict, **kw: object):
    args = {k: v for k, v in batch.items() if k != "counts"}
    return fn(draft, **args, **kw)


@pytest.mark.parametrize("norm_before_residual,kv_heads", [(False, 2), (True, 4)])
def test_fast_ttt_equals_reference_loss_and_grads(norm_before_residual: bool, kv_heads: int) -> None:
    cfg = tiny_config(norm_before_residual=norm_before_residual, num_key_value_heads=kv_heads)
    draft = random_draft(cfg)
    batch = random_batch(cfg, [[30, 14, 12], [21, 25], [50]], seq=60)
    vocab = build_draft_vocab(batch["counts"], cfg.draft_vocab_size)
    draft.set_vocab_mapping(vocab.d2t, vocab.t2d)
    # A few steps of training so accuracies are not all zero.
    opt = torch.optim.Adam([p for p in draft.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(5):
        opt.zero_grad()
        run(ttt_loss, draft, batch).loss.backward()
        opt.step()
    results, grads = [], []
    for fn in (ttt_loss, ttt_loss_reference):
        draft.zero_grad()
        res = run(fn, draft, batch)
        res.loss.backward()
        results.append(res)
        grads.append({n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None})
    fast, ref = results
    assert (ref.step_count > 0).all() and ref.step_correct.sum() > 0
    assert torch.equal(fast.step_count, ref.step_count)
    assert torch.equal(fast.step_correct, ref.step_correct)
    torch.testing.assert_close(fast.loss, ref.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.step_loss_sum, ref.step_loss_sum, atol=1e-4, rtol=1e-5)
    assert fast.acceptance_length == pytest.approx(ref.acceptance_length)
    # out-of-vocab teacher tokens: evaluated (a miss) but no loss, the same in both implementations
    assert torch.equal(fast.step_loss_count, ref.step_loss_count)
    assert bool((fast.step_count >= fast.step_loss_count).all()) and bool((fast.step_count > fast.step_loss_count).any())
    assert torch.equal(fast.chain.as_tensor(), ref.chain.as_tensor()) and float(ref.chain.chain_starts[0]) > 0
    assert grads[0].keys() == grads[1].keys() and "embed_tokens.weight" not in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_row_equals_samples_alone() -> None:
    cfg = tiny_config()
    draft = random_draft(cfg)
    batch = random_batch(cfg, [[26, 19]], seq=48, seed=3)
    draft.set_vocab_mapping(*_mapping(batch, cfg))
    packed = run(ttt_loss, draft, batch)
    alone = []
    for lo, hi in ((0, 26), (26, 45)):
        part = {k: (v[:, lo:hi] if k != "target_lm_head" and k != "counts" else v) for k, v in batch.items()}
        alone.append(run(ttt_loss, draft, part))
    assert all((r.step_count > 0).all() for r in alone)
    assert torch.equal(packed.step_count, alone[0].step_count + alone[1].step_count)
    torch.testing.assert_close(packed.step_loss_sum, alone[0].step_loss_sum + alone[1].step_loss_sum,
                               atol=1e-4, rtol=1e-5)
    # Changing the second sample must not move the first sample's loss.
    batch["aux_hidden"][:, 26:] += 5.0
    batch["input_ids"][:, 26:] = (batch["input_ids"][:, 26:] + 1) % cfg.vocab_size
    first_only = {**batch, "loss_mask": batch["loss_mask"].clone()}
    first_only["loss_mask"][:, 26:] = 0
    torch.testing.assert_close(run(ttt_loss, draft, first_only).step_loss_sum, alone[0].step_loss_sum)


def test_training_on_synthetic_task_raises_acceptance() -> None:
    """Tokens follow a fixed permutation and the teacher predicts it: learnable at every step."""
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=64, draft_vocab_size=48, num_key_value_heads=4)
    draft = random_draft(cfg)
    perm = torch.randperm(40)  # next token = perm[token], all inside the first 40 ids
    b, s = 4, 20
    ids = torch.zeros(b, s, dtype=torch.long)
    ids[:, 0] = torch.randint(0, 40, (b,))
    for t in range(1, s):
        ids[:, t] = perm[ids[:, t - 1]]
    head = torch.randn(cfg.vocab_size, cfg.target_hidden_size)
    nxt = torch.cat((ids[:, 1:], ids[:, -1:]), dim=1)
    target_hidden = 3.0 * head[nxt] / head[nxt].norm(dim=-1, keepdim=True)  # sharp teacher on the next token
    aux = torch.randn(b, s, 3 * cfg.target_hidden_size)
    loss_mask = torch.ones(b, s, dtype=torch.long)
    loss_mask[:, :4] = 0
    vocab = build_draft_vocab(count_supervised_tokens(ids, loss_mask, cfg.vocab_size), cfg.draft_vocab_size)
    draft.set_vocab_mapping(vocab.d2t, vocab.t2d)
    kw = dict(input_ids=ids, loss_mask=loss_mask, aux_hidden=aux, target_hidden=target_hidden,
              target_lm_head=head, ttt_length=5)
    before = ttt_loss(draft, **kw).acceptance_length
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        res = ttt_loss(draft, **kw)
        res.loss.backward()
        opt.step()
    after = ttt_loss(draft, **kw)
    assert before < 1.3
    assert after.acceptance_length > 2.5, after.step_accuracy


# --- vocab -----------------------------------------------------------------------------

def test_vocab_picks_most_frequent_sorted_with_low_id_ties() -> None:
    counts = torch.tensor([0, 5, 1, 9, 1, 0, 7, 1])
    m = build_draft_vocab(counts, 4)
    assert m.draft_ids.tolist() == [1, 2, 3, 6]  # 9, 7, 5 then the lowest id among the 1s
    assert m.t2d.tolist() == [False, True, True, True, False, False, True, False]
    assert m.d2t.tolist() == [1, 1, 1, 3]
    m.validate()


def test_vocab_pads_with_lowest_unused_ids() -> None:
    counts = torch.zeros(10, dtype=torch.long)
    counts[[7, 3]] = torch.tensor([2, 4])
    assert build_draft_vocab(counts, 5).draft_ids.tolist() == [0, 1, 2, 3, 7]


def test_vocab_counts_only_supervised_tokens() -> None:
    ids = torch.tensor([[1, 2, 2, 3], [3, 3, 0, 1]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 0, 0, 1]])
    assert count_supervised_tokens(ids, mask, 5).tolist() == [0, 1, 2, 2, 0]


@pytest.mark.parametrize("size,counts,msg", [
    (10, torch.ones(10, dtype=torch.long), "smaller than the target vocab"),
    (12, torch.ones(10, dtype=torch.long), "smaller than the target vocab"),
    (3, torch.zeros(10, dtype=torch.long), "all token counts are zero"),
    (0, torch.ones(10, dtype=torch.long), "must be positive"),
])
def test_vocab_errors(size: int, counts: torch.Tensor, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        build_draft_vocab(counts, size)


def test_vocab_save_load_and_validation(tmp_path: Path) -> None:
    m = build_draft_vocab(torch.arange(20), 6)
    m.save(tmp_path / "vocab.safetensors")
    loaded = VocabMapping.load(tmp_path / "vocab.safetensors")
    assert torch.equal(loaded.d2t, m.d2t) and torch.equal(loaded.t2d, m.t2d)
    broken = VocabMapping(d2t=m.d2t + 1, t2d=m.t2d)
    with pytest.raises(ValueError, match="ascending"):
        broken.validate()


# --- serving equivalence with vLLM's llama_eagle3 math -------------------------------------

def _vllm_rms(x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """vLLM ir.ops rms_norm / fused_add_rms_norm, written out."""
    dtype = x.dtype
    x = x.to(torch.float32)
    if residual is not None:
        x = x + residual.to(torch.float32)
        residual = x.to(dtype)
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = (x.to(w.dtype) * w).to(dtype)
    return out if residual is None else (out, residual)


def _vllm_rope(pos: torch.Tensor, x: torch.Tensor, head_dim: int, theta: float, max_pos: int) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = torch.einsum("i,j -> ij", torch.arange(max_pos, dtype=torch.float), inv_freq)
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(x.dtype)
    cos, sin = cache.index_select(0, pos).chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _vllm_layer(sd: dict, cfg: DraftConfig, emb: torch.Tensor, hidden: torch.Tensor, pos: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None):
    """One vLLM Eagle3 draft forward over tokens [N] (fused qkv / gate_up like vLLM's loader).
    ``past`` holds earlier keys/values [P, nkv, D]; new tokens attend causally after them."""
    eps, d, nh, nkv = cfg.rms_norm_eps, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    e = _vllm_rms(emb, sd["midlayer.input_layernorm.weight"], eps)
    if cfg.norm_before_residual:
        h = residual = _vllm_rms(hidden, sd["midlayer.hidden_norm.weight"], eps)
    else:
        residual, h = hidden, _vllm_rms(hidden, sd["midlayer.hidden_norm.weight"], eps)
    qkv_w = torch.cat([sd[f"midlayer.self_attn.{p}_proj.weight"] for p in "qkv"])
    q, k, v = (torch.cat([e, h], -1) @ qkv_w.T).split([nh * d, nkv * d, nkv * d], -1)
    n = q.shape[0]
    q = _vllm_rope(pos, q.view(n, nh, d), d, cfg.rope_theta, cfg.max_position_embeddings)
    k = _vllm_rope(pos, k.view(n, nkv, d), d, cfg.rope_theta, cfg.max_position_embeddings)
    v = v.view(n, nkv, d)
    if past is not None:
        k, v = torch.cat([past[0], k]), torch.cat([past[1], v])
    p = k.shape[0] - n
    rep = nh // nkv
    scores = torch.einsum("nhd,mhd->hnm", q.float(), k.repeat_interleave(rep, 1).float()) * d**-0.5
    allowed = torch.arange(k.shape[0])[None, :] <= (torch.arange(n) + p)[:, None]
    attn = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    out = torch.einsum("hnm,mhd->nhd", attn, v.repeat_interleave(rep, 1).float()).to(q.dtype)
    o = out.reshape(n, nh * d) @ sd["midlayer.self_attn.o_proj.weight"].T
    h, residual = _vllm_rms(o, sd["midlayer.post_attention_layernorm.weight"], eps, residual)
    gu = h @ torch.cat([sd["midlayer.mlp.gate_proj.weight"], sd["midlayer.mlp.up_proj.weight"]]).T
    h = F.silu(gu[:, : cfg.intermediate_size]) * gu[:, cfg.intermediate_size:]
    h = h @ sd["midlayer.mlp.down_proj.weight"].T
    normed, prenorm = _vllm_rms(h, sd["norm.weight"], eps, residual)
    # vLLM compute_logits: draft logits scattered into a -inf full-vocab row via d2t.
    logits = normed @ sd["lm_head.weight"].T
    full = logits.new_full((n, cfg.vocab_size), float("-inf"))
    full[:, torch.arange(cfg.draft_vocab_size) + sd["d2t"]] = logits
    return full, prenorm, (k, v)


@pytest.mark.parametrize("dtype,nbr", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_step0_matches_vllm_math(dtype: torch.dtype, nbr: bool) -> None:
    cfg = tiny_config(norm_before_residual=nbr)
    draft = random_draft(cfg).to(dtype)
    batch = random_batch(cfg, [[20]], seq=20)
    draft.set_vocab_mapping(*_mapping(batch, cfg))
    sd = {**draft.state_dict(), "embed": draft.embed_tokens.weight}
    ids, aux = batch["input_ids"][0], batch["aux_hidden"][0].to(dtype)
    pos = torch.arange(20) + 7  # non-zero offsets exercise RoPE
    hidden = aux @ sd["fc.weight"].T
    want, want_pre, _ = _vllm_layer(sd, cfg, sd["embed"][ids], hidden, pos)
    normed, pre = draft(ids[None], draft.combine_hidden_states(aux[None]), pos[None])
    got = draft.compute_logits(normed)[0]
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(got, want[:, torch.arange(cfg.draft_vocab_size) + draft.d2t], **tol)
    torch.testing.assert_close(pre[0], want_pre, **tol)
    if dtype == torch.float32:
        assert torch.equal(draft.draft_to_target(got.argmax(-1)), want.argmax(-1))


def _mapping(batch: dict, cfg: DraftConfig) -> tuple[torch.Tensor, torch.Tensor]:
    m = build_draft_vocab(batch["counts"], cfg.draft_vocab_size)
    return m.d2t, m.t2d


def test_ttt_step1_matches_vllm_decode() -> None:
    """TTT step 1 at position t == vLLM draft: prefill 0..t, then one decode step at t+1."""
    cfg = tiny_config(draft_vocab_size=160)  # full vocab: every teacher token counts
    draft = random_draft(cfg)
    batch = random_batch(cfg, [[14]], seq=14)
    t = 6
    batch["loss_mask"] = torch.zeros(1, 14, dtype=torch.long)
    batch["loss_mask"][0, t + 3] = 1  # token t+3: step 0 at t+1, step 1 at t
    res = run(ttt_loss, draft, batch, ttt_length=2)
    assert res.step_count.tolist() == [1, 1]
    sd = {k: v.detach() for k, v in draft.state_dict().items()}
    emb, ids = draft.embed_tokens.weight.detach(), batch["input_ids"][0]
    hidden = batch["aux_hidden"][0, : t + 1] @ sd["fc.weight"].T
    pos = torch.arange(t + 1)
    _, pre, past = _vllm_layer(sd, cfg, emb[ids[1 : t + 2]], hidden, pos)
    logits, _, _ = _vllm_layer(sd, cfg, emb[ids[t + 2]][None], pre[-1:], pos[-1:] + 1, past)
    teacher = torch.softmax(batch["target_hidden"][0, t + 2] @ batch["target_lm_head"].T, -1)
    want = -(teacher * torch.log_softmax(logits[0], -1)).sum()
    torch.testing.assert_close(res.step_loss_sum[1], want.detach(), atol=1e-4, rtol=1e-5)


# --- checkpoint names, target readers, config --------------------------------------------

def test_state_dict_names_and_embedding_not_saved() -> None:
    draft = random_draft(tiny_config())
    assert set(draft.state_dict()) == EXPORT_NAMES
    assert set(draft.export_state_dict()) == EXPORT_NAMES
    full = random_draft(tiny_config(draft_vocab_size=160))
    assert set(full.export_state_dict()) == EXPORT_NAMES - {"d2t", "t2d"}
    other = random_draft(tiny_config(), seed=5)
    other.load_state_dict(draft.state_dict())  # strict, though embed_tokens is absent
    torch.testing.assert_close(other.fc.weight, draft.fc.weight)


def _write_target(root: Path, tensors: dict[str, torch.Tensor], shards: int, config: dict) -> None:
    root.mkdir()
    (root / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(tensors, str(root / "model.safetensors"))
        return
    names, weight_map = sorted(tensors), {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(root / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_target_readers_single_sharded_and_tied(tmp_path: Path) -> None:
    cfg = tiny_config()
    emb, head = torch.randn(160, 64), torch.randn(160, 64)
    others = {f"language_model.model.layers.{i}.mlp.down_proj.weight": torch.randn(4, 4) for i in range(3)}
    _write_target(tmp_path / "sharded", {"language_model.model.embed_tokens.weight": emb,
                                         "language_model.lm_head.weight": head, **others}, 3, {})
    assert torch.equal(read_target_embedding(tmp_path / "sharded"), emb)
    assert torch.equal(read_target_lm_head(tmp_path / "sharded", torch.bfloat16), head.bfloat16())
    draft = random_draft(cfg)
    draft.load_target_embedding(tmp_path / "sharded")
    assert torch.equal(draft.embed_tokens.weight, emb)
    # transformers 5.19 save_pretrained layout, tied head declared in text_config.
    _write_target(tmp_path / "tied", {"language_model.model.model.embed_tokens.weight": emb}, 1,
                  {"text_config": {"tie_word_embeddings": True}})
    assert torch.equal(read_target_lm_head(tmp_path / "tied"), emb)
    _write_target(tmp_path / "untied", {"language_model.model.model.embed_tokens.weight": emb}, 1, {})
    with pytest.raises(KeyError, match="lm_head"):
        read_target_lm_head(tmp_path / "untied")


def test_config_from_qwen2_audio_and_hf_export(tmp_path: Path) -> None:
    # Qwen2-Audio-7B's text_config lists only non-default fields (no layers, hidden size or head counts):
    # the production path (a target dir -> its family -> transformers' Qwen2AudioConfig -> the draft) must
    # size the draft as transformers builds the 7B decoder.
    from modeling.targets import target_text_config

    target_dir = tmp_path / "qwen2-audio-7b"
    target_dir.mkdir()
    (target_dir / "config.json").write_text(json.dumps(
        {"architectures": ["Qwen2AudioForConditionalGeneration"], "model_type": "qwen2_audio",
         "text_config": {"model_type": "qwen2", "vocab_size": 156032, "intermediate_size": 11008,
                         "max_position_embeddings": 8192, "rms_norm_eps": 1e-5}}))
    target = target_text_config(target_dir)
    cfg = DraftConfig.from_target_config(target, 32000)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4096, 32, 32, 128)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.target_hidden_size) == (11008, 156032, 4096)
    assert (cfg.num_target_layers, cfg.rms_norm_eps, cfg.max_position_embeddings) == (32, 1e-5, 8192)
    assert cfg.aux_layer_ids == default_aux_layer_ids(32) == (1, 15, 28)
    with pytest.raises(ValueError, match="text_config"):  # a raw config.json is not a text shape
        DraftConfig.from_target_config(json.loads((target_dir / "config.json").read_text()), 32000)
    small = DraftConfig.from_target_config(target, 32000, {"intermediate_size": 4096})
    assert small.intermediate_size == 4096
    with pytest.raises(ValueError, match="unknown DraftConfig override"):
        DraftConfig.from_target_config(target, 32000, {"intermediate": 1})
    hf = cfg.to_hf_config()
    assert hf["architectures"] == ["LlamaForCausalLMEagle3"] and hf["num_hidden_layers"] == 1
    assert hf["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [2, 16, 29], "use_aux_hidden_state": True}
    assert cfg.to_hf_config(convention_engine="sglang")["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 15, 28]
    assert aux_ids_for_engine([3], "vllm") == [4]
    assert (hf["draft_vocab_size"], hf["target_hidden_size"], hf["tie_word_embeddings"]) == (32000, 4096, False)
    from transformers import LlamaConfig

    loaded = LlamaConfig(**hf)
    assert loaded.rope_parameters["rope_theta"] == 10000.0 and loaded.head_dim == 128


def test_chain_and_walk_estimates_by_hand() -> None:
    """Two answers in one row; per-position chain lengths set by hand, both estimates worked out."""
    chain_len = torch.zeros(1, 16, dtype=torch.long)
    evaluated = torch.zeros(1, 16, dtype=torch.bool)
    evaluated[0, 2:9] = True  # answer 1: position 2 predicts from the target's own first token
    evaluated[0, 12:15] = True  # answer 2
    chain_len[0, 3:9] = torch.tensor([2, 0, 4, 1, 0, 3])
    chain_len[0, 13:15] = torch.tensor([1, 0])
    chain_len[0, 2] = 7  # never a draft start: must not count
    stats = chain_stats(chain_len, evaluated, torch.ones(1, 16, dtype=torch.long), ttt_length=4)
    chain, walk = chain_estimates(stats.as_tensor(), 4)
    # k=4 walk: answer 1 drafts at 3 (2 accepted), 6 (1), 8 (3); answer 2 at 13 (1): 7 / 4
    assert walk[3] == pytest.approx(1 + 7 / 4)
    # k=1 walk: answer 1 at 3, 5, 7 (0 accepted), 8; answer 2 at 13: 4 accepted in 5 drafts
    assert walk[0] == pytest.approx(1 + 4 / 5)
    assert chain[3] == pytest.approx(1 + 11 / 8) and chain[0] == pytest.approx(1 + 5 / 8)
    assert stats.walk_drafts.tolist()[3] == 4 and float(stats.chain_starts[0]) == 8
