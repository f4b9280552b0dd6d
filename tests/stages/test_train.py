"""Stage 3 end to end on the fixture store: real DeepSpeed launches with 2 CPU processes, no mocks.

Launches are slow (~30 s of imports and rendezvous each), so the assertions share four runs:
an uninterrupted ZeRO-2 run, the same command killed with SIGKILL after its first checkpoint and
rerun, and a short ZeRO-3 run. Input errors are checked in-process (they fail before DeepSpeed).
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling.draft.config import DraftConfig
from modeling.draft.snapshot import load_draft_snapshot
from modeling.target_io.weights import read_target_final_norm, read_target_lm_head
from modeling.training.checkpoint import list_steps
from modeling.training.data import Packing, Schedule, collate_row, split_samples, store_columns
from modeling.training.model import TrainDraft, WarmupCosine, with_audio_ids
from pipeline.core.faults import crash_chain
from stages.train import main, strip_local_rank
from storage.store import open_store

REPO = Path(__file__).resolve().parents[2]
# 24 training samples pack into ~6 rows of 512 tokens: 3 optimizer steps per epoch on 2 processes
BASE = ["--draft-vocab-size", "256", "--batch-tokens", "512", "--eval-fraction", "0.2", "--num-workers", "1"]
# lr 3e-3: the tiny draft (hidden 256) reaches acceptance ~2.5 on its training rows in ~30 steps
ZERO2 = [*BASE, "--nproc", "2", "--zero-stage", "2", "--lr", "3e-3", "--epochs", "100", "--max-steps", "36",
         "--save-every", "12", "--keep-checkpoints", "2", "--log-every", "1"]
STEP_FILES = {"COMMITTED", "draft", "mp_rank_00_model_states.pt", "rng-rank00000.pt", "rng-rank00001.pt",
              "train_state.json", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
              "zero_pp_rank_1_mp_rank_00_optim_states.pt"}


def train_cmd(store: Path, target: Path, out: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "stages.train", "--store", str(store), "--target", str(target),
            "--output", str(out), *args]


def run_train(cmd: list[str], log: Path) -> str:
    with open(log, "a") as fh:
        proc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, timeout=900)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def shm_buffers() -> set[str]:
    """DeepSpeed's CPU all-reduce buffers in /dev/shm (RAM): each is 66 MiB."""
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def metrics(run_dir: Path, split: str) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_draft_snapshot(run_dir / "checkpoints" / f"step-{step:06d}").state_dict


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, fixture_store, tiny_target) -> Path:
    out = tmp_path_factory.mktemp("zero2") / "run"
    start = time.monotonic()
    run_train(train_cmd(fixture_store, tiny_target, out, ZERO2), out.parent / "log.txt")
    print(f"zero-2 run: {time.monotonic() - start:.1f} s")
    return out


def test_zero2_learns_and_writes_the_run_layout(zero2_run, tmp_path):
    train = metrics(zero2_run, "train")
    assert [r["step"] for r in train] == list(range(1, 37))
    assert [r["step"] for r in metrics(zero2_run, "eval")] == [0, 12, 24, 36]
    # step 1's forward ran on the untrained draft; the last steps on the trained one (same rows).
    # The fixture store holds the human transcripts, not the target's answers, so the target's
    # argmax is in the draft vocab (built from the data) at only ~40% of positions: every other
    # position is a miss whatever the draft learns, and the honest metrics say so.
    fits = metrics(zero2_run, "fit")  # the step-0 and the final weights over every training row
    assert [r["step"] for r in fits] == [0, 36]
    before, after = fits
    in_vocab = after["in_draft_vocab"]
    tok_s = float(np.median([r["tokens_per_s"] for r in train]))
    print(f"step-0 accuracy untrained {before['step_acc'][0]:.3f} -> trained {after['step_acc'][0]:.3f} "
          f"(target token in the draft vocab at {in_vocab:.2f}); walk acceptance at k=4 "
          f"{before['walk_acceptance_length'][3]:.3f} -> {after['walk_acceptance_length'][3]:.3f}, "
          f"independent-steps {after['acceptance_length']:.3f}; median {tok_s:.0f} tokens/s")
    assert before["step_acc"][0] < 0.1 * in_vocab and after["step_acc"][0] > 0.5 * in_vocab
    assert after["walk_acceptance_length"][3] > before["walk_acceptance_length"][3] + 0.2
    assert after["supervised"] == before["supervised"] > train[-1]["supervised"]
    assert train[-1]["lr"] < train[5]["lr"] <= 3e-3  # cosine decay after warmup
    assert all(len(r["step_acc"]) == 7 and np.isfinite(r["loss"]) for r in train)

    committed, partial = list_steps(zero2_run)
    assert committed == [0, 24, 36] and partial == []  # keep 2 + the untrained step 0
    ckpt = zero2_run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step-000036"
    assert {p.name for p in (ckpt / "step-000036").iterdir()} == STEP_FILES
    assert (zero2_run / "FINISHED").exists() and list((zero2_run / "tb").glob("events.out.tfevents.*"))
    state = json.loads((ckpt / "step-000036" / "train_state.json").read_text())
    assert state["loader"] == {"micro_batches": 36, "epoch": 12, "batch_in_epoch": 0}

    snap = load_draft_snapshot(ckpt / "step-000036")
    assert snap.aux_layer_ids_output_convention == [1, 3, 4]
    assert all(v.dtype == torch.float32 for k, v in snap.state_dict.items() if v.is_floating_point())
    assert not torch.equal(snap.state_dict["fc.weight"], weights(zero2_run, 0)["fc.weight"])
    from stages.export import main as export_main

    assert export_main(["--run", str(zero2_run), "--output", str(tmp_path / "draft")]) == 0
    # the export held the weights it wrote: its peak RSS is at least their size
    res = json.loads((tmp_path / "draft" / "export_info.json").read_text())["resources"]
    assert res["wall_s"] > 0 and res["peak_rss_bytes"] >= (tmp_path / "draft" / "model.safetensors").stat().st_size
    assert json.loads((tmp_path / "draft" / "config.json").read_text())["draft_vocab_size"] == 256


def test_kills_and_crashes_then_rerun_reach_the_uninterrupted_weights(zero2_run, fixture_store, tiny_target,
                                                                       tmp_path):
    """The launcher group killed after a checkpoint, then a rank killed inside the next checkpoint's
    commit, then both ranks killed after a random optimizer step; the last rerun ends with exactly
    the uninterrupted run's weights. ``AE3_FAULT_SEED`` picks another step."""
    out = tmp_path / "run"
    log = tmp_path / "log.txt"
    cmd = train_cmd(fixture_store, tiny_target, out, ZERO2)
    shm_before = shm_buffers()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    marker = out / "checkpoints" / "step-000012" / "COMMITTED"
    deadline = time.monotonic() + 600
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # launcher, both ranks and their loader workers
    proc.wait()
    assert marker.exists(), log.read_text()[-3000:]
    assert not (out / "FINISHED").exists()
    killed_at = list_steps(out)[0][-1]
    (out / "checkpoints" / "step-000030").mkdir(exist_ok=True)  # what a kill mid-save leaves

    crash_step = random.Random(int(os.environ.get("AE3_FAULT_SEED", "0"))).randint(25, 35)
    specs = ["before-rename:COMMITTED", f"train-step:{crash_step}"]
    print(f"\ncrashing at {specs}")
    runs = crash_chain(cmd, specs, tmp_path / "logs", cwd=REPO, timeout_s=600)
    logs = [r.log.read_text() for r in runs]
    assert all(r.returncode != 0 for r in runs[:-1]) and runs[-1].returncode == 0, logs[-1][-3000:]
    assert f"resumed from step {killed_at}" in logs[0] and "step-000030" in logs[0]  # the stray dir removed
    assert "resumed from step 12" in logs[1]  # step 24 of run 0 was cut short before its marker
    assert "resumed from step 24" in logs[2]
    assert list_steps(out) == ([0, 24, 36], [])
    ref, got = weights(zero2_run, 36), weights(out, 36)
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref), "resumed run diverged from the uninterrupted one"
    steps = [r["step"] for r in metrics(out, "train")]
    assert steps == list(range(1, 37))  # the killed runs' lines past their checkpoint were dropped
    # four launches, each killed or crashed but the last: none left its ranks' buffers in RAM
    assert shm_buffers() <= shm_before


def test_a_second_job_on_the_same_run_dir_is_refused(zero2_run, fixture_store, tiny_target, tmp_path):
    """Two training jobs racing for one RUN_DIR: the second stops at the run lock, before it could
    delete the first one's checkpoint in progress; the first ends as if alone."""
    out = tmp_path / "run"
    cmd = train_cmd(fixture_store, tiny_target, out, ZERO2)
    with open(tmp_path / "first.log", "w") as fh:
        first = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    lock = out / "locks" / "train.lock"
    deadline = time.monotonic() + 300
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    # the first job is frozen while the second starts: on a loaded machine the second's start (~10-50 s
    # of imports) outlasted the first's 36 steps, which then released the lock before it was tested
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    text = second.stdout + second.stderr
    assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert second.returncode == 2, text[-3000:]
    assert f"python -m stages.train: error: {lock} is held by host" in text
    ref, got = weights(zero2_run, 36), weights(out, 36)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert [r["step"] for r in metrics(out, "train")] == list(range(1, 37))


def test_full_disk_during_a_checkpoint_is_clear_and_commits_nothing(fixture_store, tiny_target, tmp_path):
    out = tmp_path / "run"
    cmd = train_cmd(fixture_store, tiny_target, out, [*BASE, "--nproc", "2", "--zero-stage", "2",
                                                      "--max-steps", "3", "--save-every", "3"])
    # 4 MB: the run files and DeepSpeed's one-time C++ build fit, a 5.5 MB checkpoint file does not
    limit = 4_000_000
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 3, text[-4000:]
    assert f"python -m stages.train: error: cannot write {out / 'checkpoints' / 'step-000000'}: File too large" in text
    assert f"files of at most {limit:,} bytes" in text and "while: writing checkpoint step-000000 failed" in text
    assert "another process of the job failed" in text and "Traceback" not in text  # rank 1: one line
    assert list_steps(out)[0] == [] and not (out / "checkpoints" / "latest").exists()
    assert not (out / "FINISHED").exists()


def test_zero3_bf16_encoder_audio(fixture_store, tiny_target, tmp_path):
    out = tmp_path / "run"
    args = [*BASE, "--nproc", "2", "--zero-stage", "3", "--precision", "bf16", "--draft-audio-input", "encoder",
            "--grad-accum", "2", "--max-steps", "4", "--save-every", "2", "--keep-checkpoints", "1",
            "--log-every", "2", "--draft-config", '{"intermediate_size": 512}', "--init-head", "target"]
    run_train(train_cmd(fixture_store, tiny_target, out, args), tmp_path / "log.txt")
    assert list_steps(out) == ([0, 4], [])
    # --init-head target: the untrained draft's head is the target's, row for row through d2t
    start = load_draft_snapshot(out / "checkpoints" / "step-000000")
    target_ids = start.vocab.draft_ids
    head, norm = start.state_dict["lm_head.weight"], start.state_dict["norm.weight"]
    assert torch.equal(head, read_target_lm_head(tiny_target)[target_ids].to(head.dtype))
    assert torch.equal(norm, read_target_final_norm(tiny_target).to(norm.dtype))
    train = metrics(out, "train")
    assert [r["step"] for r in train] == [2, 4] and all(np.isfinite(r["loss"]) for r in train)
    assert all(r["micro_batches"] == 8 for r in train)  # 2 steps per line x grad-accum 2 x 2 ranks
    snap = load_draft_snapshot(out / "checkpoints" / "step-000004")
    assert snap.draft_config.intermediate_size == 512
    assert snap.state_dict["midlayer.mlp.up_proj.weight"].shape == (512, 256)


def _copy_target(src: Path, dst: Path, skip: str = "") -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name != skip:
            shutil.copy(f, dst / f.name)
    return dst


def _rewritten_store(fixture_store: Path, path: Path, count: int, *, no_loss: bool = False,
                     answers_per_prompt: int = 1) -> Path:
    """The fixture store's first ``count`` samples rewritten into a new store: with every loss mask 0,
    or each sample repeated as the answers a sampling stage 1 (``--n``) names ``<id>#<k>``."""
    from pipeline.core.shards import Shard
    from pipeline.data.records import sampled_answer_id
    from storage.sample import CapturedSample
    from storage.store import STORE_MUST_MATCH, create_store
    from storage.writer import ShardWriter, commit_shard

    src = open_store(fixture_store)
    manifest = create_store(path, {k: v for k, v in src.header.items() if k in STORE_MUST_MATCH or k == "index_format"})
    shard = Shard(0, 1, 0, count * answers_per_prompt)
    with ShardWriter(path, shard) as writer:
        for i in range(count):
            s = src[i]
            keep = 0 if no_loss else len(s["last_hidden_positions"])
            for k in range(answers_per_prompt):
                writer.write(CapturedSample(
                    sampled_answer_id(s["id"], k, answers_per_prompt), s["source_hash"], s["input_ids"],
                    torch.zeros_like(s["loss_mask"]) if no_loss else s["loss_mask"], s["aux_hidden"],
                    s["last_hidden"][:keep], s["last_hidden_positions"][:keep], s["audio_embeds"], s["audio_spans"]))
        entry = writer.finish()
    commit_shard(manifest, shard, entry)
    return path


def test_input_errors_fail_before_any_work(fixture_store, tiny_target, tmp_path, capsys):
    def error(store: Path, target: Path, *extra: str) -> str:
        argv = ["--store", str(store), "--target", str(target), "--output", str(tmp_path / "run"), *BASE, *extra]
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "must be smaller than the target vocab (640)" in error(fixture_store, tiny_target, "--draft-vocab-size", "640")
    other = _copy_target(tiny_target, tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    cfg["text_config"]["rms_norm_eps"] = 1e-6  # a different target: config.json no longer matches the store's
    (other / "config.json").write_text(json.dumps(cfg))
    assert "was dumped from target" in error(fixture_store, other)
    bare = _copy_target(tiny_target, tmp_path / "bare", skip="model.safetensors")
    assert "cannot read the embedding table and lm_head" in error(fixture_store, bare)
    empty = tmp_path / "empty"
    empty.mkdir()
    manifest = json.loads((fixture_store / "manifest.json").read_text())
    (empty / "manifest.json").write_text(json.dumps({**manifest, "shards": {}}))
    assert "has no committed samples" in error(empty, tiny_target)
    assert "has a loss token" in error(_rewritten_store(fixture_store, tmp_path / "noloss", 2, no_loss=True), tiny_target)
    assert "is not a hidden-state store" in error(tmp_path / "missing", tiny_target)
    assert "missing is not a hidden-state store" in error(f"{fixture_store},{tmp_path / 'missing'}", tiny_target)
    assert "empty has no committed samples" in error(f"{fixture_store},{empty}", tiny_target)
    assert "unknown DraftConfig override" in error(fixture_store, tiny_target, "--draft-config", '{"bogus": 1}')
    assert "needs the draft's hidden size (128) to equal the target's (256)" in error(
        fixture_store, tiny_target, "--init-head", "target", "--draft-config", '{"hidden_size": 128}')
    # one 100k-token row for 2 processes: the launching process says so, before any rank starts
    assert "pack into fewer rows than world size x grad accum (2 x 1)" in error(
        fixture_store, tiny_target, "--nproc", "2", "--batch-tokens", "100000")
    assert not (tmp_path / "run").exists()  # nothing was created


def test_joined_stores_train_as_one_set_split_by_prompt(fixture_store, tiny_target, tmp_path):
    """``--store A,B``: B's samples join A's (a second stage-1 pass that sampled 2 answers per prompt);
    every answer to one prompt is on the same side of the held-out split, so the held-out estimate
    never scores a prompt the draft trained on; it scores the first store's rows only."""
    from modeling.training.config import TrainConfig
    from modeling.training.setup import check_inputs
    from pipeline.core.config import parse_config
    from pipeline.data.records import prompt_key

    sampled = _rewritten_store(fixture_store, tmp_path / "sampled", 20, answers_per_prompt=2)
    argv = ["--store", f"{fixture_store},{sampled}", "--target", str(tiny_target), "--output", str(tmp_path / "run"),
            *BASE, "--eval-fraction", "0.3"]
    inputs = check_inputs(parse_config(TrainConfig, argv, prog="train", description="joined"))
    alone = open_store(fixture_store)
    assert len(inputs.store) == len(alone) + 40
    ids = [sid for r in inputs.store.shard_readers() for sid in r.ids()]
    assert ids[len(alone):] == [f"{sid}#{k}" for sid in ids[:20] for k in (0, 1)]
    held = {prompt_key(ids[i]) for i in inputs.split.eval}
    trained = {prompt_key(ids[i]) for i in inputs.split.train}
    assert held and trained and not held & trained
    # the fixture's own samples split as they do alone, and only they are scored: the sampled answers to
    # held-out prompts are in neither split
    own = split_samples(*store_columns(alone)[::2], 0.3)
    assert inputs.split.eval.tolist() == own.eval.tolist()
    sampled_held = [len(alone) + 2 * j + k for j in range(20) if j in set(own.eval.tolist()) for k in (0, 1)]
    assert sampled_held and inputs.split.unscored == len(sampled_held)
    assert not set(sampled_held) & set(inputs.split.train.tolist())
    assert len(inputs.split.train) + len(inputs.split.eval) + inputs.split.unscored == len(inputs.store)
    assert inputs.target_info["store"] == f"{fixture_store.resolve()},{sampled.resolve()}"


def test_a_checkpoint_scored_alone_reproduces_the_runs_logged_held_out_metrics(zero2_run, fixture_store):
    """benchmarks.eval_draft_on_store (one process, no DeepSpeed) on the run's own store and step gives
    the trainer's eval line (2 ranks): the same rows, the same fp32 arithmetic per row."""
    from benchmarks.eval_draft_on_store import score

    for step in (24, 36):
        got = score(zero2_run, str(fixture_store), step, None, 200)
        logged = next(r for r in metrics(zero2_run, "eval") if r["step"] == step)
        assert got["step"] == step and got["walk_acceptance_length"][0] > 1.0
        for key in ("walk_acceptance_length", "chain_acceptance_length", "step_acc"):
            assert got[key] == pytest.approx(logged[key], rel=1e-5, abs=1e-5), key
        assert got["tokens"] == logged["tokens"]
    # the bins of the target's confidence partition the held-out tokens: their accuracies add up to step 1's
    bins = score(zero2_run, str(fixture_store), 36, None, 200, confidence=True)["by_target_confidence"]
    assert sum(b["token_share"] for b in bins) == pytest.approx(1.0)
    assert sum(b["token_share"] * (b["first_position_accuracy"] or 0.0) for b in bins) == pytest.approx(
        got["step_acc"][0], abs=1e-5)  # step_acc is logged to 5 places
    # bins cover [0, 1] without gaps (how many are filled depends on the target's bf16 dump, so not asserted)
    assert [b["target_top1_from"] for b in bins[1:]] == [b["target_top1_to"] for b in bins[:-1]]
    assert (bins[0]["target_top1_from"], bins[-1]["target_top1_to"]) == (0.0, 1.0)
    with pytest.raises(SystemExit, match="step 7"):
        score(zero2_run, str(fixture_store), 7, None, 200)


def test_check_only_runs_the_launchers_checks_and_nothing_else(zero2_run, fixture_store, tiny_target, tmp_path,
                                                               capsys):
    """What 03-train.sbatch runs before srun torchrun (which reports any failed rank as exit 1)."""
    fresh = train_cmd(fixture_store, tiny_target, tmp_path / "run", ZERO2)[3:]
    assert main([*fresh, "--check-only"]) == 0 and not (tmp_path / "run").exists()
    resume = train_cmd(fixture_store, tiny_target, zero2_run, ZERO2)[3:]
    assert main([*resume, "--check-only"]) == 0
    resume[resume.index("--nproc") + 1] = "4"  # the world size of the job about to start
    assert main([*resume, "--check-only"]) == 2
    assert "was trained with 2 processes, now 4" in capsys.readouterr().err


def test_resume_with_other_settings_is_refused(zero2_run, fixture_store, tiny_target, capsys):
    argv = train_cmd(fixture_store, tiny_target, zero2_run, ZERO2)[3:]
    argv[argv.index("--lr") + 1] = "1e-4"
    assert main(argv) == 2
    assert "lr: 0.003 -> 0.0001" in capsys.readouterr().err


def test_schedule_is_deterministic_sharded_and_resumable(fixture_store):
    store = open_store(fixture_store)
    ids, lengths, loss = store_columns(store)
    split = split_samples(ids, loss, 0.2)
    assert set(split.train).isdisjoint(split.eval) and len(split.train) + len(split.eval) == 30
    assert np.array_equal(split_samples(ids[:20], loss[:20], 0.2).eval, split.eval[split.eval < 20])  # stable
    p = Packing(batch_tokens=256, window=512, seed=3, world_size=2, grad_accum=2)
    ranks = [Schedule(split.train, lengths, p, r, epochs=3) for r in range(2)]
    assert ranks[0].total_steps == ranks[1].total_steps == sum(ranks[0].steps) > 0
    for e in range(3):  # each epoch: no sample twice across ranks, rows within budget
        lo, hi = sum(ranks[0].steps[:e]) * 2, sum(ranks[0].steps[:e + 1]) * 2
        seen = np.concatenate([s.row(i) for s in ranks for i in range(lo, hi)])
        assert len(seen) == len(set(seen.tolist()))
        assert all(np.minimum(lengths[s.row(i)], 256).sum() <= 256 for s in ranks for i in range(lo, hi))
    again = Schedule(split.train, lengths, p, 1, epochs=3)
    assert all(np.array_equal(again.row(i), ranks[1].row(i)) for i in range(again.num_batches))
    assert ranks[0].position(ranks[0].steps[0] * 2 + 1) == {
        "micro_batches": ranks[0].steps[0] * 2 + 1, "epoch": 1, "batch_in_epoch": 1}

    text, clip = store[24], store[0]  # 56 tokens, no audio; 139 tokens, audio at [33, 103), cut to 100
    row = collate_row([text, clip], 100, with_audio=True)
    assert row["input_ids"].shape == (1, 156) and row["position_ids"][0, 56] == 0
    j = int(text["last_hidden_positions"][0])
    assert torch.equal(row["target_hidden"][0, j], text["last_hidden"][0])
    assert not row["target_hidden"][0, 56:].any()  # the clip's supervised tail (>= 121) was cut
    assert torch.equal(row["audio_positions"], torch.arange(56 + 33, 56 + 100))
    assert torch.equal(row["audio_embeds"], clip["audio_embeds"][:67])
    assert strip_local_rank(["--local_rank=1", "--lr", "1", "--local_rank", "0"]) == ["--lr", "1"]


def test_warmup_cosine():
    f = WarmupCosine(total=100, warmup=4)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(52) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_encoder_mode_embeds_stored_audio_rows():
    cfg = DraftConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                      vocab_size=10, draft_vocab_size=5, target_hidden_size=8, num_target_layers=8)
    table, audio = torch.randn(10, 8), torch.randn(2, 8)
    draft = TrainDraft(cfg, table)
    ids = with_audio_ids(torch.tensor([[3, 7, 7, 4]]), torch.tensor([1, 2]), 10)
    assert ids.tolist() == [[3, 10, 11, 4]]
    draft.audio_rows = audio
    out = draft.embed(ids)
    assert torch.equal(out[0, 1:3], audio) and torch.equal(out[0, [0, 3]], table[[3, 4]])
    assert "embed_tokens.weight" not in draft.state_dict() and not any(p is table for p in draft.parameters())
