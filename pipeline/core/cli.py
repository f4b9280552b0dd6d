"""The shell every stage command shares: logging, config parsing, and exit statuses.

A failure ends in one line naming what went wrong and what to do, never in a traceback the
user must read backwards; the exit status says which kind it was, so a Slurm script or
``run_pipeline.py`` can decide whether a rerun can help:

- 0: done;
- 1: a service the stage depends on failed (engine, every server); durable progress is kept;
- 2: a configuration, input, lock or settings-mismatch problem: fix the command or the data;
- 3: the output could not be written (disk full, quota, file-size limit, read-only or failing
  filesystem). Nothing partial was recorded as complete: free space and rerun the same command.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from typing import TypeVar

from pipeline.core.config import parse_config
from pipeline.core.progress import setup_logging

EXIT_OK, EXIT_SERVICE, EXIT_INPUT, EXIT_WRITE = 0, 1, 2, 3
EXIT_MEANING = {
    EXIT_SERVICE: "a service failed or a process crashed; durable progress is kept: rerun to continue",
    EXIT_INPUT: "a configuration, input or lock problem: fix it, then rerun",
    EXIT_WRITE: "the output could not be written (disk full, quota, file-size limit): free space, then rerun",
}
# errors of the filesystem being written, not of the data: the same command succeeds once the
# space or the filesystem is back
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})

C = TypeVar("C")


def write_error(err: BaseException) -> OSError | None:
    """The filesystem error behind ``err`` (itself or in its cause/context chain), preferring one
    that names its file."""
    seen: set[int] = set()
    found: list[OSError] = []
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in WRITE_ERRNOS:
            found.append(cur)
        cur = cur.__cause__ or cur.__context__
    return next((e for e in found if e.filename), found[0] if found else None)


def describe_write_error(os_err: OSError) -> str:
    where = f" {os_err.filename}" if os_err.filename else ""
    name = errno.errorcode.get(os_err.errno or 0, "?")
    return (f"cannot write{where}: {os_err.strerror} ({name}). Completed work is kept and nothing partial was "
            "recorded as complete: free space (or raise the quota/limit) and rerun the same command to continue")


def stage_main(prog: str, config_cls: type[C], section: str, description: str, argv: list[str] | None,
               body: Callable[[C], object], input_errors: tuple[type[BaseException], ...] = (ValueError,),
               service_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Parse ``config_cls`` from ``argv`` (flags, ``--config`` YAML ``section``) and run ``body``.

    ``body`` may return an exit status; anything else it returns (a result list) means 0.
    ``input_errors`` end with status 2 and ``service_errors`` with 1, each as one line; a
    filesystem write error anywhere (see :data:`WRITE_ERRNOS`) ends with 3. Anything else is a
    bug and keeps its traceback.
    """
    setup_logging()
    cfg = parse_config(config_cls, argv, prog=prog, section=section, description=description)
    try:
        status = body(cfg)
        return status if isinstance(status, int) and not isinstance(status, bool) else EXIT_OK
    except BaseException as err:  # noqa: BLE001 - classified below, re-raised when unknown
        os_err = write_error(err)
        if os_err is not None:
            print(f"{prog}: error: {describe_write_error(os_err)}", file=sys.stderr)
            if err is not os_err:  # the outer error says what was being written (a shard, a checkpoint)
                print(f"{prog}: while: {err}", file=sys.stderr)
            return EXIT_WRITE
        if service_errors and isinstance(err, service_errors):
            print(f"{prog}: error: {err}; durable progress is kept, rerun the same command to continue",
                  file=sys.stderr)
            return EXIT_SERVICE
        if isinstance(err, input_errors):
            print(f"{prog}: error: {err}", file=sys.stderr)
            return EXIT_INPUT
        raise
