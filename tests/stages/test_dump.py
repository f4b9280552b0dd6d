"""Stage 2 end to end on the tiny target and the committed fixtures: real files, real model, no mocks."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from modeling.target_io.capture import plan_batches
from modeling.targets.qwen2_audio import Qwen2AudioFamily
from pipeline.core.config import parse_config
from pipeline.core.durable import sha256_file
from pipeline.core.faults import crash_chain, random_passages, read_trace, tracing
from pipeline.core.manifest import Manifest, ManifestMismatch
from pipeline.data.records import read_conversations
from pipeline.data.samples import load_target_processor, prepare_sample
from pipeline.data.template import ChatTokenizer
from stages.dump import DumpConfig, main, run_dump
from storage.store import open_store

REPO = Path(__file__).resolve().parents[2]
# windows of 5 line up with the 15/15 split of a 2-shard run, so both runs form the same batches;
# 800 tokens put the 76-token text-02 in one forward with three ~180-token multi-turn samples.
# fp32 halves the CPU time (no native bf16 matmul here); bf16 numerics are pinned by the bit-exact
# test below and by tests/modeling/test_capture.py.
SETTINGS = ["--sort-window", "5", "--batch-tokens", "800", "--dtype", "fp32"]
HIDDEN = ("aux_hidden", "last_hidden", "last_hidden_positions", "audio_embeds", "input_ids", "loss_mask")


def dump(target: Path, input_path: Path, store: Path, *extra: str):
    argv = ["--target", str(target), "--input", str(input_path), "--store", str(store), *SETTINGS, *extra]
    return run_dump(parse_config(DumpConfig, argv, prog="dump", description="test"))


def write_subset(fixtures_dir: Path, path: Path, ids: list[str], extra: list[dict] = ()) -> Path:
    """A jsonl of some speech.jsonl lines (audio paths made absolute) plus extra rows."""
    rows = [json.loads(x) for x in (fixtures_dir / "speech.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["id"] in ids] + list(extra)
    for row in rows:
        for turn in row["conversations"]:
            for part in turn["content"] if isinstance(turn["content"], list) else []:
                if "audio" in part:
                    part["audio"] = str(fixtures_dir / part["audio"])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepared(target: Path, input_path: Path) -> dict:
    chat = ChatTokenizer(load_target_processor(target)[0], Qwen2AudioFamily)
    return {r.id: prepare_sample(r, chat) for r in read_conversations(input_path).records}


def shard_entries(store: Path, resources: bool = False) -> dict:
    """The manifest's shard entries; without their ``resources`` (time and memory differ between runs)."""
    entries = json.loads((store / "manifest.json").read_text())["shards"]
    return entries if resources else {k: {f: v for f, v in e.items() if f != "resources"} for k, e in entries.items()}


def errors(store: Path, shard: int = 0) -> list[dict]:
    text = (store / f"errors-{shard:05d}.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def speech_store(tmp_path_factory, tiny_target, fixtures_dir) -> Path:
    """The uninterrupted reference run; ``trace.txt`` beside it lists the crash points it passed."""
    store = tmp_path_factory.mktemp("speech") / "store"
    with tracing(store.parent / "trace.txt"):
        dump(tiny_target, fixtures_dir / "speech.jsonl", store)
    return store


def cli(target: Path, input_path: Path, store: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stages.dump", "--target", str(target), "--input", str(input_path),
            "--store", str(store), *SETTINGS, *extra]


def inspect_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "storage.inspect", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def assert_same_store(got: Path, ref: Path) -> None:
    """``inspect diff`` finds no difference and ``verify --deep`` no problem (the user's own checks)."""
    diff = inspect_cli("diff", got, ref)
    assert diff.returncode == 0 and "identical" in diff.stdout, diff.stdout + diff.stderr
    verify = inspect_cli("verify", got, "--deep")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_speech_fixture_all_accepted(speech_store, fixtures_dir, tiny_target):
    (entry,) = shard_entries(speech_store, resources=True).values()
    assert (entry["input_records"], entry["accepted"], entry["rejected"]) == (30, 30, 0)
    store = open_store(speech_store)
    # resources: a fresh run forwarded every stored token, and held the target's weights (fp32) at once
    res = entry["resources"]
    assert res["tokens"] == sum(int(s["num_tokens"]) for s in store.iter_samples())
    assert res["wall_s"] > 0 and res["tokens_per_s"] == pytest.approx(res["tokens"] / res["wall_s"], rel=1e-3)
    weights = sum(4 * t.numel() for t in load_file(tiny_target / "model.safetensors").values())
    assert min(res["peak_rss_bytes"], res["peak_tree_rss_bytes"]) >= weights
    ids = [json.loads(x)["id"] for x in (fixtures_dir / "speech.jsonl").read_text().splitlines()]
    assert [s["id"] for s in store.iter_samples()] == ids  # input order, whatever the batching
    assert store.validate(deep=True) == []
    assert errors(speech_store) == []
    assert sorted(os.listdir(speech_store)) == ["errors-00000.jsonl", "locks", "manifest.json", "shards"]
    header = store.header
    assert header["aux_layers"]["by_convention"] == {"decoder_layer": [1, 3, 4], "hf_hidden_states": [2, 4, 5]}
    assert header["target"]["path"].endswith("tiny-target") and len(header["target"]["config_hash"]) == 64
    assert header["dump"]["settings"]["num_records"] == 30


def test_bad_records_accepted_and_rejected_with_reasons(tmp_path, tiny_target, fixtures_dir):
    dump(tiny_target, fixtures_dir / "bad_records.jsonl", tmp_path / "store")
    expect = json.loads((fixtures_dir / "bad_records.expect.json").read_text())
    assert [s["id"] for s in open_store(tmp_path / "store").iter_samples()] == ["good-1", "good-2"]
    rows = errors(tmp_path / "store")
    assert [r["index"] for r in rows] == [i for i, e in enumerate(expect) if e is not None]  # sorted
    for row in rows:
        assert row["field"] == expect[row["index"]]["field"] and expect[row["index"]]["reason"] in row["reason"]
    (entry,) = shard_entries(tmp_path / "store").values()
    assert (entry["input_records"], entry["accepted"], entry["rejected"]) == (23, 2, 21)
    assert sum(entry["rejected_by_reason"].values()) == 21


def test_stored_values_bit_exact_at_batch_size_one(tmp_path, tiny_target, fixtures_dir, hf_hidden_states):
    two = {"id": "two-clips", "conversations": [
        {"role": "user", "content": [{"type": "audio", "audio": "audio/clip-03.flac"},
                                     {"type": "audio", "audio": "audio/clip-04.flac"}]},
        {"role": "assistant", "content": "Two clips."}]}
    jsonl = write_subset(fixtures_dir, tmp_path / "in.jsonl", ["clip-00", "text-00", "multi-02"], [two])
    dump(tiny_target, jsonl, tmp_path / "store", "--batch-tokens", "1", "--dtype", "bf16")  # one sample a forward
    samples = prepared(tiny_target, jsonl)
    store = open_store(tmp_path / "store")
    assert len(store) == 4
    for got in store.iter_samples():
        sample = samples[got["id"]]
        hs = hf_hidden_states(sample)
        for k, layer in enumerate([1, 3, 4]):
            assert torch.equal(got["aux_hidden"][:, k], hs[layer + 1]), (got["id"], layer)
        assert torch.equal(got["last_hidden"], hs[-1][got["last_hidden_positions"]])
        assert bool(got["loss_mask"][got["last_hidden_positions"] + 1].all())
        spans = sample.encoded.audio_spans
        assert got["audio_spans"] == spans
        audio = torch.cat([hs[0][s:e] for s, e in spans]) if spans else hs[0][:0]
        assert torch.equal(got["audio_embeds"], audio)
        assert torch.equal(got["input_ids"], torch.from_numpy(sample.encoded.input_ids))


def test_batched_store_matches_to_bf16_tolerance(speech_store, tiny_target, fixtures_dir, hf_hidden_states):
    samples = prepared(tiny_target, fixtures_dir / "speech.jsonl")
    window = ["text-00", "text-01", "text-02", "multi-00", "multi-01"]  # records 25..29
    plan = plan_batches([samples[i].length for i in window], 800)
    mixed = [[window[i] for i in b] for b in plan if len(b) > 1]
    assert "text-02" in mixed[0] and "multi-00" in mixed[0]  # 76 tokens beside 183
    store = open_store(speech_store)
    for sample_id in mixed[0]:
        got = store.by_id(sample_id)
        hs = [h.to(torch.bfloat16) for h in hf_hidden_states(samples[sample_id], torch.float32)]
        for k, layer in enumerate([1, 3, 4]):
            _close(got["aux_hidden"][:, k], hs[layer + 1])
        _close(got["last_hidden"], hs[-1][got["last_hidden_positions"]])


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    diff, scale = (got.float() - ref.float()).abs(), ref.float().abs()
    assert diff.max() <= 2**-5 * scale.max() and diff.mean() <= 2**-7 * scale.mean()


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_crash_chain_then_resume_is_identical(tmp_path, speech_store, tiny_target, fixtures_dir):
    """kill -9 at random passages and at every commit step, each run resuming the last; the end
    result equals the uninterrupted store byte for byte (``AE3_FAULT_SEED`` picks other points)."""
    seed = int(os.environ.get("AE3_FAULT_SEED", "0"))
    trace = read_trace(speech_store.parent / "trace.txt")
    first, second = random_passages(len(trace), 2, seed)
    second = str(1 + int(second) // 2)  # counted in a resumed run, which passes fewer points
    specs = [first, "torn-append:progress.jsonl", second, "before-rename-dir:shard-*",
             "after-rename-dir:shard-*"]
    print(f"\nseed {seed}: {len(trace)} crash-point passages in a full run; crashing at {specs}")
    store = tmp_path / "store"
    runs = crash_chain(cli(tiny_target, fixtures_dir / "speech.jsonl", store), specs, tmp_path / "logs", cwd=REPO)
    for run in runs[:-1]:
        assert run.returncode == -signal.SIGKILL, f"{run.spec}: exit {run.returncode}\n{run.log.read_text()[-2000:]}"
    assert runs[-1].returncode == 0, runs[-1].log.read_text()[-3000:]
    assert_same_store(store, speech_store)
    assert _tree(store / "shards") == _tree(speech_store / "shards")
    assert (store / "errors-00000.jsonl").read_bytes() == (speech_store / "errors-00000.jsonl").read_bytes()
    assert shard_entries(store) == shard_entries(speech_store)


def test_full_disk_commits_nothing_then_rerun_completes(tmp_path, speech_store, tiny_target, fixtures_dir):
    store = tmp_path / "store"
    cmd = cli(tiny_target, fixtures_dir / "speech.jsonl", store)
    full = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)))
    assert full.returncode == 3, full.stderr[-3000:]
    assert "python -m stages.dump: error: cannot write" in full.stderr and "File too large (EFBIG)" in full.stderr
    assert "writing shard shard-00000-of-00001" in full.stderr and "Traceback" not in full.stderr
    assert not any(e.get("status") == "done" for e in shard_entries(store).values())
    assert not (store / "shards" / "shard-00000-of-00001").exists() and len(open_store(store)) == 0

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_store(store, speech_store)


def test_two_workers_racing_over_all_shards(tmp_path, speech_store, tiny_target, fixtures_dir):
    """Two jobs started at once on the same store and all 3 shards: each shard is written once."""
    store = tmp_path / "store"
    cmd = cli(tiny_target, fixtures_dir / "speech.jsonl", store, "--num-shards", "3")
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-2000:] for x in logs)
    made = [sorted(set(re.findall(r"(shard-\d+-of-00003): \d+ input", x))) for x in logs]
    assert sorted(made[0] + made[1]) == [f"shard-{i:05d}-of-00003" for i in range(3)], made  # no shard twice
    entries = shard_entries(store)
    assert sorted(entries) == ["00000", "00001", "00002"] and all(e["status"] == "done" for e in entries.values())
    assert sorted(os.listdir(store / "shards")) == [f"shard-{i:05d}-of-00003" for i in range(3)]
    assert_same_store(store, speech_store)


def test_two_shards_hold_what_one_shard_holds(tmp_path, speech_store, tiny_target, fixtures_dir):
    results = dump(tiny_target, fixtures_dir / "speech.jsonl", tmp_path / "store", "--num-shards", "2")
    assert [len(r.shard) for r in results] == [15, 15]
    one, two = open_store(speech_store), open_store(tmp_path / "store")
    assert len(two.shards()) == 2 and len(one) == len(two) == 30
    for a, b in zip(one.iter_samples(), two.iter_samples(), strict=True):
        assert (a["id"], a["source_hash"], a["audio_spans"]) == (b["id"], b["source_hash"], b["audio_spans"])
        for name in HIDDEN:
            assert torch.equal(a[name], b[name]), (a["id"], name)


def nan_target(tiny_target: Path, out: Path, token_id: int) -> Path:
    """A copy of the target whose embedding row for ``token_id`` is NaN (a corrupt checkpoint)."""
    shutil.copytree(tiny_target, out)
    weights = load_file(str(out / "model.safetensors"))
    weights["language_model.model.embed_tokens.weight"][token_id] = float("nan")
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_nan_capture_rejected_others_kept(tmp_path, tiny_target, fixtures_dir):
    jsonl = write_subset(fixtures_dir, tmp_path / "in.jsonl", ["clip-05", "clip-06", "text-01"])
    samples = prepared(tiny_target, jsonl)
    ids = {k: set(s.encoded.input_ids.tolist()) for k, s in samples.items()}
    unique = sorted(ids["text-01"] - ids["clip-05"] - ids["clip-06"])  # tokens only text-01 has
    target = nan_target(tiny_target, tmp_path / "nan-target", unique[0])
    (result,) = dump(target, jsonl, tmp_path / "store")  # one window, one batch: NaN beside clean rows
    assert (result.accepted, result.rejected) == (2, 1)
    (row,) = errors(tmp_path / "store")
    assert (row["id"], row["field"]) == ("text-01", "hidden_states") and "NaN" in row["reason"]
    for got in open_store(tmp_path / "store").iter_samples():
        assert bool(torch.isfinite(got["aux_hidden"]).all())


def test_over_long_rejected_or_truncated(tmp_path, tiny_target, fixtures_dir):
    jsonl = write_subset(fixtures_dir, tmp_path / "in.jsonl", ["clip-00", "text-00", "multi-00"])
    (result,) = dump(tiny_target, jsonl, tmp_path / "a", "--max-length", "150")
    assert (result.accepted, result.rejected) == (2, 1)
    (row,) = errors(tmp_path / "a")
    assert row["id"] == "multi-00" and "longer than --max-length 150" in row["reason"]
    dump(tiny_target, jsonl, tmp_path / "b", "--max-length", "150", "--truncate")
    got = open_store(tmp_path / "b").by_id("multi-00")
    assert got["num_tokens"] == 150 and got["aux_hidden"].shape[0] == 150


def test_rerun_with_other_target_or_layers_fails(tmp_path, speech_store, tiny_target, fixtures_dir, capsys):
    assert dump(tiny_target, fixtures_dir / "speech.jsonl", speech_store) == []  # complete: nothing to do
    before = _manifest(speech_store)
    with pytest.raises(ManifestMismatch, match="aux_layers"):
        dump(tiny_target, fixtures_dir / "speech.jsonl", speech_store, "--aux-layers", "0,2,6")
    other = shutil.copytree(tiny_target, tmp_path / "other-target")
    argv = ["--target", str(other), "--input", str(fixtures_dir / "speech.jsonl"), "--store", str(speech_store)]
    assert main(argv) == 2
    assert "target" in capsys.readouterr().err
    with pytest.raises(ManifestMismatch, match="max_length"):
        dump(tiny_target, fixtures_dir / "speech.jsonl", speech_store, "--max-length", "100")
    assert _manifest(speech_store) == before


def _manifest(store: Path) -> dict:
    data = json.loads((store / "manifest.json").read_text())
    data.pop("updated")  # every look under the lock stamps it
    return data


def test_stage1_directory_input(tmp_path, tiny_target, fixtures_dir):
    """Only completed stage 1 shards are read, in shard order, and generated ids are used verbatim."""
    out = tmp_path / "stage1"
    out.mkdir()
    first = write_subset(fixtures_dir, out / "shard-00000-of-00002.jsonl", ["text-00", "text-01"])
    tokenizer = load_target_processor(tiny_target)[0]
    generated = tokenizer.encode(" Paris!", add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    rows = [json.loads(x) for x in first.read_text().splitlines()]
    rows[0]["conversations"][1]["token_ids"] = generated
    first.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_subset(fixtures_dir, out / "shard-00001-of-00002.jsonl", ["text-02"])  # not done: ignored
    manifest = Manifest(out)
    manifest.init({"stage": "regenerate", "num_shards": 2}, must_match=())
    manifest.mark_shard(0, {"status": "done", "files": {first.name: {"sha256": sha256_file(first)}}})
    (result,) = dump(tiny_target, out, tmp_path / "store")
    store = open_store(tmp_path / "store")
    assert [s["id"] for s in store.iter_samples()] == ["text-00", "text-01"]
    got = store.by_id("text-00")
    assert got["input_ids"][got["loss_mask"].bool()].tolist() == generated
    first.write_text(first.read_text() + "\n")  # edited after stage 1 committed it
    with pytest.raises(ValueError, match="changed after stage 1"):
        dump(tiny_target, out, tmp_path / "store2")


def test_too_short_clip_rejected(tmp_path, tiny_target, fixtures_dir):
    """A 30 ms clip is one audio token: transformers would re-expand it (its legacy path)."""
    noise = torch.Generator().manual_seed(0)
    sf.write(tmp_path / "blip.wav", (0.1 * torch.randn(480, generator=noise)).numpy(), 16_000)
    blip = {"id": "blip", "conversations": [
        {"role": "user", "content": [{"type": "audio", "audio": str(tmp_path / "blip.wav")}]},
        {"role": "assistant", "content": "A blip."}]}
    jsonl = write_subset(fixtures_dir, tmp_path / "in.jsonl", ["text-00"], [blip])
    (result,) = dump(tiny_target, jsonl, tmp_path / "store")
    (row,) = errors(tmp_path / "store")
    assert (result.accepted, row["id"], row["field"]) == (1, "blip", "audio") and "1 audio token" in row["reason"]
