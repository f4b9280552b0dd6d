"""Named crash points, for fault-injection tests of resume: ``kill -9`` at a chosen instant.

Code that commits work passes through :func:`crash_point` at the instants where a crash is
most dangerous (between an fsync and its rename, between a rename and the manifest entry, in
the middle of a log append). Normally this costs one dict lookup. With the environment variable
``AE3_CRASH_AT`` set, the process sends itself SIGKILL at the chosen passage: the same state
on disk as a preempted job or a node failure at that instant, with no cleanup of any kind.

``AE3_CRASH_AT`` holds one spec:

- ``N``: the N-th passage through any crash point (1-based; pick N at random for fuzzing);
- ``POINT[:TARGET][#N]``: the N-th (default first) passage through ``POINT`` whose target
  (usually a file name) matches the glob ``TARGET``, e.g. ``after-rename-dir:shard-00000*``.

``AE3_CRASH_TRACE=FILE`` appends one ``POINT TARGET`` line per passage (before any crash), so a
test can list the points an uninterrupted run passes and pick among them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ENV_CRASH_AT = "AE3_CRASH_AT"
ENV_TRACE = "AE3_CRASH_TRACE"

# the points the code base passes through, for documentation and spec checking
POINTS = {
    "before-rename": "a file is written and fsynced under its temporary name, not renamed yet",
    "after-rename": "a file is renamed into place; its directory entry is not fsynced yet",
    "before-rename-dir": "a finished directory (a store shard) is fsynced, not renamed yet",
    "after-rename-dir": "a directory is renamed into place; nothing recorded it yet",
    "dir-swap": "replacing a directory: the old one is moved aside, the new one not renamed in yet",
    "torn-append": "half of a progress-log append is written and fsynced (a torn line)",
    "train-step": "an optimizer step finished; nothing of it is saved",
}


@dataclass(frozen=True)
class CrashSpec:
    point: str | None  # None: any point
    target: str  # glob over the target
    nth: int

    @classmethod
    def parse(cls, text: str) -> CrashSpec:
        text = text.strip()
        if text.isdigit():
            return cls(None, "*", int(text))
        head, _, nth = text.partition("#")
        point, _, target = head.partition(":")
        if point not in POINTS:
            raise ValueError(f"{ENV_CRASH_AT}={text!r}: unknown crash point {point!r} (known: {', '.join(POINTS)})")
        if nth and not nth.isdigit():
            raise ValueError(f"{ENV_CRASH_AT}={text!r}: the count after '#' must be a positive integer")
        return cls(point, target or "*", int(nth or 1))

    def matches(self, point: str, target: str) -> bool:
        return (self.point is None or self.point == point) and fnmatch.fnmatchcase(target, self.target)


_state: dict[str, object] = {}


def _spec() -> CrashSpec | None:
    if "spec" not in _state:
        raw = os.environ.get(ENV_CRASH_AT, "")
        _state["spec"] = CrashSpec.parse(raw) if raw else None
        _state["seen"] = 0
    return _state["spec"]  # type: ignore[return-value]


def should_crash(point: str, target: str = "") -> bool:
    """True at the passage ``AE3_CRASH_AT`` names (the caller then does its partial work and dies)."""
    trace = os.environ.get(ENV_TRACE)
    if trace:
        with open(trace, "a", encoding="utf-8") as fh:
            fh.write(f"{point} {target}\n")
    spec = _spec()
    if spec is None or not spec.matches(point, target):
        return False
    _state["seen"] = int(_state["seen"]) + 1  # type: ignore[call-overload]
    return _state["seen"] == spec.nth


def die() -> None:
    """SIGKILL this process now: no atexit, no finally, no flush of Python buffers."""
    os.kill(os.getpid(), signal.SIGKILL)


def crash_point(point: str, target: str = "") -> None:
    if should_crash(point, target):
        die()


# ---- drills: run a command through a chain of crashes ----------------------------------------


@contextmanager
def tracing(path: str | Path) -> Iterator[Path]:
    """Record the crash points this process (and its children) pass into ``path``."""
    path = Path(path)
    path.unlink(missing_ok=True)
    old = os.environ.get(ENV_TRACE)
    os.environ[ENV_TRACE] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop(ENV_TRACE, None)
        else:
            os.environ[ENV_TRACE] = old


def read_trace(path: str | Path) -> list[tuple[str, str]]:
    lines = Path(path).read_text(encoding="utf-8").splitlines() if Path(path).exists() else []
    return [(p, t) for p, _, t in (line.partition(" ") for line in lines)]


def random_passages(num_passages: int, count: int, seed: int, upto: float = 0.5) -> list[str]:
    """``count`` distinct specs ``N`` drawn from the first ``upto`` of ``num_passages`` passages."""
    rng = random.Random(seed)
    pool = range(1, max(2, int(num_passages * upto)) + 1)
    return [str(n) for n in sorted(rng.sample(pool, min(count, len(pool))))]


@dataclass
class DrillRun:
    spec: str | None  # None: the final, uninterrupted run
    returncode: int
    seconds: float
    log: Path


def crash_chain(cmd: list[str], specs: list[str], log_dir: str | Path, *, cwd: str | Path | None = None,
                env: dict[str, str] | None = None, timeout_s: float = 900.0) -> list[DrillRun]:
    """Run ``cmd`` once per spec with ``AE3_CRASH_AT`` set, then once plainly, all into the same
    output (``cmd`` must resume). Runs whose spec is not reached finish normally; that is
    reported in the returned list, not an error here (callers assert what they need)."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    runs: list[DrillRun] = []
    base = {k: v for k, v in (env or os.environ).items() if k != ENV_CRASH_AT}
    for i, spec in enumerate([*specs, None]):
        run_env = dict(base) if spec is None else {**base, ENV_CRASH_AT: spec}
        log_path = log_dir / f"run-{i:02d}.log"
        start = time.monotonic()
        with open(log_path, "wb") as log_file:
            # own session: a launcher's children (DeepSpeed ranks) go down with it below
            proc = subprocess.Popen(cmd, cwd=cwd, env=run_env, stdout=log_file, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=timeout_s)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # what a crashed rank's launcher leaves behind
                proc.wait()
        runs.append(DrillRun(spec, code, time.monotonic() - start, log_path))
    return runs


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.core.faults [--crash SPEC ...] [--random K --passages N --seed S] -- CMD ...``"""
    import argparse
    import shlex
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.core.faults",
        description="Resume drill: run CMD killed (SIGKILL) at each --crash point in turn, each run resuming "
                    "the previous one, then once to the end. Compare its output with an uninterrupted "
                    "run's using `python -m storage.inspect diff`.")
    parser.add_argument("--crash", action="append", default=[], metavar="SPEC",
                        help="a crash point spec (see the module docstring), e.g. 'after-rename-dir:shard-*' or 12")
    parser.add_argument("--random", type=int, default=0, metavar="K", help="also crash at K random passages")
    parser.add_argument("--passages", type=int, default=40,
                        help="passages of a full run to draw from (AE3_CRASH_TRACE of a full run counts them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logs", default="crash-drill-logs", help="one log file per run goes here")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the stage command")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("give the command to drill after --")
    specs = random_passages(args.passages, args.random, args.seed) + args.crash
    for spec in specs:
        try:
            CrashSpec.parse(spec)  # fail on a typo before the first run
        except ValueError as err:
            parser.error(str(err))
    runs = crash_chain(cmd, specs, args.logs)
    ok = all(r.returncode != 0 for r in runs[:-1]) and runs[-1].returncode == 0
    for r in runs:
        what = "killed" if r.returncode == -signal.SIGKILL else f"exit {r.returncode}"
        print(f"{r.spec or '(to the end)':40s} {what:10s} {r.seconds:7.1f} s  {r.log}")
    if not ok:
        print(f"drill FAILED: a crash point was not reached or the last run failed ({shlex.join(cmd)})",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
