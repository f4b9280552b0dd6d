"""The hearing draft: trained on the target's audio embeddings, served with them by vLLM.

A draft snapshot with ``audio_input = "encoder"`` (random weights) is exported for vLLM; the tiny
target's fixture clips are dumped into an fp32-computed store (the demo's setting) and served in
vLLM (fp32, CPU, engine in this test's subprocess: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with
hooks on the drafter that record what its first pass receives. The test then builds the training
row of the same sample from the store, as the trainer does (``collate_row`` -> ``with_audio_ids`` ->
``TrainDraft.embed``), and checks that serving and training feed the draft the same inputs, and that
the draft's own forward on those inputs proposes what vLLM proposed. One engine start (~30-60 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling.draft.config import HEARING_ARCHITECTURE, STOCK_ARCHITECTURE, DraftConfig
from modeling.draft.model import Eagle3Draft
from modeling.draft.snapshot import COMMITTED, save_draft_snapshot
from stages import export as export_stage

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
NUM_PROMPTS = 2
NUM_SPEC_TOKENS = 3


def write_hearing_run(run_dir: Path, target: Path, audio_input: str) -> DraftConfig:
    """A committed step-0 snapshot of a random full-vocab draft, as the trainer writes it."""
    from modeling.targets import target_text_config

    cfg = DraftConfig.from_target_config(target_text_config(target), 640, {"audio_input": audio_input})
    torch.manual_seed(0)
    draft = Eagle3Draft(cfg)
    step_dir = run_dir / "checkpoints" / "step-000000"
    save_draft_snapshot(step_dir, draft.export_state_dict(), cfg, None, list(cfg.aux_layer_ids),
                        {"path": str(target)})
    (step_dir / COMMITTED).write_text("")
    (run_dir / "checkpoints" / "latest").write_text(step_dir.name)
    return cfg


def test_export_names_the_hearing_class_only_for_encoder_drafts(tiny_target: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    names = {}
    for audio_input in ("placeholder", "encoder"):
        write_hearing_run(tmp_path / audio_input, tiny_target, audio_input)
        out = tmp_path / f"draft-{audio_input}"
        assert export_stage.main(["--run", str(tmp_path / audio_input), "--output", str(out)]) == 0
        names[audio_input] = json.loads((out / "config.json").read_text())["architectures"]
    assert names == {"placeholder": [STOCK_ARCHITECTURE], "encoder": [HEARING_ARCHITECTURE]}
    # SGLang would feed the placeholder at audio positions: refused, with the reason
    assert export_stage.main(["--run", str(tmp_path / "encoder"), "--output", str(tmp_path / "sg"),
                              "--engine", "sglang"]) == 2
    assert "served by this package's vLLM plugin only" in capsys.readouterr().err
    assert not (tmp_path / "sg").exists()
    with pytest.raises(ValueError, match="audio_input must be one of"):
        DraftConfig.from_target_config({"num_hidden_layers": 8, "hidden_size": 256, "vocab_size": 640,
                                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                                        "intermediate_size": 512, "rms_norm_eps": 1e-6, "rope_theta": 1e4,
                                        "max_position_embeddings": 2048}, 640, {"audio_input": "encoders"})


def test_plugin_registers_the_hearing_class_lazily() -> None:
    import pickle

    from vllm import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_multimodal_embeddings
    from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM

    from modeling import vllm_plugin
    from modeling.draft import vllm_hearing

    vllm_plugin.register()
    entry = ModelRegistry.models[HEARING_ARCHITECTURE]
    assert (entry.module_name, entry.class_name) == ("modeling.draft.vllm_hearing", HEARING_ARCHITECTURE)
    cls = getattr(vllm_hearing, HEARING_ARCHITECTURE)  # what the registry's lazy entry resolves
    # the proposer drives only Eagle3LlamaForCausalLM and its siblings; the stock class does not hear
    assert issubclass(cls, Eagle3LlamaForCausalLM) and supports_multimodal_embeddings(cls)
    assert not supports_multimodal_embeddings(Eagle3LlamaForCausalLM)
    assert pickle.loads(pickle.dumps(cls)) is cls and cls.__name__ == HEARING_ARCHITECTURE


@pytest.fixture(scope="module")
def served(tiny_target: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from pipeline.core.config import parse_config
    from stages.dump import DumpConfig, run_dump

    root = tmp_path_factory.mktemp("hearing")
    cfg = write_hearing_run(root / "run", tiny_target, "encoder")
    draft = root / "draft"
    assert export_stage.main(["--run", str(root / "run"), "--output", str(draft)]) == 0
    store = root / "store"
    run_dump(parse_config(DumpConfig, ["--target", str(tiny_target), "--input", str(DATA / "speech.jsonl"),
                                       "--store", str(store), "--dtype", "fp32"], prog="dump", description="t"))
    args = {"target": str(tiny_target), "draft": str(draft), "out": str(root / "served.pt")}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.pop("VLLM_PLUGINS", None)
    proc = subprocess.run([sys.executable, __file__, "serve", json.dumps(args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return {"cfg": cfg, "store": store, "run": root / "run", "log": proc.stdout + proc.stderr,
            "records": torch.load(root / "served.pt")}


def training_row(store_dir: Path, sample_id: str, draft: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(ids, step-0 input embeddings [S - 1, H], the packed row) of the sample's training row, built as
    the trainer builds it; the step-0 query at t embeds token t + 1, so row t is ``embed(ids)[t + 1]``.
    Leaves the row's audio embeddings installed in ``draft``."""
    from modeling.training.data import collate_row
    from modeling.training.model import with_audio_ids
    from storage.store import open_store

    sample = open_store(store_dir).by_id(sample_id)
    batch = collate_row([sample], 1 << 20, with_audio=True)
    batch["tagged_ids"] = with_audio_ids(batch["input_ids"], batch["audio_positions"], draft.config.vocab_size)
    draft.audio_rows = batch["audio_embeds"]
    with torch.no_grad():
        embeds = draft.embed(batch["tagged_ids"])[0]
    return batch["input_ids"][0], embeds[1:], batch


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 values at |x| (8 significant bits): 2 ** (floor(log2 |x|) - 7)."""
    exp = torch.floor(torch.log2(x.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)))
    return torch.exp2(exp - 7)


@pytest.mark.timeout(1200)
def test_serving_feeds_the_draft_its_training_inputs(served: dict, tiny_target: Path) -> None:
    from modeling.draft.snapshot import find_step, load_draft_snapshot
    from modeling.target_io.weights import read_target_embedding
    from modeling.training.model import TrainDraft

    assert "does not support external multimodal embeddings" not in served["log"]
    cfg = served["cfg"]
    embed_table = read_target_embedding(tiny_target).float()
    draft = TrainDraft(cfg, embed_table)  # the trainer's module, with the exported weights
    draft.load_state_dict(load_draft_snapshot(find_step(served["run"])).state_dict, strict=False)
    draft.eval()
    audio_id = json.loads((tiny_target / "config.json").read_text())["audio_token_index"]
    assert len(served["records"]) == NUM_PROMPTS
    for rec in served["records"]:
        prompt = rec["prompt_ids"]
        n = len(prompt)
        ids, train_embeds, batch = training_row(served["store"], rec["id"], draft)
        assert ids[:n].tolist() == prompt, "the served prompt is not the stored sample's prompt"
        first = rec["first_pass"]
        served_embeds = first["inputs_embeds"].float()
        assert served_embeds.shape[0] == n and rec["mm_rows"] > 0
        # served row r embeds prompt token r + 1 (and the sampled token at r = n - 1)
        audio = ids[1:n] == audio_id
        assert int(audio.sum()) == rec["mm_rows"] == int(batch["audio_positions"].numel())
        text_rows = ~audio
        assert torch.equal(served_embeds[: n - 1][text_rows], train_embeds[: n - 1][text_rows])
        # audio rows: the store holds bf16(HF's fp32 projector output); the hearing class rounds
        # vLLM's fp32 projector output to bf16; the two fp32 values differ by kernel rounding only,
        # so each served value is the stored one or its bf16 neighbour
        got, want = served_embeds[: n - 1][audio], train_embeds[: n - 1][audio]
        assert torch.equal(got, got.bfloat16().float()), "served audio rows are not bf16-rounded"
        assert bool(((got - want).abs() <= bf16_ulp(want)).all()), float((got - want).abs().max())
        # ...and they are the encoder's, not the placeholder's embedding
        assert not torch.allclose(got, embed_table[audio_id].expand_as(got))
        # the draft's own forward on its training row (token t + 1 at t, the store's audio rows; the
        # last row is the target's first answer token) with the target states vLLM gave the draft
        # proposes what vLLM proposed
        draft_ids = torch.cat([batch["tagged_ids"][0, 1:n], torch.tensor([rec["first_token"]])])
        with torch.no_grad():
            normed, _ = draft(draft_ids[None], first["hidden_states"].float()[None], first["positions"][None])
            own = int(draft.draft_to_target(draft.compute_logits(normed[0, -1]).argmax()))
        assert own == rec["proposals"][0][0], (own, rec["proposals"][0])


# ---- the vLLM subprocess ----

def serve(args: dict) -> None:
    """Serve the fixture prompts one by one with hooks on the drafter; save what its first pass of
    each prompt received and what it proposed."""
    from pipeline.engine.offline import GenRequest, OfflineGenerator, Sampling, build_llm
    from stages.benchmark import BenchmarkConfig, build_prompts

    calls: list[dict] = []

    def install(worker) -> None:  # runs on the worker (in this process: no multiprocessing)
        drafter = worker.model_runner.drafter

        def record_inputs(_module, _args, kwargs) -> None:
            calls.append({k: kwargs[k].detach().clone() for k in ("inputs_embeds", "hidden_states", "positions")
                          if kwargs.get(k) is not None})

        drafter.model.register_forward_pre_hook(record_inputs, with_kwargs=True)
        propose = drafter.propose

        def recording_propose(*a, **kw):
            mm = kw.get("mm_embed_inputs")
            out = propose(*a, **kw)
            calls.append({"proposals": out.detach().clone(), "target_ids": kw["target_token_ids"].clone(),
                          "mm_rows": int(mm[1].sum()) if mm else 0})
            return out

        drafter.propose = recording_propose

    bench = BenchmarkConfig(target=args["target"], input=str(DATA / "speech.jsonl"), output="-",
                            num_prompts=NUM_PROMPTS, max_new_tokens=8)
    prompts = build_prompts(bench)[0]
    llm = build_llm(args["target"], dtype="float32", max_num_seqs=1, enable_prefix_caching=False,
                    speculative_config={"method": "eagle3", "model": args["draft"],
                                        "num_speculative_tokens": NUM_SPEC_TOKENS})
    llm.collective_rpc(install)
    engine = OfflineGenerator(llm)
    records = []
    for p in prompts:
        calls.clear()
        out = engine.generate([GenRequest(p.request.prompt_ids, p.request.audios, Sampling(8))])[0]
        first = calls[0]  # the prefill's first draft pass, then its proposals
        result = next(c for c in calls if "proposals" in c)
        records.append({"id": p.id, "prompt_ids": result["target_ids"].tolist(), "first_pass": first,
                        "proposals": result["proposals"].tolist(), "mm_rows": result["mm_rows"],
                        "first_token": out.token_ids[0]})
    engine.close()
    torch.save(records, args["out"])


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    serve(json.loads(sys.argv[2]))
