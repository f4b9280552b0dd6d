"""GLM-ASR in vLLM: one float32 engine with a random EAGLE-3 draft, in a subprocess (this file as a script).

In float32, speculative greedy decoding equals plain greedy decoding, so the one engine start checks both
that vLLM loads the tiny target (prompt expansion and greedy tokens equal transformers') and that it
serves it as an EAGLE-3 target (the plugin's subclass, aux layers, draft proposals).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from glm_asr_helpers import (  # the glm_* are the GLM-ASR fixtures
    CLIPS,
    FAMILY,
    PROMPT,
    REPO,
    glm_hf_fp32,  # noqa: F401
    glm_processor,  # noqa: F401
    glm_target,  # noqa: F401
    hf_greedy,
    hf_inputs,
    load_clip,
    long_clip,
    render,
    two_clip_turns,
)

from modeling.targets.glm_asr_tiny import NEVER_GENERATED

# Greedy tokens compared between vLLM and transformers, both float32 (bf16 rounding flips near-tied
# argmaxes of these random weights within a few tokens, and differently on CPUs with native bf16).
COMPARED_TOKENS = 12
SPEC_TOKENS = 3


def export_random_draft(target: Path, root: Path) -> Path:
    """A random full-vocab EAGLE-3 draft exported for vLLM, through a run dir as the trainer leaves it."""
    from modeling.draft.config import DraftConfig
    from modeling.draft.model import Eagle3Draft
    from modeling.draft.snapshot import COMMITTED, save_draft_snapshot
    from stages import export as export_stage

    config = json.loads((target / "config.json").read_text())
    text = FAMILY.text_config(config)
    cfg = DraftConfig.from_target_config(text, text["vocab_size"])
    torch.manual_seed(0)
    step = root / "run" / "checkpoints" / "step-000001"
    info = {"path": str(target), "architecture": FAMILY.architectures[0], "num_layers": cfg.num_target_layers}
    save_draft_snapshot(step, Eagle3Draft(cfg).export_state_dict(), cfg, None, list(cfg.aux_layer_ids), info)
    (step / COMMITTED).write_text("")
    (step.parent / "latest").write_text(step.name)
    (root / "run" / "run.json").write_text(json.dumps({"target": str(target)}))
    assert export_stage.main(["--run", str(root / "run"), "--output", str(root / "draft")]) == 0
    return root / "draft"


@pytest.fixture(scope="module")
def engine_run(target: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("vllm")
    args = {"target": str(target), "draft": str(export_random_draft(target, out)), "out": str(out / "result.json")}
    # a script's sys.path starts at its own folder: PYTHONPATH makes this checkout's modules (and plugin)
    # the ones imported here and in vLLM's engine processes
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("VLLM_PLUGINS", None)  # the plugin must load through its entry point
    with open(out / "engine.log", "w") as log:
        rc = subprocess.run([sys.executable, __file__, "engine", json.dumps(args)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, timeout=1500).returncode
    run = {"rc": rc, "log": (out / "engine.log").read_text()}
    assert rc == 0, run["log"][-6000:]
    return {**run, **json.loads((out / "result.json").read_text())}


def test_vllm_serves_the_tiny_target_like_transformers(engine_run: dict[str, Any], processor: Any,
                                                       hf_fp32: Any) -> None:
    waves = [load_clip(c) for c in CLIPS] + [long_clip(45.3)]
    for wave, ids, prompt in zip(waves, engine_run["tokens"], engine_run["prompt_ids"], strict=True):
        inputs = hf_inputs(processor, wave)
        assert prompt == inputs["input_ids"][0].tolist()  # vLLM expands <|pad|> to the same count
        assert ids == hf_greedy(hf_fp32, inputs, COMPARED_TOKENS)
    assert len({tuple(t) for t in engine_run["tokens"]}) == len(waves), engine_run["tokens"]  # audio matters
    never = processor.tokenizer.convert_tokens_to_ids(list(NEVER_GENERATED))
    assert not set(never) & {t for ids in engine_run["tokens"] for t in ids}
    # Two clips in one prompt: GlmAsrProcessor refuses them (processing_glmasr.py:126), and vLLM calls it
    # on the clips its multimodal cache lacks, so the request fails (clips seen before would pass).
    # The HF model itself takes them (the capture test's two-clip sample).
    assert "Failed to apply GlmAsrProcessor" in engine_run["two_clips"]
    assert "Got 1 text but 2 audios; they must match 1:1" in engine_run["two_clips"]


def test_vllm_runs_the_target_as_eagle3_target(engine_run: dict[str, Any]) -> None:
    plugin = engine_run["plugin"]
    # the registry entry vLLM's own plugin loading left (the entry point, not this test, registered it)
    assert "module_name='modeling.targets.vllm_classes'" in plugin["registry"]
    assert "class_name='GlmAsrEagle3ForConditionalGeneration'" in plugin["registry"]
    assert plugin["subclass"] and plugin["supports_eagle3"] and not plugin["upstream_supports_eagle3"]
    assert plugin["name"] == FAMILY.architectures[0] and plugin["pickles"] and plugin["new_members"] == ["__init__"]
    assert plugin["decoder_is_eagle_mixin"]
    spec = engine_run["spec"]
    assert spec["num_drafts"] > 0 and spec["num_draft_tokens"] == SPEC_TOKENS * spec["num_drafts"]
    # the target fed the draft the layers the export names (vLLM's input convention: output ids + 1)
    assert "Using auxiliary layers from speculative config: (2, 4, 5)" in engine_run["log"]


def engine(args: dict[str, Any]) -> None:
    """Subprocess body: the plugin's class, then one float32 EAGLE-3 engine on the tiny target."""
    import pickle

    from transformers import AutoProcessor
    from vllm import LLM, ModelRegistry, SamplingParams
    from vllm.model_executor.models import glmasr, llama
    from vllm.model_executor.models.interfaces import EagleModelMixin, supports_eagle3

    from modeling.targets import vllm_classes
    from pipeline.engine.spec_counters import SpecCounters

    llm = LLM(model=args["target"], dtype="float32", max_model_len=2048, gpu_memory_utilization=0.3,
              enforce_eager=True, limit_mm_per_prompt={"audio": 2}, seed=0, disable_log_stats=False,
              speculative_config={"method": "eagle3", "model": args["draft"], "num_speculative_tokens": SPEC_TOKENS})
    cls = vllm_classes.GlmAsrEagle3ForConditionalGeneration
    plugin = {"registry": repr(ModelRegistry.models["GlmAsrForConditionalGeneration"]),  # after vLLM loaded the plugin
              "subclass": issubclass(cls, glmasr.GlmAsrForConditionalGeneration), "name": cls.__name__,
              "supports_eagle3": supports_eagle3(cls),
              "upstream_supports_eagle3": supports_eagle3(glmasr.GlmAsrForConditionalGeneration),
              "pickles": pickle.loads(pickle.dumps(cls)) is cls,
              # only __init__ (the shim) is new; the interface methods come from SupportsEagle3
              "new_members": sorted(k for k in vars(cls) if not k.startswith("_") or k == "__init__"),
              "decoder_is_eagle_mixin": issubclass(llama.LlamaModel, EagleModelMixin)}
    prompt = AutoProcessor.from_pretrained(args["target"]).apply_chat_template(
        PROMPT, add_generation_prompt=True, tokenize=False)
    waves = [load_clip(c) for c in CLIPS] + [long_clip(45.3)]
    requests = [{"prompt": prompt, "multi_modal_data": {"audio": (w, 16_000)}} for w in waves]
    outputs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=COMPARED_TOKENS), use_tqdm=False)
    result = {"plugin": plugin, "tokens": [list(o.outputs[0].token_ids) for o in outputs],
              "prompt_ids": [list(o.prompt_token_ids) for o in outputs],
              "spec": SpecCounters.from_snapshot(llm.get_metrics()).summary(SPEC_TOKENS)}
    two = [load_clip("clip-03"), load_clip("clip-04")]  # not in vLLM's multimodal cache yet
    try:
        llm.generate([{"prompt": render(two_clip_turns(), until_turn=1),
                       "multi_modal_data": {"audio": [(w, 16_000) for w in two]}}],
                     SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
        result["two_clips"] = "served"
    except Exception as err:  # noqa: BLE001 - the message is the result
        result["two_clips"] = f"{type(err).__name__}: {err} <- {err.__cause__!r}"
    Path(args["out"]).write_text(json.dumps(result))
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__" and sys.argv[1:2] == ["engine"]:
    engine(json.loads(sys.argv[2]))
