"""The cluster path on a real one-node Slurm (slurm-wlm + munge, started by tests/slurm_cluster.py).

One config file drives two runs started together: ``run_pipeline.py`` locally, and the scripts of
``run_pipeline.py emit-slurm`` submitted with ``bash submit.sh``. On the Slurm side, a stage-2
array task is cancelled mid-shard (``scancel --signal=KILL``), which cancels the rest of its chain,
and ``submit.sh`` is run again; the training job is requeued after a checkpoint (``scontrol
requeue``), and in its second run one rank is killed, so torchrun exits 1 and the job requeues
itself. The workdir is relative and each run has its own working directory, so both record the same
paths: the stores and stage 1 outputs must be identical (``storage.inspect diff``), the weights and
exported draft equal, the benchmark's acceptance and outputs equal (stage 1 and the benchmark run in
fp32, whose greedy decoding does not depend on the batch plan on CPU; timings are not compared).
Slurm and its daemons are stopped by pid whatever happens; the test skips only when Slurm cannot be
installed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from slurm_cluster import SlurmCluster, ensure_slurm, wait_for

from pipeline.cluster.orchestrate import Paths, status_report

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(2400)
SHARDS = {"regenerate": 2, "dump": 3}
KILLED = 1  # the dump array task cancelled mid-shard
MAX_STEPS, SAVE_EVERY = 12, 4


def subset_input(fixtures_dir: Path, out: Path) -> Path:
    """9 spoken clips and 3 text conversations of the fixtures (4 records per dump shard), audio
    paths made absolute."""
    lines = (fixtures_dir / "speech.jsonl").read_text().splitlines()
    with out.open("w") as fh:
        for line in lines[:9] + lines[24:27]:
            rec = json.loads(line)
            for item in (c for turn in rec["conversations"] if isinstance(turn["content"], list)
                         for c in turn["content"] if c.get("type") == "audio"):
                item["audio"] = str(fixtures_dir / item["audio"])
            fh.write(json.dumps(rec) + "\n")
    return out


def pipeline_config(tiny_target: Path, data: Path) -> dict:
    cpu_slurm = {"partition": "ae3", "setup": "export VLLM_CPU_KVCACHE_SPACE=1", "gpus_per_node": 0,
                 "regenerate_gpus": 0, "dump_gpus": 0, "benchmark_gpus": 0, "regenerate_cpus": 1, "dump_cpus": 1,
                 "train_cpus_per_node": 2, "benchmark_cpus": 2, "train_procs_per_node": 2,
                 "time_regenerate": "00:30:00", "time_dump": "00:30:00", "time_train": "00:30:00",
                 "time_benchmark": "00:30:00", "max_parallel_tasks": 2, "max_requeues": 2}
    return {
        "workdir": "work", "target": str(tiny_target), "input": str(data),
        "baseline_untrained": False, "python": sys.executable, "slurm": cpu_slurm,
        "regenerate": {"num_shards": SHARDS["regenerate"], "max_new_tokens": 8, "batch_size": 32,
                       "max_model_len": 1024, "dtype": "fp32"},
        # one durable flush per sample (4 per shard, 0.3-2 s each here): a kill lands mid-shard
        "dump": {"num_shards": SHARDS["dump"], "sort_window": 1, "batch_tokens": 4096, "max_length": 1024,
                 "dtype": "fp32", "device": "cpu"},
        "train": {"nproc": 2, "zero_stage": 2, "precision": "fp32", "epochs": 1000, "max_steps": MAX_STEPS,
                  "save_every": SAVE_EVERY, "lr": 3e-3, "batch_tokens": 1024, "draft_vocab_size": 256,
                  "eval_fraction": 0.0, "log_every": 1, "num_workers": 0},
        "benchmark": {"num_spec_tokens": 4, "max_new_tokens": 8, "num_prompts": 4, "max_model_len": 1024,
                      "dtype": "fp32", "repeats": 1, "warmup_requests": 0},
    }


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def durable_samples(progress: Path) -> int:
    """Samples of a shard in progress that its last commit line made durable (read only)."""
    durable = 0
    for line in progress.read_bytes().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a torn last line
            continue
        durable = row["num_samples"] if row.get("kind") == "commit" else durable
    return durable


@dataclass
class Runs:
    local: Path  # the local run's working directory (its workdir is local/work)
    slurm: Path
    cluster: SlurmCluster
    chains: list[dict[str, str]] = field(default_factory=list)  # step name -> job id, per submit.sh
    status: dict[str, str] = field(default_factory=dict)  # `run_pipeline.py status` at chosen moments
    queue_at_kill: list[str] = field(default_factory=list)
    killed_lock: dict = field(default_factory=dict)
    taken_over_lock: dict = field(default_factory=dict)
    durable_at_kill: int = 0
    committed: dict[str, int] = field(default_factory=dict)  # last committed step when training was stopped
    seconds: float = 0.0

    def work(self, side: str) -> Path:
        return (self.local if side == "local" else self.slurm) / "work"

    def log(self, step: str, chain: int, task: int | None = None) -> str:
        job = self.chains[chain][step]
        name = {"01-regenerate": "regenerate", "02-dump": "dump", "03-train": "train"}[step]
        suffix = f"{job}_{task}" if task is not None else job
        return (self.slurm / "scripts" / "logs" / f"{name}-{suffix}.out").read_text()


class Driver:
    """Submits the chain and interrupts it at the moments the test is about."""

    def __init__(self, runs: Runs, config: Path):
        self.r, self.config = runs, config
        self.work = runs.work("slurm")

    def pipeline(self, *args: str) -> str:
        proc = subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), *args, "--config", str(self.config)],
                              cwd=self.r.slurm, capture_output=True, text=True, timeout=300, check=True)
        return proc.stdout

    def status(self) -> str:
        """What ``run_pipeline.py status`` prints, computed in this process: milliseconds, so it can
        run just before a kill (the command itself is run at the end)."""
        return status_report(Paths(self.work))

    def submit(self) -> None:
        out = self.r.cluster.run("bash", str(self.r.slurm / "scripts" / "submit.sh"), cwd=self.r.slurm).stdout
        self.r.chains.append(dict(re.findall(r"(\d\d-[\w-]+)=(\d+)", out)))

    def cancel_a_dump_task_mid_shard(self) -> None:
        dump = self.r.chains[0]["02-dump"]
        progress = self.work / "store" / "shards" / f".shard-{KILLED:05d}.tmp" / "progress.jsonl"
        lock = self.work / "store" / "locks" / f"shard-{KILLED:05d}-of-00003.lock"
        wait_for("a durable flush of the dump shard", lambda: progress.exists() and durable_samples(progress) >= 1)
        # Freeze the shard's writer first: the shard's last samples take 0.3 s each here, and the queue,
        # scontrol and status reads below took long enough on CI for the shard to finish before the kill.
        self.r.killed_lock = read_json(lock) or {}
        os.kill(self.r.killed_lock["pid"], signal.SIGSTOP)
        self.r.queue_at_kill = self.r.cluster.queue() + [self.r.cluster.run("scontrol", "show", "job", dump).stdout]
        self.r.status["dump"] = self.status()
        self.r.cluster.run("scancel", "--signal=KILL", f"{dump}_{KILLED}")
        self.r.cluster.wait_idle(900)  # the other tasks finish; train and export are cancelled
        self.r.durable_at_kill = durable_samples(progress)
        self.r.status["dump-killed"] = self.status()

    def watch_the_lock_taken_over(self) -> None:
        dump = self.r.chains[1]["02-dump"]
        lock = self.work / "store" / "locks" / f"shard-{KILLED:05d}-of-00003.lock"
        self.r.taken_over_lock = wait_for("the requeued task's lock", lambda: (
            (info := read_json(lock)) and str(info.get("slurm_job", "")).startswith(f"{dump}_{KILLED}.") and info))

    def latest(self) -> int:
        latest = self.work / "run" / "checkpoints" / "latest"
        return int(latest.read_text().strip().split("-")[1]) if latest.exists() else -1

    def release_requeued(self, job: str, resumes: int) -> int:
        """Wait for the stopped training job to be back in the queue; Slurm holds a requeued job for
        120 s (BeginTime), so let it start now. Returns the step its next run must resume from."""
        wait_for("the requeued training job", lambda: f"{job} PENDING BeginTime" in self.r.cluster.queue(), 120, 0.2)
        committed = self.latest()  # nothing of the stopped run is running any more
        # slurmd refuses to start a job in the second in which the requeue revoked its credential ("Killing
        # non-startable batch job: Job credential revoked", seen here): release it 2 s later
        time.sleep(2)
        self.r.cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
        log = self.r.slurm / "scripts" / "logs" / f"train-{job}.out"
        wait_for(f"training resume {resumes}", lambda: log.read_text().count("rank 0 resumed from step") >= resumes,
                 300, logs=(log,))
        return committed

    def interrupt_training(self) -> None:
        train = self.r.chains[1]["03-train"]
        wait_for("checkpoint 4", lambda: self.latest() >= SAVE_EVERY)
        self.r.status["train"] = self.status()
        self.r.cluster.run("scontrol", "requeue", train)  # what preemption with PreemptMode=REQUEUE does
        self.r.committed["requeue"] = self.release_requeued(train, 1)
        # the second run: one rank killed after the run's first checkpoint, so torchrun exits 1
        wait_for("a checkpoint of the second run", lambda: self.latest() > self.r.committed["requeue"])
        pids = wait_for("rank 1", lambda: self.r.cluster.job_pids(train, RANK="1"), 60)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        self.r.committed["rank-kill"] = self.release_requeued(train, 2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = ensure_slurm()
    if reason:
        pytest.skip(f"no Slurm to test against: {reason}")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm-cluster"))
    try:
        yield c.start()
    finally:
        c.stop()
        assert not c.leftover_pids(), "processes of the Slurm cluster outlived it"


@pytest.fixture(scope="module")
def runs(cluster, tiny_target, fixtures_dir, tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("slurm-vs-local")
    config = root / "pipeline.yaml"
    data = subset_input(fixtures_dir, root / "speech-12.jsonl")
    config.write_text(yaml.safe_dump(pipeline_config(tiny_target, data)))
    r = Runs(root / "local", root / "slurm", cluster)
    r.local.mkdir()
    r.slurm.mkdir()
    start = time.monotonic()
    env = dict(os.environ, PYTHONPATH=str(ROOT), VLLM_CPU_KVCACHE_SPACE="1")  # this checkout's stages
    with open(root / "local.log", "w") as log:
        local = subprocess.Popen([sys.executable, str(ROOT / "run_pipeline.py"), "--config", str(config)],
                                 cwd=r.local, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            drive = Driver(r, config)
            drive.pipeline("emit-slurm", "--out", "scripts")
            drive.submit()
            drive.cancel_a_dump_task_mid_shard()
            drive.submit()
            drive.watch_the_lock_taken_over()
            drive.interrupt_training()
            cluster.wait_idle(1200)
            r.status["end"] = drive.pipeline("status")
            assert local.wait(timeout=1200) == 0, (root / "local.log").read_text()[-4000:]
        finally:
            if local.poll() is None:  # the test failed: stop the local run and its stage processes
                os.killpg(local.pid, signal.SIGKILL)
                local.wait()
    r.seconds = time.monotonic() - start
    print(f"\nSlurm run (with the local run beside it): {r.seconds:.0f} s")
    return r


def test_emitted_cpu_scripts_ask_for_cpus_and_no_gpus(runs):
    scripts = {p.name: p.read_text() for p in (runs.slurm / "scripts").glob("*.sbatch")}
    assert sorted(scripts) == ["01-regenerate.sbatch", "02-dump.sbatch", "03-train.sbatch", "04-export-benchmark.sbatch"]
    assert not any("--gpus" in text or "--gres" in text for text in scripts.values())
    assert "#SBATCH --array=0-1\n" in scripts["01-regenerate.sbatch"]
    assert "#SBATCH --array=0-2%2\n" in scripts["02-dump.sbatch"] and "--device cpu" in scripts["02-dump.sbatch"]
    assert "#SBATCH --cpus-per-task=2" in scripts["03-train.sbatch"]
    assert all("#SBATCH --partition=ae3" in t and "#SBATCH --time=00:30:00" in t for t in scripts.values())
    # Slurm took the %2; it held the third dump task back if that one had not started yet
    dump, queue = runs.chains[0]["02-dump"], runs.queue_at_kill
    assert "ArrayTaskThrottle=2" in queue[-1], queue
    assert f"{dump}_2 PENDING JobArrayTaskLimit" in queue or not any(q.startswith(f"{dump}_2 P") for q in queue)


def test_every_array_task_ran_its_own_shard(runs):
    for chain in (0, 1):
        for step, stage in (("01-regenerate", "regenerate"), ("02-dump", "dump")):
            n = SHARDS[stage]
            for task in range(n):
                named = set(re.findall(rf"shard-(\d{{5}})-of-{n:05d}", runs.log(step, chain, task)))
                if (chain, step, task) == (0, "02-dump", KILLED):  # cancelled before it logged a line
                    assert named <= {f"{task:05d}"}, named
                    assert runs.killed_lock["slurm_job"].startswith(f"{runs.chains[0][step]}_{task}.")
                else:
                    assert named == {f"{task:05d}"}, (step, chain, task, named)


def test_afterok_ordered_the_chain_and_a_failed_step_cancelled_the_rest(runs):
    done = runs.cluster.completed()

    def runs_of(job: str) -> list[dict[str, str]]:
        return [r for r in done if job in (r["JobId"], r.get("ArrayJobId"))]

    first, second = runs.chains
    assert [r["JobState"] for r in runs_of(first["02-dump"]) if r.get("ArrayTaskId") == str(KILLED)] == ["CANCELLED"]
    for step in ("03-train", "04-export-benchmark"):  # never started: cancelled by --kill-on-invalid-dep
        assert [(r["JobState"], r["NodeList"]) for r in runs_of(first[step])] == [("CANCELLED", "(null)")]
    steps = ["01-regenerate", "02-dump", "03-train", "04-export-benchmark"]
    for before, after in zip(steps, steps[1:], strict=False):
        ends = [r["EndTime"] for r in runs_of(second[before])]
        starts = [r["StartTime"] for r in runs_of(second[after])]
        assert max(ends) <= min(starts), (before, after, ends, starts)  # ISO times sort as strings
    assert all(r["JobState"] == "COMPLETED" for step in steps[:2] + steps[3:] for r in runs_of(second[step]))


def test_status_showed_per_shard_progress_and_the_locks_while_it_ran(runs):
    dump = runs.chains[0]["02-dump"]
    mid, killed, lock = runs.status["dump"], runs.status["dump-killed"], runs.killed_lock
    assert re.search(r"regenerate 2/2 shards done", mid) and re.search(r"dump +[01]/3 shards done", mid), mid
    assert re.search(rf"in progress: shard {KILLED:05d} \([1-9]\d* samples durable\)", mid), mid
    assert (f"running: shard-{KILLED:05d}-of-00003 on {lock['host']} pid {lock['pid']} "
            f"Slurm job {dump}_{KILLED}.") in mid, mid
    assert f"in progress: shard {KILLED:05d} ({runs.durable_at_kill} samples durable)" in killed, killed
    assert f"stale lock (owner gone): shard-{KILLED:05d}-of-00003 on {lock['host']} pid {lock['pid']}" in killed
    assert "dump       2/3 shards done" in killed, killed
    assert re.search(r"latest committed checkpoint: step-0000(0[4-9]|1[01])", runs.status["train"])
    assert "running: train on" in runs.status["train"], runs.status["train"]
    end = runs.status["end"]  # the command itself, once everything ran
    assert "dump       3/3 shards done" in end and "benchmark  done" in end, end
    assert f"train      finished; latest committed checkpoint: step-{MAX_STEPS:06d}" in end, end


def test_cancelled_dump_task_resumed_after_its_last_durable_flush(runs):
    assert 1 <= runs.durable_at_kill < 4, runs.durable_at_kill  # mid-shard: 4 samples per shard
    resumed = runs.log("02-dump", 1, KILLED)
    assert f"resuming after {runs.durable_at_kill} committed samples" in resumed, resumed[-3000:]
    for task in set(range(SHARDS["dump"])) - {KILLED}:  # done shards are skipped
        assert f"shard-{task:05d}-of-00003: complete in" in runs.log("02-dump", 1, task)
    for task in range(SHARDS["regenerate"]):
        assert "nothing to do: the selected shards are complete" in runs.log("01-regenerate", 1, task)
    # the resubmitted task took the lock its cancelled predecessor left, and released it when done
    old, new = runs.killed_lock, runs.taken_over_lock
    assert new["pid"] != old["pid"] and new["slurm_job"].startswith(f"{runs.chains[1]['02-dump']}_{KILLED}.")
    assert not list((runs.work("slurm") / "store" / "locks").glob("*.lock"))


def test_training_requeued_and_a_rank_killed_resume_from_the_last_committed_step(runs):
    train = runs.chains[1]["03-train"]
    log = runs.log("03-train", 1)
    assert f"JOB {train} ON" in log and "DUE TO JOB REQUEUE" in log, log[-3000:]  # scontrol requeue
    assert log.count("ae3: exit 1 (a rerun helps): requeueing") == 1, log[-3000:]
    resumed = [int(s) for s in re.findall(r"rank 0 resumed from step (\d+)", log)]
    assert resumed == [runs.committed["requeue"], runs.committed["rank-kill"]], resumed
    assert SAVE_EVERY <= resumed[0] < resumed[1] < MAX_STEPS
    run = runs.work("slurm") / "run"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == list(range(1, MAX_STEPS + 1)) + [MAX_STEPS]  # train lines once each + fit
    states = [r["JobState"] for r in runs.cluster.completed() if r["JobId"] == train]
    assert states[-1] == "COMPLETED" and len(states) == 3, states


def test_slurm_run_equals_the_local_run(runs):
    local, slurm = runs.work("local"), runs.work("slurm")
    for stage_dir in ("regenerated", "store"):
        diff = subprocess.run([sys.executable, "-m", "storage.inspect", "diff", str(local / stage_dir),
                               str(slurm / stage_dir)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert diff.returncode == 0 and "identical" in diff.stdout, diff.stdout[-3000:]
    import torch

    from modeling.draft.snapshot import load_draft_snapshot

    step = f"step-{MAX_STEPS:06d}"
    ref, got = (load_draft_snapshot(w / "run" / "checkpoints" / step).state_dict for w in (local, slurm))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), \
        "srun torchrun (requeued twice) ended with other weights than `python -m stages.train --nproc 2`"
    assert (local / "draft" / "model.safetensors").read_bytes() == (slurm / "draft" / "model.safetensors").read_bytes()
    ref_b, got_b = (json.loads((w / "benchmark.json").read_text()) for w in (local, slurm))
    for key in ("acceptance", "outputs_equal", "lossless_verdict", "reference_reproduced", "num_prompts"):
        assert ref_b[key] == got_b[key], (key, ref_b[key], got_b[key])
    assert got_b["outputs_equal"] and got_b["reference_reproduced"]["fraction"] == 1.0
    assert (local / "benchmark.outputs.jsonl").read_text() == (slurm / "benchmark.outputs.jsonl").read_text()
