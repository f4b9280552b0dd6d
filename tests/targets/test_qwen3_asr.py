"""The Qwen3-ASR family adapter on its tiny random checkpoint.

One checkpoint per module. Checked against the family's own parts: the HF processor's Jinja template
and tokenizer, the HF encoder's output lengths, an independent ``output_hidden_states=True`` forward,
and vLLM (one engine, in a subprocess, with the plugin and an EAGLE-3 draft) against transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from modeling.targets import qwen3_asr_tiny as tiny
from modeling.targets.qwen3_asr import CHAT_TEMPLATE, Qwen3ASRFamily, render_text
from pipeline.data.records import Turn, read_conversations
from pipeline.tools.tiny_target import main

F = Qwen3ASRFamily
REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
VLLM_CLIPS = ("clip-00", "clip-05", "clip-10", "clip-15")  # 05 and 15 give the same number of audio tokens
# Greedy tokens compared between engines, in fp32: bf16 rounding flips near-tied argmaxes of random
# weights within a few tokens, fp32 engines agree (platform notes, 2026-12-02)
COMPARED_TOKENS = 8


def load_clip(path: Path) -> np.ndarray:
    audio, rate = sf.read(path, dtype="float32")
    assert rate == 16_000
    return audio


def encode(tokenizer: Any, turns: list[Turn], *, counts: list[int] | None = None,
           until_turn: int | None = None) -> tuple[list[int], list[int]]:
    """Ids and loss mask from :meth:`render_segments` by the rules of ``pipeline.data.template.ChatTokenizer``:
    consecutive template text tokenized in one piece, each ``<|audio_pad|>`` repeated ``counts[i]``
    times (once without counts: vLLM expands it), answers plus the turn-end token carry the loss."""
    turn_end = tokenizer.convert_tokens_to_ids(F.special_tokens["turn_end"])
    audio = tokenizer.convert_tokens_to_ids(F.special_tokens["audio"])
    ids: list[int] = []
    mask: list[int] = []
    pending = ""
    clips = 0
    for seg in [*F.render_segments(turns, until_turn=until_turn), None]:
        if seg is not None and seg.kind == "text":
            pending += seg.text
            continue
        piece = tokenizer.encode(pending, add_special_tokens=False) if pending else []
        ids += piece
        mask += [0] * len(piece)
        pending = ""
        if seg is None:
            break
        if seg.kind == "audio":
            n = 1 if counts is None else counts[clips]
            clips += 1
            ids += [audio] * n
            mask += [0] * n
        else:
            answer = [*tokenizer.encode(seg.text, add_special_tokens=False), turn_end]
            ids += answer
            mask += [1] * len(answer)
    return ids, mask


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_tiny(tmp_path_factory.mktemp("qwen3-asr") / "tiny")


@pytest.fixture(scope="module")
def processor(target: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(target))


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The fixture conversations plus one whose second user turn adds a clip (it must join the first's)."""
    rows = [json.loads(line) for line in (DATA / "speech.jsonl").read_text().splitlines()]
    for row in rows:  # absolute audio paths: the jsonl is rewritten elsewhere
        for turn in row["conversations"]:
            for part in turn["content"] if isinstance(turn["content"], list) else []:
                if "audio" in part:
                    part["audio"] = str(DATA / part["audio"])
    rows.append({"id": "late-clip", "conversations": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "audio", "audio": str(DATA / "audio" / "clip-03.flac")},
                                     {"type": "text", "text": "Transcribe."}]},
        {"role": "assistant", "content": "She sells sea shells by the shore."},
        {"role": "user", "content": [{"type": "audio", "audio": str(DATA / "audio" / "clip-04.flac")}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cup of warm tea helps me relax."}]}]})
    path = tmp_path_factory.mktemp("records") / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = read_conversations(path)
    assert not result.rejected
    return {r.id: r for r in result.records}


def _assistant_turns(record: Any) -> list[int]:
    return [i for i, t in enumerate(record.turns) if t.role == "assistant"]


def test_build_is_deterministic_per_seed_and_cli(target: Path, tmp_path: Path) -> None:
    again = tiny.build_tiny(tmp_path / "seed0")
    main(["--family", "qwen3-asr", "--out", str(tmp_path / "seed1"), "--seed", "1"])
    weights = (target / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (tmp_path / "seed1" / "model.safetensors").read_bytes() != weights
    for name in ("tokenizer.json", "config.json", "chat_template.jinja"):  # only the weights depend on the seed
        assert (tmp_path / "seed1" / name).read_bytes() == (target / name).read_bytes(), name
    marker = json.loads((target / ".complete").read_text())
    assert marker["seed"] == 0 and marker["builder"] == tiny.builder_id()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_checkpoint_layout_config_and_hf_load(target: Path, processor: Any) -> None:
    from safetensors.torch import load_file

    config = json.loads((target / "config.json").read_text())
    assert tuple(config["architectures"]) == F.architectures
    text = F.text_config(config)
    assert text == {"num_hidden_layers": 8, "hidden_size": 256, "vocab_size": 640, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 768, "rms_norm_eps": 1e-6,
                    "rope_theta": 1e6, "max_position_embeddings": 8192, "tie_word_embeddings": True}
    assert config["audio_config"]["n_window"] == 50 and config["audio_config"]["n_window_infer"] == 800
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        F.text_config({**config, "tie_word_embeddings": False})
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids(list(tiny.SPECIAL_TOKENS))
    assert ids == list(range(640 - len(ids), 640)) and len(tok) == 640
    assert config["audio_token_id"] == processor.audio_token_id == tok.convert_tokens_to_ids("<|audio_pad|>")
    assert config["timestamp_token_id"] == tok.convert_tokens_to_ids("<timestamp>")
    assert set(config["eos_token_id"]) == set(tok.convert_tokens_to_ids(list(F.end_tokens)))

    weights = load_file(str(target / "model.safetensors"))
    assert F.lm_head_key(config) is None and not [k for k in weights if "lm_head" in k]  # tied: not stored
    from transformers import Qwen3ASRForConditionalGeneration

    _, info = Qwen3ASRForConditionalGeneration.from_pretrained(str(target), output_loading_info=True)
    model = F.load_model(target, "fp32")
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert set(weights) == set(model.state_dict()) - {"lm_head.weight"}
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    # never-generated rows scaled, not zeroed: the tied embedding keeps every token's input direction
    embed = weights[F.embedding_key(config)].float()
    rows = embed.norm(dim=1)
    low = tok.convert_tokens_to_ids(list(tiny.NEVER_GENERATED))
    others = torch.ones(640, dtype=torch.bool)
    others[low] = False
    assert float(rows[low].max()) < 0.1 * float(rows[others].min()) and float(rows[low].min()) > 0


def test_render_and_loss_mask_equal_the_processor_template(processor: Any, records: dict[str, Any]) -> None:
    tok = processor.tokenizer
    newline = tok.encode("\n", add_special_tokens=False)
    for rid, record in records.items():
        msgs = record.raw["conversations"]
        expect = processor.apply_chat_template(msgs, tokenize=False)
        assert render_text(record.turns) == expect, rid
        ids, mask = encode(tok, record.turns)
        assert ids == tok.encode(expect, add_special_tokens=False), rid
        # the template's {% generation %} block covers "ANSWER<|im_end|>\n"; the "\n" after the turn end
        # is never generated (stop at <|im_end|>), so it carries no loss here
        hf = tok.apply_chat_template(msgs, chat_template=CHAT_TEMPLATE, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        assert hf["input_ids"] == ids, rid
        hf_mask = list(hf["assistant_masks"])
        turn_end = tok.convert_tokens_to_ids("<|im_end|>")
        after_end = [t + 1 for t in range(len(ids) - 1) if hf_mask[t] and ids[t] == turn_end]
        assert after_end and all(ids[t : t + 1] == newline and hf_mask[t] for t in after_end), rid
        assert mask == [0 if t in after_end else m for t, m in enumerate(hf_mask)], rid
        for k in _assistant_turns(record):  # the regeneration prompt of every assistant turn
            prompt = processor.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True)
            assert render_text(record.turns[:k], add_generation_prompt=True) == prompt, (rid, k)
            assert encode(tok, record.turns, until_turn=k)[0] == tok.encode(prompt, add_special_tokens=False)
    late = render_text(records["late-clip"].turns)
    assert late.count("<|audio_start|><|audio_pad|><|audio_end|>") == 2 and "Transcribe" not in late  # user text dropped
    assert late.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|audio_start|>")
    assert not late.startswith(render_text(records["late-clip"].turns[:2], add_generation_prompt=True))
    assert render_text(records["text-00"].turns).startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|im_end|>")
    custom = F.render_segments(records["clip-00"].turns, system_prompt="Hi.")[0].text
    assert custom == "<|im_start|>system\nHi.<|im_end|>\n"


def test_expanded_ids_and_features_equal_the_processor(processor: Any, records: dict[str, Any]) -> None:
    tok = processor.tokenizer
    for rid in ("clip-00", "clip-07", "multi-02"):
        record = records[rid]
        (wave,) = [load_clip(p) for p in record.audio_paths]
        ids, _ = encode(tok, record.turns, counts=[F.num_audio_tokens(wave.shape[0])])
        text = processor.apply_chat_template(record.raw["conversations"], tokenize=False)
        ref = processor(text=[text], audio=[wave])
        assert ref["input_ids"][0].tolist() == ids, rid
        mine = F.audio_inputs(processor.feature_extractor, [wave])
        np.testing.assert_array_equal(mine["input_features"], ref["input_features"].numpy())
        np.testing.assert_array_equal(mine["input_features_mask"], ref["input_features_mask"].numpy())


def test_audio_token_counts_equal_the_encoder_output(target: Path, processor: Any) -> None:
    model = F.load_model(target, "fp32")
    clips = [load_clip(p) for p in sorted((DATA / "audio").glob("clip-*.flac"))]
    rng = np.random.default_rng(0)
    clips += [(rng.standard_normal(int(s * 16_000)) * 0.1).astype(np.float32)
              for s in (0.3, 0.5, 0.99, 1.0, 1.005, 2.5, 7.77, 10.0, 30.0, 45.0)]  # no 30 s cut
    extractor = processor.feature_extractor

    def encoder_rows(waves: list[np.ndarray]) -> int:
        inputs = F.audio_inputs(extractor, waves)
        with torch.no_grad():
            out = model.model.get_audio_features(torch.from_numpy(inputs["input_features"]),
                                                 torch.from_numpy(inputs["input_features_mask"]))
        return int(out.pooler_output.shape[0])

    counts = [F.num_audio_tokens(w.shape[0]) for w in clips]
    assert [encoder_rows([w]) for w in clips] == counts
    # the processor's own expansion (one audio per text: featurized alone, as in vLLM)
    expanded = [int((processor(text=[processor.audio_token], audio=[w])["input_ids"] == processor.audio_token_id).sum())
                for w in clips]
    assert expanded == counts
    assert encoder_rows(clips) == sum(counts)  # batched: each clip keeps its own count
    # 13 per second; clips under 0.5 s padded to it; an unfinished last 10 ms frame does not count
    assert [F.num_audio_tokens(n) for n in (1, 4_800, 8_000, 16_000, 16_159, 16_160, 480_000)] == [
        7, 7, 7, 13, 13, 14, 390]
    assert F.max_audio_seconds >= 30


def test_capture_hooks_equal_output_hidden_states(target: Path, processor: Any, records: dict[str, Any]) -> None:
    """Hooks on ``decoder(model)`` as modeling.target_io.capture sets them, against an independent model instance's
    ``output_hidden_states=True`` forward: bit-exact at batch size 1 (same weights, same ops)."""
    from modeling.target_io.capture import aux_layer_ids

    model = F.load_model(target, "bf16")
    reference = F.load_model(target, "bf16")
    decoder = F.decoder(model)
    aux, _ = aux_layer_ids(len(decoder.layers))
    acts: dict[str, torch.Tensor] = {}
    hooks = [decoder.register_forward_pre_hook(lambda m, a, kw: acts.__setitem__("embeds", kw["inputs_embeds"]),
                                               with_kwargs=True)]
    for k, layer in enumerate(aux):
        hooks.append(decoder.layers[layer].register_forward_hook(
            lambda m, a, out, k=k: acts.__setitem__(f"aux{k}", out[0] if isinstance(out, tuple) else out)))
    placeholder = model.get_input_embeddings().weight[processor.audio_token_id]
    try:
        for rid in ("clip-00", "text-00", "multi-02", "late-clip"):
            record = records[rid]
            waves = [load_clip(p) for p in record.audio_paths]
            ids, _ = encode(processor.tokenizer, record.turns, counts=[F.num_audio_tokens(len(w)) for w in waves])
            ids_t = torch.tensor([ids])
            audio = F.audio_inputs(processor.feature_extractor, waves)
            acts.clear()
            with torch.no_grad():
                last = F.inner_forward(model, ids_t, torch.ones_like(ids_t), **audio)
                kwargs = {k: torch.from_numpy(v) for k, v in audio.items()}
                if kwargs:
                    kwargs["input_features"] = kwargs["input_features"].to(torch.bfloat16)
                hs = reference(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), output_hidden_states=True,
                               **kwargs).hidden_states
            assert len(hs) == len(decoder.layers) + 1, rid
            assert torch.equal(acts["embeds"], hs[0]), rid
            for k, layer in enumerate(aux):
                assert torch.equal(acts[f"aux{k}"], hs[layer + 1]), (rid, layer)
            assert torch.equal(last, hs[-1]), rid
            audio_rows = acts["embeds"][0][ids_t[0] == processor.audio_token_id]
            assert audio_rows.shape[0] == sum(F.num_audio_tokens(len(w)) for w in waves), rid
            assert not any(torch.equal(row, placeholder) for row in audio_rows)  # the projector output, merged
    finally:
        for h in hooks:
            h.remove()


# ---- vLLM: one engine in a subprocess (spawned engine processes need the __main__ guard) ----

def _hf_greedy(model: Any, ids: list[int], audio: dict[str, np.ndarray], steps: int, stop: set[int]) -> list[int]:
    """Greedy tokens of the full HF forward, re-run on the growing sequence (no cache: nothing to get wrong)."""
    kwargs = {k: torch.from_numpy(v) for k, v in audio.items()}
    seq = torch.tensor([ids])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), **kwargs).logits
            out.append(int(logits[0, -1].argmax()))
            if out[-1] in stop:
                break
            seq = torch.cat([seq, torch.tensor([[out[-1]]])], dim=1)
    return out


def _export_random_draft(target: Path, root: Path) -> Path:
    """A random full-vocab EAGLE-3 draft, exported for vLLM as the trainer + export stage would."""
    from modeling.draft.config import DraftConfig
    from modeling.draft.model import Eagle3Draft
    from modeling.draft.snapshot import COMMITTED, save_draft_snapshot
    from stages import export as export_stage

    cfg = DraftConfig.from_target_config(F.text_config(json.loads((target / "config.json").read_text())), 640)
    torch.manual_seed(0)
    draft = Eagle3Draft(cfg)
    step = root / "run" / "checkpoints" / "step-000001"
    save_draft_snapshot(step, draft.export_state_dict(), cfg, None, list(cfg.aux_layer_ids),
                        {"path": str(target), "architecture": F.architectures[0], "num_layers": cfg.num_target_layers})
    (step / COMMITTED).write_text("")
    (root / "run" / "checkpoints" / "latest").write_text(step.name)
    (root / "run" / "run.json").write_text(json.dumps({"target": str(target)}))
    assert export_stage.main(["--run", str(root / "run"), "--output", str(root / "draft")]) == 0
    return root / "draft"


@pytest.fixture(scope="module")
def vllm_run(target: Path, processor: Any, records: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("vllm")
    prompts = []
    for rid in VLLM_CLIPS:
        record = records[rid]
        (path,) = record.audio_paths
        ids, _ = encode(processor.tokenizer, record.turns, until_turn=1)  # one <|audio_pad|>: vLLM expands it
        prompts.append({"id": rid, "prompt_ids": ids, "audio": str(path)})
    args = {"target": str(target), "draft": str(_export_random_draft(target, root)), "prompts": prompts,
            "max_tokens": COMPARED_TOKENS, "out": str(root / "result.json")}
    # PYTHONPATH: this worktree's modules (and plugin) in the script and in every engine process it spawns
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("VLLM_PLUGINS", None)
    log = root / "serve.log"
    with open(log, "w") as log_file:
        rc = subprocess.run([sys.executable, __file__, "serve", json.dumps(args)], cwd=REPO, env=env,
                            stdout=log_file, stderr=subprocess.STDOUT, timeout=900).returncode
    text = log.read_text()
    assert rc == 0, text[-5000:]
    return {**json.loads((root / "result.json").read_text()), "log": text, "prompts": prompts}


@pytest.mark.timeout(1200)
def test_vllm_serves_the_tiny_target_as_eagle3_and_matches_transformers(vllm_run: dict, target: Path,
                                                                        processor: Any, records: dict) -> None:
    tok = processor.tokenizer
    assert vllm_run["registry"] == "modeling.targets.vllm_classes:Qwen3ASREagle3ForConditionalGeneration"
    assert vllm_run["lazy"]  # registering imported no vLLM model code and aliased nothing
    assert vllm_run["subclass"] and vllm_run["same_name"] and vllm_run["pickles"]
    assert vllm_run["new_members"] == ["__init__"]  # only the image_token_index shim is new
    assert vllm_run["torchvision_alias"] and not vllm_run["thinker_has_image_token_index"]
    assert vllm_run["errors"] == [None] * len(VLLM_CLIPS)
    # the draft ran: EAGLE-3 accepted for this target (SupportsEagle3 seen, image_token_index found)
    assert vllm_run["spec"]["num_drafts"] > 0, vllm_run["log"][-3000:]
    assert "Using auxiliary layers from speculative config" in vllm_run["log"]
    model = F.load_model(target, "fp32")
    stop = set(tok.convert_tokens_to_ids(list(F.end_tokens)))
    never = set(tok.convert_tokens_to_ids(list(tiny.NEVER_GENERATED)))
    outputs = []
    for prompt, got, prompt_tokens in zip(vllm_run["prompts"], vllm_run["token_ids"], vllm_run["prompt_tokens"],
                                          strict=True):
        wave = load_clip(Path(prompt["audio"]))
        n = F.num_audio_tokens(len(wave))
        ids, _ = encode(tok, records[prompt["id"]].turns, counts=[n], until_turn=1)
        assert prompt_tokens == len(ids) == len(prompt["prompt_ids"]) - 1 + n, prompt["id"]  # vLLM's expansion
        want = _hf_greedy(model, ids, F.audio_inputs(processor.feature_extractor, [wave]), COMPARED_TOKENS, stop)
        assert got[: len(want)] == want, (prompt["id"], got, want)
        assert not never & set(got)
        outputs.append(tuple(got))
    assert len(set(outputs)) == len(outputs)  # audio-dependent: every clip its own output


def serve(args: dict) -> None:
    """Subprocess body: the plugin's registration and class, then the plugin-registered target with a random
    EAGLE-3 draft, greedy, fp32."""
    import pickle

    from vllm import ModelRegistry

    from modeling import vllm_plugin
    from modeling.targets import qwen3_asr, vllm_classes
    from pipeline.engine.offline import GenRequest, OfflineGenerator, Sampling, build_llm
    from pipeline.engine.spec_counters import SpecCounters

    def entry() -> str:
        model = ModelRegistry.models[F.architectures[0]]
        return f"{getattr(model, 'module_name', '')}:{getattr(model, 'class_name', '')}"

    vllm_plugin.register()
    F.vllm_register()  # again: idempotent
    checks: dict[str, Any] = {"registry": entry(), "lazy": not any(
        m in sys.modules for m in ("vllm.model_executor.models.qwen3_asr", qwen3_asr.TORCHVISION_MODULE))}
    llm = build_llm(args["target"], dtype="float32", max_num_seqs=4, enable_prefix_caching=False,
                    disable_log_stats=False, speculative_config={
                        "method": "eagle3", "model": args["draft"], "num_speculative_tokens": 2})
    engine = OfflineGenerator(llm)
    try:
        requests = [GenRequest(p["prompt_ids"], [load_clip(Path(p["audio"]))], Sampling(args["max_tokens"]))
                    for p in args["prompts"]]
        results = engine.generate(requests)
        spec = SpecCounters.from_snapshot(llm.get_metrics()).summary(2)
    finally:
        engine.close()
    from vllm.model_executor.models.interfaces import supports_eagle3
    from vllm.model_executor.models.qwen3_asr import Qwen3ASRForConditionalGeneration as Upstream
    from vllm.transformers_utils.configs.qwen3_asr import Qwen3ASRThinkerConfig

    cls = vllm_classes.Qwen3ASREagle3ForConditionalGeneration  # what the registry's lazy entry resolves
    checks.update(
        subclass=issubclass(cls, Upstream) and supports_eagle3(cls) and supports_eagle3(Upstream),
        same_name=cls.__name__ == F.architectures[0], pickles=pickle.loads(pickle.dumps(cls)) is cls,
        new_members=[k for k in vars(cls) if not k.startswith("_")] + [k for k in ("__init__",) if k in vars(cls)],
        torchvision_alias=qwen3_asr.alias_torchvision_free_qwen2_vl(),
        # why the shim: the config vLLM's class keeps has no image_token_index of its own
        thinker_has_image_token_index=hasattr(Qwen3ASRThinkerConfig(), "image_token_index"))
    Path(args["out"]).write_text(json.dumps({
        "token_ids": [r.token_ids for r in results], "errors": [r.error for r in results],
        "prompt_tokens": [r.prompt_tokens for r in results], "spec": spec, **checks}))


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    serve(json.loads(sys.argv[2]))
