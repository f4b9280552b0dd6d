"""System packages `make test`, `make demo` and CI need, checked before anything long (stdlib only).

Run with the system interpreter before the venv exists: ``python3 pipeline/tools/sysdeps.py [--ci] [--check]``.
As root on a Debian/Ubuntu machine the missing packages are installed with apt-get (``apt-get update``
first); otherwise it stops within seconds, printing the exact command to run. ``--check`` never installs
(what tests use); ``--ci`` also wants the packages only CI exercises.

Required: espeak-ng speaks the trained ASR target's train and held-out clips (`make demo`, the end-to-end
test, tests/pipeline/test_asr.py). Recommended (a note, never a stop): ffmpeg lets librosa read mp3/m4a
input, which no test needs; with ``--ci``, slurm-wlm and munge give tests/test_slurm.py a one-node Slurm
(that test can also install them itself).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Dep:
    package: str  # Debian package
    commands: tuple[str, ...]  # all must be on PATH (or in /usr/sbin, where Debian puts daemons)
    why: str


REQUIRED = (Dep("espeak-ng", ("espeak-ng",), "speaks the ASR clips of `make demo` and the end-to-end tests"),)
RECOMMENDED = (Dep("ffmpeg", ("ffmpeg",), "mp3/m4a input (wav/flac/ogg need nothing)"),)
CI_ONLY = (Dep("slurm-wlm", ("sbatch", "slurmctld", "slurmd"), "tests/test_slurm.py's one-node Slurm"),
           Dep("munge", ("munged",), "Slurm's authentication"))


def present(dep: Dep) -> bool:
    return all(shutil.which(c) or shutil.which(c, path="/usr/sbin") for c in dep.commands)


def missing(deps: tuple[Dep, ...]) -> list[Dep]:
    return [d for d in deps if not present(d)]


def install_command(deps: list[Dep], sudo: bool) -> str:
    pkgs = " ".join(d.package for d in deps)
    prefix = "sudo " if sudo else ""
    return f"{prefix}apt-get update && {prefix}apt-get install -y {pkgs}"


def missing_message(deps: list[Dep]) -> str:
    """What a user reads when required packages are missing: which, why, and the exact command."""
    lines = [f"missing system package {d.package} ({d.why})" for d in deps]
    if shutil.which("apt-get"):
        lines.append(f"install with: {install_command(deps, sudo=os.geteuid() != 0)}")
    else:
        lines.append(f"install these with your system's package manager: {' '.join(d.package for d in deps)}")
    return "\n".join(lines)


def apt_install(deps: list[Dep]) -> bool:
    """``apt-get update`` then install ``deps`` (root only); False when apt-get fails."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"sysdeps: installing {' '.join(d.package for d in deps)} with apt-get", flush=True)
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *[d.package for d in deps]]):
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            print(f"sysdeps: `{' '.join(cmd)}` failed", file=sys.stderr)
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check (and as root install) the system packages the "
                                                 "tests and the demo need.")
    parser.add_argument("--check", action="store_true", help="never install, only report")
    parser.add_argument("--ci", action="store_true", help="also want what only CI exercises (Slurm)")
    args = parser.parse_args(argv)
    wanted = RECOMMENDED + (CI_ONLY if args.ci else ())
    need, want = missing(REQUIRED), missing(wanted)
    can_install = not args.check and os.geteuid() == 0 and shutil.which("apt-get") is not None
    if (need or want) and can_install:
        apt_install(need + want)  # a failure shows in the re-check below
        need, want = missing(REQUIRED), missing(wanted)
    for dep in want:
        print(f"sysdeps: note: {dep.package} is not installed ({dep.why}); "
              f"to add it: {install_command([dep], sudo=os.geteuid() != 0)}", file=sys.stderr)
    if need:
        print(missing_message(need), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
