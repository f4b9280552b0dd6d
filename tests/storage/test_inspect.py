"""``python -m storage.inspect`` on real files: small stores written with the storage writer
(ids and loss masks from the chat template over tests/data/speech.jsonl, random bf16 states)
and stage 1 directories written by ``stages.regenerate.run`` with a scripted engine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling.targets.qwen2_audio import Qwen2AudioFamily
from pipeline.core.durable import sha256_file
from pipeline.core.manifest import Manifest
from pipeline.core.shards import plan_shards
from pipeline.data.records import Rejection, read_conversations
from pipeline.data.samples import load_target_processor
from pipeline.data.template import ChatTokenizer
from pipeline.engine.offline import GenResult
from storage.inspect import main
from storage.sample import CapturedSample
from storage.store import create_store, make_header, open_store
from storage.writer import ShardWriter, commit_shard

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
H = 64
LAYERS = {"decoder_layer": [1, 3, 5], "hf_hidden_states": [2, 4, 6]}
OUTLIER_GAIN = 50.0  # channel 0 of the first aux layer: the one outlier channel stats must find


def run_cli(capsys, *argv: str | Path) -> tuple[int, str]:
    status = main([str(a) for a in argv])
    return status, capsys.readouterr().out


def run_json(capsys, *argv: str | Path) -> tuple[int, dict]:
    status, out = run_cli(capsys, *argv, "--json")
    return status, json.loads(out)


# ---- stores ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_target):
    return load_target_processor(tiny_target)[0]


def capture(sample_id: str, encoded, seed: int) -> CapturedSample:
    g = torch.Generator().manual_seed(seed)
    n = len(encoded.input_ids)
    mask = torch.from_numpy(encoded.loss_mask.astype(np.int64))
    pos = (mask[1:] == 1).nonzero().flatten()
    n_audio = sum(e - s for s, e in encoded.audio_spans)
    aux = torch.randn(n, 3, H, generator=g) * 4
    aux[:, 0, 0] *= OUTLIER_GAIN
    return CapturedSample(
        id=sample_id, source_hash=f"h-{sample_id}", input_ids=torch.from_numpy(encoded.input_ids), loss_mask=mask,
        aux_hidden=aux.to(torch.bfloat16), last_hidden=torch.randn(len(pos), H, generator=g).to(torch.bfloat16),
        last_hidden_positions=pos, audio_embeds=torch.randn(n_audio, H, generator=g).to(torch.bfloat16),
        audio_spans=encoded.audio_spans, meta={"seed": seed})


@pytest.fixture(scope="module")
def samples(tokenizer) -> list[CapturedSample]:
    chat = ChatTokenizer(tokenizer, Qwen2AudioFamily)
    records = read_conversations(DATA / "speech.jsonl", check_audio=False).records[:12]
    return [capture(r.id, chat.encode(r.turns, audio_token_counts=[4 + r.index % 5] * len(r.audio_paths)), r.index)
            for r in records]


def write_rejection(root: Path, shard_index: int, rejection: Rejection) -> dict:
    """One rejection in the shard's errors file, with the manifest fields stage 2 records."""
    path = root / f"errors-{shard_index:05d}.jsonl"
    path.write_text(json.dumps(rejection.to_dict(), sort_keys=True) + "\n")
    return {"num_rejected": 1, "rejected_by_field": {rejection.field: 1}, "errors_file": path.name,
            "errors_sha256": sha256_file(path)}


REJECTIONS = [Rejection(90, 1, "in.jsonl", "nan-1", "hidden_states", "sample 'nan-1': aux_hidden holds 3 NaN/Inf"),
              Rejection(91, 2, "in.jsonl", "quiet", "conversations[0].content[0].audio", "/data/q.flac: silence (rms 0)")]


def build_store(root: Path, samples: list[CapturedSample], num_shards: int = 4, committed=(0, 1),
                partial=(2,)) -> None:
    """Shards ``committed`` complete (one rejection each), ``partial`` killed after one flush, the rest missing."""
    manifest = create_store(root, make_header(
        target_path="/models/tiny", target_config_hash="cafe", hidden_size=H, layer_ids=LAYERS["decoder_layer"],
        layer_convention="decoder_layer", layer_ids_by_convention=LAYERS, chunk_bytes=16 << 10))
    manifest.update(lambda d: d.setdefault("dump", {"settings": {"num_shards": num_shards},
                                                    "input": ["/data/regenerated/shard-00000-of-00001.jsonl"]}))
    for shard in plan_shards(len(samples), num_shards):
        if shard.index in committed:
            with ShardWriter(root, shard) as w:
                for s in samples[shard.start:shard.stop]:
                    w.write(s)
                entry = w.finish()
            entry.update(write_rejection(root, shard.index, REJECTIONS[shard.index % 2]),
                         num_input=len(shard) + 1, num_accepted=len(shard))
            commit_shard(manifest, shard, entry)
        elif shard.index in partial:
            w = ShardWriter(root, shard)
            w.write(samples[shard.start])
            w.flush()
            w.close()


@pytest.fixture(scope="module")
def store_dir(samples, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    build_store(root, samples)
    return root


def committed(samples: list[CapturedSample]) -> list[CapturedSample]:
    return samples[:6]  # shards 0 and 1 of 4 over 12 samples


def file_sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def test_summary_reads_the_previous_release_rejection_counts(store_dir, tmp_path, capsys) -> None:
    """A store of the previous release (entries with ``rejected_by_field``, as :func:`write_rejection`
    writes) whose errors files are gone still reports its rejections from the manifest."""
    old = tmp_path / "old-store"
    shutil.copytree(store_dir, old)
    for path in old.glob("errors-*.jsonl"):
        path.unlink()
    status, s = run_json(capsys, "summary", old)
    assert status == 0 and s["rejected"] == 2
    assert s["rejected_by_reason"] == {r.field: 1 for r in REJECTIONS}


def test_summary_agrees_with_an_independent_count(store_dir, samples, capsys) -> None:
    status, s = run_json(capsys, "summary", store_dir, "--dataset-tokens", 10**9)
    mine = committed(samples)
    tokens = sum(x.num_tokens for x in mine)
    n_last = sum(len(x.last_hidden_positions) for x in mine)
    n_audio = sum(len(x.audio_embeds) for x in mine)
    assert status == 0
    assert s["shards"] == {"planned": 4, "done": [0, 1], "partial": [2], "missing": [3]}
    assert (s["samples"], s["input_records"], s["tokens"]) == (6, 8, tokens)
    assert (s["loss_tokens"], s["last_hidden_rows"], s["audio_tokens"]) == (sum(x.num_loss_tokens for x in mine), n_last, n_audio)
    assert s["rejected"] == 2
    assert s["rejected_by_reason"] == {"hidden_states: sample 'nan-1': aux_hidden holds 3 NaN/Inf": 1, "audio: silence": 1}
    on_disk = sum(v for k, v in file_sizes(store_dir / "shards").items() if k.startswith("shard-"))
    assert s["bytes"] == on_disk
    assert s["bytes_per_token"] == pytest.approx(on_disk / tokens)
    raw = tokens * (5 + 2 * 3 * H) + n_last * (4 + 2 * H) + n_audio * 2 * H
    assert s["raw_bf16_bytes"] == raw and s["stored_vs_raw_bf16"] == pytest.approx(on_disk / raw)
    assert s["specforge_bytes_per_token"] == 4 * H * 2 + 16 and s["specforge_bytes"] == tokens * (4 * H * 2 + 16)
    assert s["estimate"]["bytes"] == pytest.approx(on_disk / tokens * 1e9)
    assert s["aux_layers"]["ids"] == [1, 3, 5] and s["quantization"] == "none"
    status, text = run_cli(capsys, "summary", store_dir)
    assert "2/4 done, 1 partial [2], 1 missing [3]" in text and "B/token" in text and "SpecForge" in text


def test_du_adds_up_to_the_files(store_dir, capsys) -> None:
    status, d = run_json(capsys, "du", store_dir)
    sizes = file_sizes(store_dir)
    assert status == 0
    for shard in d["shards"]:
        assert shard["bytes"] == sum(v for k, v in sizes.items() if k.startswith(f"shards/{shard['name']}/"))
    assert d["by_array"]["aux_hidden"] == sum(v for k, v in sizes.items()
                                               if "/arrays/aux_hidden/" in k and "/shard-" in f"/{k}")
    assert d["shards_total"] == sum(v for k, v in sizes.items() if k.startswith("shards/shard-"))
    assert d["total"] == d["shards_total"] + sizes["manifest.json"] + sizes["errors-00000.jsonl"] + sizes["errors-00001.jsonl"]
    assert sum(d["by_array"].values()) == d["shards_total"]
    assert "aux_hidden" in run_cli(capsys, "du", store_dir)[1]


def fingerprint(root: Path) -> list[tuple[int, str]]:
    """Every file's (size, sha256) under ``root``, manifest and locks aside: what must survive a repair."""
    return sorted((p.stat().st_size, sha256_file(p)) for p in root.rglob("*")
                  if p.is_file() and "manifest.json" not in p.name and "locks" not in p.parts)


def test_verify_finds_damage_and_repair_requeues_without_deleting(store_dir, samples, tmp_path, capsys) -> None:
    root = tmp_path / "store"
    shutil.copytree(store_dir, root)
    assert run_cli(capsys, "verify", root, "--deep")[0] == 0
    chunk = root / "shards" / "shard-00000-of-00004" / "arrays" / "aux_hidden" / "c.1.0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    status, v = run_json(capsys, "verify", root)
    assert status == 0 and any("--deep" in n for n in v["notes"])  # same size: only --deep hashes chunks
    status, v = run_json(capsys, "verify", root, "--deep")
    assert status == 1
    hit = [p for p in v["problems"] if "c.1.0" in p["message"]]
    holder = samples[int(np.searchsorted(np.cumsum([x.num_tokens for x in samples]), 32, side="right"))]
    assert hit and hit[0]["shard"] == "shard-00000-of-00004" and f"{holder.id!r}" in hit[0]["message"]  # rows 32-63

    shutil.rmtree(root / "shards" / "shard-00001-of-00004")
    status, v = run_json(capsys, "verify", root)
    assert status == 1 and {"shard": "shard-00001-of-00004",
                            "message": "shard-00001-of-00004: shard directory is missing"} in v["problems"]
    before = fingerprint(root)
    status, out = run_cli(capsys, "verify", root, "--deep", "--repair")
    assert status == 1 and "--shard-index 0" in out and "--shard-index 1" in out
    assert Manifest(root).shards() == {} and fingerprint(root) == before  # moved, not deleted
    bad = sorted(p.name for p in (root / "shards").iterdir() if p.name.startswith(".bad-"))
    assert len(bad) == 2 and (root / "shards" / bad[0] / "arrays" / "aux_hidden" / "c.1.0").is_file()
    assert (root / "shards" / bad[0] / "errors-00000.jsonl").is_file() and not (root / "errors-00000.jsonl").exists()
    status, v = run_json(capsys, "verify", root)
    assert status == 0 and any(".bad-" in n for n in v["notes"])
    # the rerun the repair asked for writes the shard afresh next to the set-aside copy
    shard = plan_shards(len(samples), 4)[0]
    with ShardWriter(root, shard, resume=True) as w:
        for s in samples[shard.start:shard.stop]:
            w.write(s)
        entry = w.finish()
    commit_shard(Manifest(root), shard, entry)
    assert run_cli(capsys, "verify", root, "--deep")[0] == 0 and len(open_store(root)) == 3


def test_verify_deep_finds_a_nan(samples, tmp_path, monkeypatch, capsys) -> None:
    bad = capture("has-nan", _encoded(samples[3]), 3)
    bad.aux_hidden[5, 2, 7] = float("nan")
    monkeypatch.setattr(CapturedSample, "_finite_problems", lambda self: [])  # a writer that does not check
    build_store(tmp_path, [*samples[:3], bad, *samples[4:6]], num_shards=2, committed=(0, 1), partial=())
    assert run_cli(capsys, "verify", tmp_path)[0] == 0
    status, v = run_json(capsys, "verify", tmp_path, "--deep")
    assert status == 1
    assert [p["message"] for p in v["problems"]] == [
        "shard-00001-of-00002 sample 0 ('has-nan'): aux_hidden row 5 holds NaN/Inf"]


def _encoded(sample: CapturedSample):
    from pipeline.data.template import Encoded

    return Encoded(sample.input_ids.numpy(), sample.loss_mask.numpy().astype(np.uint8), sample.audio_spans)


def test_diff_identical_stores_and_a_one_value_difference(samples, tmp_path, capsys) -> None:
    for name in ("a", "b"):
        build_store(tmp_path / name, samples, num_shards=3, committed=(0, 1, 2), partial=())
    status, out = run_cli(capsys, "diff", tmp_path / "a", tmp_path / "b")
    assert status == 0 and "identical: the same 12 samples" in out
    changed = list(samples)
    changed[7] = capture(samples[7].id, _encoded(samples[7]), 7)
    changed[7].aux_hidden[9, 1, 3] += 1
    build_store(tmp_path / "c", changed, num_shards=2, committed=(0, 1), partial=())  # other sharding, same order
    status, d = run_json(capsys, "diff", tmp_path / "a", tmp_path / "c")
    assert status == 1 and d["differing"] == 1 and not d["identical"]
    assert d["differences"][0].startswith(f"sample 7 ({samples[7].id!r};")
    assert d["differences"][0].endswith(f"aux_hidden: 1 of {samples[7].num_tokens} rows differ (first: row 9)")


def test_show_marks_loss_tokens_and_prints_norms(store_dir, samples, tiny_target, capsys) -> None:
    status, out = run_cli(capsys, "show", store_dir, "clip-01", "--target", tiny_target, "--no-color")
    assert status == 0
    assert "[[Please call Stella and ask her to come.<|im_end|>]]" in out and "[AUDIO x 5]" in out
    assert f"aux_hidden [{samples[1].num_tokens}, 3, {H}] bfloat16" in out
    norms = samples[1].aux_hidden[:, 1].float().norm(dim=-1)
    line = next(x for x in out.splitlines() if x.strip().startswith("aux decoder_layer 3"))
    assert line.split()[3:5] == [f"{norms.mean().item():.4g}", f"{norms.max().item():.4g}"]
    assert run_cli(capsys, "show", store_dir, "1", "--target", tiny_target, "--no-color")[1] == out
    status, out = run_cli(capsys, "show", store_dir, "clip-01", "--target", tiny_target, "--color")
    assert "\033[32mPlease call Stella" in out
    assert main(["show", str(store_dir), "no-such-id", "--target", str(tiny_target)]) == 2


def test_stats_numbers_and_plot(store_dir, samples, tmp_path, capsys) -> None:
    png = tmp_path / "stats.png"
    status, s = run_json(capsys, "stats", store_dir, "--plot", png)
    assert status == 0 and s["samples"] == s["sampled"] == 6
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert sum(c for _, _, c in s["tokens"]["histogram"]) == 6
    values = torch.cat([x.aux_hidden[:, 1].float() for x in committed(samples)]).numpy().astype(np.float64)
    layer = s["tensors"]["aux decoder_layer 3"]
    assert layer["mean"] == pytest.approx(values.mean()) and layer["std"] == pytest.approx(values.std())
    assert layer["abs_max"] == np.abs(values).max() and layer["outlier_channel_fraction"] == 0
    assert s["tensors"]["aux decoder_layer 1"]["outlier_channel_fraction"] == 1 / H
    status, s = run_json(capsys, "stats", store_dir, "--max-samples", "2")
    assert s["sampled"] == 2
    assert "#" in run_cli(capsys, "stats", store_dir)[1]


def test_module_entry_point(store_dir) -> None:
    proc = subprocess.run([sys.executable, "-m", "storage.inspect", "summary", str(store_dir), "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["samples"] == 6
    proc = subprocess.run([sys.executable, "-m", "storage.inspect", "verify", str(REPO / "tests")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no manifest.json" in proc.stderr


# ---- stage 1 directories ---------------------------------------------------------------------------


class ScriptedEngine:
    """Answers from the prompt alone: 3-7 ordinary tokens, stopping on <|im_end|> for even prompt lengths."""

    max_model_len = 4096

    def __init__(self, im_end: int):
        self.im_end = im_end

    def generate(self, requests) -> list[GenResult]:
        out = []
        for r in requests:
            n = len(r.prompt_ids)
            ids = [(sum(r.prompt_ids) + k * 7) % 500 + 10 for k in range(3 + n % 5)]
            out.append(GenResult(ids + [self.im_end], "stop", n) if n % 2 == 0 else GenResult(ids, "length", n))
        return out

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def stage1_dirs(tiny_target, tokenizer, tmp_path_factory) -> tuple[Path, Path]:
    """Two runs of stage 1 over the same input (4 speech records + 2 bad ones, 2 shards)."""
    from stages.regenerate import RegenerateConfig, run

    root = tmp_path_factory.mktemp("stage1")
    for name in ("audio", "bad"):
        (root / name).symlink_to(DATA / name)
    speech = (DATA / "speech.jsonl").read_text().splitlines()[:4]
    bad = (DATA / "bad_records.jsonl").read_bytes().splitlines()
    (root / "in.jsonl").write_bytes("\n".join(speech).encode() + b"\n" + bad[0] + b"\n" + bad[10] + b"\n")
    engine = ScriptedEngine(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    for out in ("a", "b"):
        run(RegenerateConfig(target=str(tiny_target), input=str(root / "in.jsonl"), output=str(root / out),
                             num_shards=2, batch_size=2, max_new_tokens=8), engine=engine)
    return root / "a", root / "b"


def records_of(directory: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(directory.glob("shard-*.jsonl")) for line in p.read_text().splitlines()]


def test_stage1_summary_counts(stage1_dirs, capsys) -> None:
    a, _ = stage1_dirs
    status, s = run_json(capsys, "summary", a)
    turns = [t for r in records_of(a) for t in r["conversations"] if "finish_reason" in t]
    finish: dict[str, int] = {}
    for t in turns:
        finish[t["finish_reason"]] = finish.get(t["finish_reason"], 0) + 1
    assert status == 0 and s["kind"] == "stage1"
    assert (s["input_records"], s["accepted"], s["rejected"], s["output_records"]) == (6, 4, 2, 4)
    assert s["generated_tokens"] == sum(len(t["token_ids"]) for t in turns) and s["finish_reasons"] == finish
    assert set(finish) == {"stop", "length"}
    assert sum(s["rejected_by_reason"].values()) == 2 and any("silence" in k for k in s["rejected_by_reason"])
    assert s["shards"] == {"planned": 2, "done": [0, 1], "partial": [], "missing": []}
    assert "finish reasons" in run_cli(capsys, "summary", a)[1]


def test_stage1_verify_du_and_repair(stage1_dirs, tmp_path, capsys) -> None:
    a = tmp_path / "a"
    shutil.copytree(stage1_dirs[0], a)
    assert run_cli(capsys, "verify", a, "--deep")[0] == 0
    status, d = run_json(capsys, "du", a)
    assert [x["bytes"] for x in d["shards"]] == [
        sum(p.stat().st_size for p in a.glob(f"*-{i:05d}*.jsonl")) for i in range(2)]
    assert d["total"] == d["shards_total"] + (a / "manifest.json").stat().st_size
    shard0 = a / "shard-00000-of-00002.jsonl"
    text = shard0.read_text()
    shard0.write_text(text.replace('"clip-01"', '"clip-0X"', 1))
    status, v = run_json(capsys, "verify", a)
    assert status == 1 and v["problems"] == [{"shard": "shard-00000-of-00002",
                                              "message": "shard-00000-of-00002: shard-00000-of-00002.jsonl does not "
                                                         "match its sha256 in the manifest"}]
    before = fingerprint(a)
    status, out = run_cli(capsys, "verify", a, "--repair")
    assert status == 1 and "python -m stages.regenerate" in out and "--shard-index 0" in out
    assert list(Manifest(a).shards()) == ["00001"] and fingerprint(a) == before and not shard0.exists()
    (a / "progress").mkdir(exist_ok=True)
    (a / "progress" / "shard-00000-of-00002.jsonl").write_text("{}\n")
    status, s = run_json(capsys, "summary", a)
    assert s["shards"] == {"planned": 2, "done": [1], "partial": [0], "missing": []}
    assert run_cli(capsys, "verify", a)[0] == 0


def test_stage1_diff(stage1_dirs, tmp_path, capsys) -> None:
    a, b = stage1_dirs
    status, out = run_cli(capsys, "diff", a, b)
    assert status == 0 and "identical: the same 4 records" in out
    c = tmp_path / "c"
    shutil.copytree(b, c)
    path = c / "shard-00001-of-00002.jsonl"
    rec = json.loads(path.read_text().splitlines()[0])
    rec["conversations"][1]["token_ids"][2] += 1
    path.write_text(json.dumps(rec, ensure_ascii=False) + "\n")
    status, d = run_json(capsys, "diff", a, c)
    assert status == 1 and d["differing"] == 1
    assert d["differences"] == [f"shard-00001-of-00002 line 1 (id {rec['id']!r}): conversations[1].token_ids[2] differs"]
    assert main(["diff", str(a), str(REPO / "tests" / "nothing")]) == 2


def test_commands_that_need_a_store_refuse_a_stage1_dir(stage1_dirs, capsys) -> None:
    assert main(["stats", str(stage1_dirs[0])]) == 2
    assert "needs a hidden-state store" in capsys.readouterr().err

