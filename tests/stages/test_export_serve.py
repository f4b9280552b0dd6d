"""Export a draft, serve it as EAGLE-3 in vLLM on CPU (plugin active), benchmark it.

The draft is a random ``Eagle3Draft`` for the tiny target with a vocab built from the fixture
answers, written into a run dir through ``save_draft_snapshot`` + ``COMMITTED`` as the trainer
does. vLLM engines start in two subprocesses that run side by side, once per module: the
benchmark CLI (plain + speculative engine) and this file run as a script (``probe``: the
text-only model with the plugin off and on, then the full-vocab draft). Engine starts cost
30-90 s each here; everything else is fast.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modeling.draft.config import DraftConfig
from modeling.draft.model import Eagle3Draft
from modeling.draft.snapshot import (
    COMMITTED,
    SnapshotError,
    find_step,
    load_draft_snapshot,
    save_draft_snapshot,
)
from modeling.draft.vocab import build_draft_vocab, count_supervised_tokens
from modeling.targets.qwen2_audio import Qwen2AudioFamily
from pipeline.core.faults import crash_chain
from pipeline.engine.spec_counters import SpecCounters
from stages import export as export_stage
from stages.benchmark_report import format_table

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
REDUCED_VOCAB = 320
# bf16, the engine default for this bf16 checkpoint: with native bf16 the speculative outputs may
# part from the plain ones at near-ties, and the tie check must call every such divergence a tie
BENCH_ARGS = ["--num-prompts", "4", "--max-new-tokens", "32", "--num-spec-tokens", "4", "--repeats", "2"]
AUDIO_ARCH = "Qwen2AudioForConditionalGeneration"


def write_run(run_dir: Path, target: Path, draft_vocab_size: int, steps: dict[int, bool], seed: int = 0) -> DraftConfig:
    """A training run dir as the trainer leaves it: {step: committed?} snapshots of a random draft."""
    from modeling.targets import target_text_config
    from pipeline.data.records import read_conversations
    from pipeline.data.samples import load_target_processor
    from pipeline.data.template import ChatTokenizer

    cfg = DraftConfig.from_target_config(target_text_config(target), draft_vocab_size)
    vocab = None
    if draft_vocab_size < cfg.vocab_size:
        chat = ChatTokenizer(load_target_processor(target)[0], Qwen2AudioFamily)
        counts = torch.zeros(cfg.vocab_size, dtype=torch.long)
        for rec in read_conversations(DATA / "speech.jsonl", check_audio=False).records:
            enc = chat.encode(rec.turns)
            counts += count_supervised_tokens(torch.from_numpy(enc.input_ids), torch.from_numpy(enc.loss_mask),
                                              cfg.vocab_size)
        vocab = build_draft_vocab(counts, draft_vocab_size)
    torch.manual_seed(seed)
    draft = Eagle3Draft(cfg)
    if vocab is not None:
        draft.set_vocab_mapping(vocab.d2t, vocab.t2d)
    info = {"path": str(target), "architecture": AUDIO_ARCH, "num_layers": cfg.num_target_layers}
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"target": str(target)}))
    for step, committed in sorted(steps.items()):
        step_dir = run_dir / "checkpoints" / f"step-{step:06d}"
        save_draft_snapshot(step_dir, draft.export_state_dict(), cfg, vocab, list(cfg.aux_layer_ids), info)
        if committed:
            (step_dir / COMMITTED).write_text("")
            (run_dir / "checkpoints" / "latest").write_text(step_dir.name)
    return cfg


def export(run_dir: Path, out: Path, *extra: str) -> Path:
    assert export_stage.main(["--run", str(run_dir), "--output", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def exports(tiny_target: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    write_run(root / "run-reduced", tiny_target, REDUCED_VOCAB, {5: True, 10: True, 15: False})
    write_run(root / "run-full", tiny_target, 640, {10: True}, seed=1)
    return {"run": root / "run-reduced", "vllm": export(root / "run-reduced", root / "draft-vllm"),
            "sglang": export(root / "run-reduced", root / "draft-sglang", "--engine", "sglang"),
            "full": export(root / "run-full", root / "draft-full")}


def test_find_step_picks_committed_steps_only(exports: dict[str, Path], tmp_path: Path) -> None:
    run = exports["run"]
    assert find_step(run).name == "step-000010"  # step 15 has no COMMITTED marker
    assert find_step(run, 5).name == "step-000005"
    with pytest.raises(SnapshotError, match=r"no committed step 15; committed steps: \[5, 10\].*step-000015"):
        find_step(run, 15)
    (tmp_path / "checkpoints" / "step-000001").mkdir(parents=True)
    with pytest.raises(SnapshotError, match="no committed checkpoint"):
        find_step(tmp_path)


def test_snapshot_round_trip_and_validation(exports: dict[str, Path], tmp_path: Path) -> None:
    snap = load_draft_snapshot(find_step(exports["run"]))
    cfg = snap.draft_config
    assert snap.aux_layer_ids_output_convention == [1, 3, 4] == list(cfg.aux_layer_ids)
    assert "embed_tokens.weight" not in snap.state_dict and snap.state_dict["fc.weight"].dtype == torch.float32
    assert torch.equal(snap.state_dict["d2t"], snap.vocab.d2t) and snap.target_info["architecture"] == AUDIO_ARCH
    with pytest.raises(SnapshotError, match="differ from the draft config"):  # input-convention ids by mistake
        save_draft_snapshot(tmp_path, snap.state_dict, cfg, snap.vocab, [2, 4, 5], {})
    bad = dict(snap.state_dict)
    bad.pop("lm_head.weight")
    with pytest.raises(SnapshotError, match=r"missing \['lm_head.weight'\]"):
        save_draft_snapshot(tmp_path, bad, cfg, snap.vocab, [1, 3, 4], {})
    step = tmp_path / "step-000001"
    shutil.copytree(find_step(exports["run"]), step)
    (step / "draft" / "vocab.safetensors").unlink()
    with pytest.raises(SnapshotError, match=r"missing \['vocab.safetensors'\]"):
        load_draft_snapshot(step)


def test_export_writes_each_engines_convention(exports: dict[str, Path]) -> None:
    vllm_cfg = json.loads((exports["vllm"] / "config.json").read_text())
    sglang_cfg = json.loads((exports["sglang"] / "config.json").read_text())
    vllm_ids = vllm_cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    sglang_ids = sglang_cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    assert vllm_ids == [i + 1 for i in sglang_ids] == [2, 4, 5]
    assert vllm_cfg["architectures"] == ["LlamaForCausalLMEagle3"] and vllm_cfg["draft_vocab_size"] == REDUCED_VOCAB
    assert vllm_cfg["target_hidden_size"] == 256 and vllm_cfg["norm_before_residual"] is False
    info = json.loads((exports["vllm"] / "export_info.json").read_text())
    assert info["aux_layer_ids"] == {"output_convention": [1, 3, 4], "vllm": [2, 4, 5], "sglang": [1, 3, 4],
                                     "written": [2, 4, 5]}
    assert info["source"]["step_name"] == "step-000010" and info["target"]["architecture"] == AUDIO_ARCH
    tensors = load_file(str(exports["vllm"] / "model.safetensors"))
    assert set(tensors) == {"fc.weight", "norm.weight", "lm_head.weight", "d2t"} | {
        f"midlayer.{n}.weight" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                          "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                                          "hidden_norm", "input_layernorm", "post_attention_layernorm")}
    assert tensors["d2t"].dtype == torch.int64 and tensors["fc.weight"].dtype == torch.bfloat16
    with safe_open(str(exports["full"] / "model.safetensors"), framework="pt") as f:
        assert "d2t" not in f.keys() and "t2d" not in f.keys()  # vLLM refuses d2t on a full-vocab draft
    assert not [p for p in exports["vllm"].parent.iterdir() if ".tmp-" in p.name]


def test_export_killed_at_each_step_of_the_replace_recovers_on_rerun(exports: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    """kill -9 before the rename, and between moving the old export aside and renaming the new one
    in; each rerun leaves exactly what an uninterrupted export writes, and no debris."""
    out = tmp_path / "draft"
    cmd = [sys.executable, "-m", "stages.export", "--run", str(exports["run"]), "--output", str(out)]
    runs = crash_chain(cmd, ["before-rename-dir:draft"], tmp_path / "logs-1", cwd=REPO, timeout_s=300)
    runs += crash_chain([*cmd, "--step", "5"], ["dir-swap:draft"], tmp_path / "logs-2", cwd=REPO, timeout_s=300)
    assert [r.returncode for r in runs] == [-9, 0, -9, 0], [r.log.read_text()[-1500:] for r in runs]
    assert json.loads((out / "export_info.json").read_text())["source"]["step_name"] == "step-000005"
    again = export(exports["run"], tmp_path / "reference", "--step", "5")
    for name in ("model.safetensors", "config.json"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draft", "logs-1", "logs-2", "reference"]


def test_export_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run" / "checkpoints" / "step-000002").mkdir(parents=True)
    assert export_stage.main(["--run", str(tmp_path / "run"), "--output", str(tmp_path / "out")]) == 2
    assert "no committed checkpoint" in capsys.readouterr().err
    assert export_stage.main(["--run", str(tmp_path / "nope"), "--output", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_benchmark_compare_draft_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stages import benchmark

    base = ["--target", str(tmp_path), "--input", str(DATA / "speech.jsonl"), "--output", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit) as exit_info:  # argparse-level: the usage and the reason, status 2
        benchmark.main([*base, "--draft", str(tmp_path), "--compare-draft", str(tmp_path)])
    assert exit_info.value.code == 2 and "--compare-draft needs --compare-output" in capsys.readouterr().err
    sglang = tmp_path / "sglang"
    sglang.mkdir()
    (sglang / "config.json").write_text("{}")
    (sglang / "export_info.json").write_text(json.dumps({"engine": "sglang"}))
    vllm_draft = tmp_path / "vllm"
    vllm_draft.mkdir()
    (vllm_draft / "config.json").write_text("{}")
    # the compared draft is checked before any engine starts, like --draft
    assert benchmark.main([*base, "--draft", str(vllm_draft), "--compare-draft", str(sglang),
                           "--compare-output", str(tmp_path / "c.json")]) == 2
    assert "exported for SGLang" in capsys.readouterr().err and not (tmp_path / "r.json").exists()


def test_spec_counters_from_prometheus_text() -> None:
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    reg = CollectorRegistry()
    labels = {"model_name": "m", "engine": "0"}
    for name, value in (("num_drafts", 10), ("num_draft_tokens", 40), ("num_accepted_tokens", 15)):
        Counter(f"vllm:spec_decode_{name}", "doc", list(labels), registry=reg).labels(**labels).inc(value)
    per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos", "doc", [*labels, "position"], registry=reg)
    for pos, value in enumerate((8, 4, 2, 1)):
        per_pos.labels(**labels, position=str(pos)).inc(value)
    counters = SpecCounters.from_prometheus(generate_latest(reg).decode()) - SpecCounters(2, 8, 3, [2, 1, 0, 0])
    summary = counters.summary(4)
    assert summary["mean_acceptance_length"] == 1 + 12 / 8
    assert summary["per_position_acceptance_rate"] == [6 / 8, 3 / 8, 2 / 8, 1 / 8]


def test_benchmark_prompts_pass_over_each_bad_record_with_its_reason(tiny_target: Path) -> None:
    from stages.benchmark import BenchmarkConfig, build_prompts

    cfg = BenchmarkConfig(target=str(tiny_target), input=str(DATA / "bad_records.jsonl"), output="-",
                          num_prompts=100, max_new_tokens=32)
    prompts, rejected = build_prompts(cfg)
    expect = json.loads((DATA / "bad_records.expect.json").read_text())
    # a prompt needs no answer: the record without an assistant turn is a usable prompt here
    bad = {i: e for i, e in enumerate(expect) if e and "no assistant turn" not in e["reason"]}
    assert [p.id for p in prompts] == ["good-1", "no-assistant", "good-2"]
    assert [r.index for r in rejected] == sorted(bad)
    assert len(prompts) + len(rejected) == len(expect)  # nothing dropped silently
    for rej in rejected:
        assert rej.field == bad[rej.index]["field"] and bad[rej.index]["reason"] in rej.reason, rej.message()
    over = next(r for r in rejected if r.record_id == "over-long")
    assert "+ --max-new-tokens 32 is longer than the context (8192)" in over.reason
    # --num-prompts counts usable prompts, passing over the bad records before them
    prompts, rejected = build_prompts(BenchmarkConfig(**{**cfg.__dict__, "num_prompts": 2}))
    assert [p.id for p in prompts] == ["good-1", "no-assistant"] and [r.index for r in rejected] == sorted(
        i for i in bad if i < 12)


def test_plugin_class_adds_only_the_eagle3_interface() -> None:
    import pickle

    from vllm.model_executor.models.interfaces import supports_eagle3
    from vllm.model_executor.models.qwen2_audio import Qwen2AudioForConditionalGeneration as Upstream

    from modeling import vllm_plugin
    from modeling.targets import vllm_classes

    vllm_plugin.register()  # what vLLM does first in every process it starts
    cls = vllm_classes.Qwen2AudioEagle3ForConditionalGeneration  # what the registry's lazy entry resolves
    assert issubclass(cls, Upstream) and supports_eagle3(cls) and not supports_eagle3(Upstream)
    assert cls.__name__ == AUDIO_ARCH and pickle.loads(pickle.dumps(cls)) is cls
    # only __init__ is new (it sets image_token_index); the interface methods come from SupportsEagle3
    assert [k for k in vars(cls) if not k.startswith("_")] == [] and "__init__" in vars(cls)


# ---- vLLM engines (subprocesses) ----

def text_only_model(target: Path, out: Path) -> Path:
    """The tiny target's language model saved as a plain Qwen2ForCausalLM."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((target / "config.json").read_text())["text_config"]
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg))
    weights = load_file(str(target / "model.safetensors"))
    save_file({k.removeprefix("language_model."): v for k, v in weights.items() if k.startswith("language_model.")},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(target / name, out / name)
    return out


@pytest.fixture(scope="module")
def engine_runs(exports: dict[str, Path], tiny_target: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("serve")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_PLUGINS", None)
    probe_args = {"target": str(tiny_target), "text_model": str(text_only_model(tiny_target, out / "qwen2-text")),
                  "full_draft": str(exports["full"]), "out": str(out / "probe.json")}
    cmds = {"bench": [sys.executable, "-m", "stages.benchmark", "--target", str(tiny_target), "--draft",
                      str(exports["vllm"]), "--input", str(DATA / "speech.jsonl"), *BENCH_ARGS,
                      "--output", str(out / "RESULT.json")],
            "probe": [sys.executable, __file__, "probe", json.dumps(probe_args)]}
    procs = {}
    for name, cmd in cmds.items():  # side by side: the engine starts overlap
        with open(out / f"{name}.log", "w") as log_file:
            procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    runs = {}
    for name, proc in procs.items():
        rc = proc.wait(timeout=1500)
        runs[name] = {"rc": rc, "log": (out / f"{name}.log").read_text()}
    runs["out"] = out
    return runs


def _ok(run: dict) -> None:
    assert run["rc"] == 0, run["log"][-4000:]


@pytest.mark.timeout(1800)
def test_benchmark_cli_serves_the_export_as_eagle3(engine_runs: dict) -> None:
    _ok(engine_runs["bench"])
    result = json.loads((engine_runs["out"] / "RESULT.json").read_text())
    acc = result["acceptance"]
    assert acc["num_drafts"] > 0 and acc["num_draft_tokens"] == 4 * acc["num_drafts"]
    assert acc["mean_acceptance_length"] == pytest.approx(1 + acc["num_accepted_tokens"] / acc["num_drafts"])
    assert len(acc["per_position_acceptance_rate"]) == 4
    for name in ("plain", "speculative"):
        run = result[name]
        assert run["requests"] == 4 and run["errors"] == 0 and run["output_tokens"] > 0
        assert run["output_tokens_per_s"] > 0 and run["requests_per_s"] > 0 and run["wer"] is not None
        assert run["repeats"] == 2 and len(run["wall_s_all"]) == 2 and run["repeat_outputs_equal"] is True
        lo, hi = run["output_tokens_per_s_range"]
        assert lo <= run["output_tokens_per_s"] <= hi and run["dtype"] == "bf16"
    lo, hi = result["speedup_range"]
    assert 0 < lo <= result["speedup"] <= hi
    # lossless up to bf16 near-ties: every divergence scored, none a real mismatch
    assert result["num_real_mismatches"] == 0, result["divergences"]
    assert result["num_numerical_ties"] == result["num_mismatched"] == len(result["divergences"])
    for d in result["divergences"]:
        assert d["numerical_tie"] and d["top_logit"] - min(d["logit_a"], d["logit_b"]) <= d["bound"], d
    n = result["num_mismatched"]
    assert result["lossless_verdict"] == ("equal" if n == 0 else
                                          f"equal up to numerical ties ({n}/4 diverge at near-ties)")
    assert result["outputs_equal"] is (n == 0) and result["reference_reproduced"] is None  # raw jsonl: no ids
    assert result["draft_export_info"]["aux_layer_ids"]["vllm"] == [2, 4, 5]
    # the target really fed the draft the layers the export names (vLLM's input convention)
    assert "Using auxiliary layers from speculative config: (2, 4, 5)" in engine_runs["bench"]["log"]
    assert "mean acceptance length" in engine_runs["bench"]["log"]
    assert format_table(result).count("\n") >= 10
    rows = [json.loads(line) for line in Path(result["outputs_file"]).read_text().splitlines()]
    assert [r["id"] for r in rows] == ["clip-00", "clip-01", "clip-02", "clip-03"]


@pytest.mark.timeout(1800)
def test_full_vocab_draft_without_d2t_loads_and_matches_plain(engine_runs: dict, tiny_target: Path) -> None:
    from modeling.target_io.tie_check import DivergenceCase, TieChecker
    from stages.benchmark import BenchmarkConfig, build_prompts

    _ok(engine_runs["probe"])
    _ok(engine_runs["bench"])
    probe = json.loads((engine_runs["out"] / "probe.json").read_text())
    rows = [json.loads(line) for line in (engine_runs["out"] / "RESULT.outputs.jsonl").read_text().splitlines()]
    full = probe["full_vocab"]
    assert full["errors"] == [None] * 4 and full["acceptance"]["num_drafts"] > 0
    # equal to the plain bf16 run up to near-ties, scored the way the benchmark scores them
    cfg = BenchmarkConfig(target=str(tiny_target), input=str(DATA / "speech.jsonl"), output="-", num_prompts=4,
                          max_new_tokens=32)
    cases = [DivergenceCase(p.id, p.request.prompt_ids, p.request.audios, r["plain"]["token_ids"], ids)
             for p, r, ids in zip(build_prompts(cfg)[0], rows, full["token_ids"], strict=True)]
    scored = TieChecker(tiny_target).score(cases, "bf16")
    assert all(d.numerical_tie for d in scored), [d.to_dict() for d in scored]
    assert len(scored) == sum(c.output_a != c.output_b for c in cases)


@pytest.mark.timeout(1800)
def test_plugin_leaves_text_only_models_alone(engine_runs: dict) -> None:
    _ok(engine_runs["probe"])
    probe = json.loads((engine_runs["out"] / "probe.json").read_text())
    reg_off, reg_on = probe["registry_off"], probe["registry_on"]
    assert reg_on["Qwen2ForCausalLM"] == reg_off["Qwen2ForCausalLM"]  # same registry entry
    assert "modeling.targets.vllm_classes" not in reg_off[AUDIO_ARCH]
    assert "modeling.targets.vllm_classes" in reg_on[AUDIO_ARCH]
    assert probe["text_on"] == probe["text_off"] and all(len(ids) == 16 for ids in probe["text_on"])


def _greedy(model: str, prompts: list[list[int]]) -> list[list[int]]:
    from pipeline.engine.offline import GenRequest, OfflineGenerator, Sampling, build_llm

    engine = OfflineGenerator(build_llm(model, max_num_seqs=4))
    try:
        return [r.token_ids for r in engine.generate([GenRequest(p, [], Sampling(16)) for p in prompts])]
    finally:
        engine.close()


def probe(args: dict) -> None:
    """Subprocess body: registry and greedy output of a text-only model with the plugin off, then on;
    then the full-vocab draft as EAGLE-3 draft of the tiny target."""
    os.environ["VLLM_PLUGINS"] = ""  # off in this process and the engine processes it spawns
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    from modeling import vllm_plugin
    from pipeline.data.samples import load_target_processor
    from stages.benchmark import BenchmarkConfig, build_prompts, run_offline

    def registry() -> dict[str, str]:
        return {a: repr(ModelRegistry.models[a]) for a in ("Qwen2ForCausalLM", AUDIO_ARCH)}

    tok = load_target_processor(args["target"])[0]
    prompts = [tok.encode(t) for t in ("The weather will be", "Once upon a time, a keeper", "Seven small boats")]
    load_general_plugins()
    out: dict = {"registry_off": registry(), "text_off": _greedy(args["text_model"], prompts)}
    del os.environ["VLLM_PLUGINS"]  # engine processes load every plugin again
    vllm_plugin.register()  # this process is past its one plugin-loading point
    out.update(registry_on=registry(), text_on=_greedy(args["text_model"], prompts))
    cfg = BenchmarkConfig(target=args["target"], draft=args["full_draft"], input=str(DATA / "speech.jsonl"),
                          output="-", num_prompts=4, max_new_tokens=32, num_spec_tokens=4)
    run = run_offline(cfg, build_prompts(cfg)[0], cfg.draft)
    out["full_vocab"] = {"token_ids": [r.token_ids for r in run.results], "errors": [r.error for r in run.results],
                         "acceptance": run.spec.summary(4) if run.spec else None}
    Path(args["out"]).write_text(json.dumps(out))


if __name__ == "__main__" and sys.argv[1:2] == ["probe"]:
    probe(json.loads(sys.argv[2]))
