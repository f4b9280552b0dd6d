"""A one-node Slurm (Debian's slurm-wlm 22.05 + munge) for tests, in a directory of its own.

    reason = ensure_slurm()            # installs slurm-wlm and munge with apt-get when missing (root)
    cluster = SlurmCluster(tmp_dir)    # own slurm.conf, state, spool, logs, free ports, munge socket
    cluster.start()                    # munged, then slurmctld, then slurmd; waits for the node to be idle
    cluster.run("sbatch", ...)         # with SLURM_CONF pointing at this cluster
    cluster.stop()                     # cancels every job, stops the daemons by the pids it started

Every daemon runs in the foreground as a child of this process, so ``stop`` knows their pids; jobs
inherit a marker variable naming the cluster directory, and ``stop`` kills by pid whatever still
carries it (proctrack/linuxproc loses track of processes that outlive their batch shell).
Completed jobs are recorded by ``jobcomp/filetxt`` (one line per job run: state, start and end
second), which is what the tests read the chain's order from. Run as a script, it starts a
cluster and prints the ``SLURM_CONF`` to export until Ctrl-C.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAEMONS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "slurmctld", "slurmd", "munged")
MARKER = "AE3_SLURM_CLUSTER"
MUNGE_KEY = Path("/etc/munge/munge.key")


def ensure_slurm() -> str | None:
    """None when Slurm and munge are usable (installing them if missing), else why not."""
    if all(shutil.which(d) or shutil.which(d, path="/usr/sbin") for d in DAEMONS):
        return _ensure_munge_key()
    if os.geteuid() != 0:
        return "slurm-wlm and munge are not installed, and only root can install them"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = "apt-get update -qq && apt-get install -y -qq slurm-wlm munge"
    proc = subprocess.run(["sh", "-c", cmd], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return f"`{cmd}` failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-500:]}"
    return _ensure_munge_key()


def _ensure_munge_key() -> str | None:
    if MUNGE_KEY.exists():
        return None
    if os.geteuid() != 0:
        return f"{MUNGE_KEY} is missing and only root can create it"
    MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mungekey", "--create", f"--keyfile={MUNGE_KEY}"], check=True)
    shutil.chown(MUNGE_KEY, "munge", "munge")
    MUNGE_KEY.chmod(0o400)  # munged refuses a key that others can read
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, ok, timeout_s: float = 900, every_s: float = 0.05, logs: tuple[Path, ...] = ()):
    """``ok()``'s first truthy value, polled every ``every_s``; TimeoutError (with the logs' tails) after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = ok()
        if value:
            return value
        time.sleep(every_s)
    tails = "".join(f"\n--- {p}\n{p.read_text()[-2000:]}" for p in logs if p.exists())
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}{tails}")


class SlurmCluster:
    def __init__(self, root: Path, partition: str = "ae3"):
        self.root = Path(root)
        self.partition = partition
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.jobcomp = self.root / "jobcomp.txt"
        self.procs: dict[str, subprocess.Popen] = {}
        # munged runs as `munge` and checks that every directory above its socket is searchable:
        # a pytest tmp dir (0700, root) is not, so the socket lives in a directory of its own in /tmp
        self.munge_dir = Path(tempfile.mkdtemp(prefix="ae3-munge-"))
        self.env = dict(os.environ, SLURM_CONF=str(self.conf), **{MARKER: str(self.root)})

    def _config(self) -> str:
        # at least 2 CPUs whatever the machine has (config_overrides: slurmd trusts this line), so
        # that a 2-process training job fits; localhost addresses need no name resolution
        r, cpus = self.root, max(2, len(os.sched_getaffinity(0)))
        return "\n".join([
            "ClusterName=ae3test", f"SlurmctldHost={self.host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_dir / 'munge.socket'}",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "ReturnToService=2",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/filetxt", f"JobCompLoc={self.jobcomp}",
            "MinJobAge=3600",  # finished jobs stay visible to scontrol for the whole test
            "KillWait=5",  # seconds from SIGTERM to SIGKILL when a job is cancelled or requeued (default 30)
            "SlurmdParameters=config_overrides", f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP", ""])

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True, **kw)

    def start(self) -> SlurmCluster:
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        shutil.chown(self.munge_dir, "munge", "munge")
        self.munge_dir.chmod(0o755)
        socket_path = self.munge_dir / "munge.socket"
        m = self.munge_dir
        self._spawn("munged", ["munged", "-F", f"--socket={socket_path}", f"--pid-file={m / 'munged.pid'}",
                               f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"],
                    user="munge", group="munge")
        logs = tuple(self.root / "log" / f"{n}.out" for n in ("munged", "slurmctld", "slurmd"))
        wait_for("munged", socket_path.exists, 30, 0.2, logs)
        self.conf.write_text(self._config())
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        wait_for("slurmctld", lambda: "is UP" in self.run("scontrol", "ping", check=False).stdout, 60, 0.2, logs)
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        wait_for("the node", lambda: self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip() == "idle",
                 60, 0.2, logs)
        return self

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check,
                              timeout=120, **kw)

    def queue(self) -> list[str]:
        """``JOBID STATE REASON`` of every job still queued or running."""
        return self.run("squeue", "-h", "-o", "%i %T %r").stdout.split("\n")[:-1]

    def wait_idle(self, timeout_s: float) -> None:
        wait_for("an empty queue", lambda: not self.queue(), timeout_s, 1.0)

    def completed(self) -> list[dict[str, str]]:
        """One record per finished job run (requeued runs included), in completion order."""
        if not self.jobcomp.exists():
            return []
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in self.jobcomp.read_text().splitlines()]

    def stop(self) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged by their pids; whatever else
        still carries this cluster's marker is killed by pid."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--user=root", check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        deadline = time.monotonic() + 10
        while (left := self.leftover_pids()) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        shutil.rmtree(self.munge_dir, ignore_errors=True)

    def _marked(self) -> list[tuple[int, dict[str, str]]]:
        """(pid, environment) of every live process that inherited this cluster's marker."""
        me, out = os.getpid(), []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                raw = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            env = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
            if env.get(MARKER) == str(self.root):
                out.append((int(entry), env))
        return out

    def leftover_pids(self) -> list[int]:
        """Processes (daemons, jobs, job steps) started under this cluster that are still alive."""
        return [pid for pid, _ in self._marked()]

    def job_pids(self, job: str, **env: str) -> list[int]:
        """Processes of job ``job`` whose environment holds ``env`` (e.g. ``RANK="1"``)."""
        return [pid for pid, e in self._marked()
                if e.get("SLURM_JOB_ID") == job and all(e.get(k) == v for k, v in env.items())]


if __name__ == "__main__":
    reason = ensure_slurm()
    if reason:
        sys.exit(reason)
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="ae3-slurm-"))).start()
    print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
