"""The build marker every checkpoint builder shares (the tiny targets, the SmolLM2 audio target): a
finished build is recognised, a stale one rebuilt.

A builder writes its files into a temporary directory; :func:`ensure_built` writes the ``.complete``
marker last (the build arguments plus a builder id: a hash of the builder's source files and the
transformers/tokenizers versions) and renames the directory into place, so a crash never leaves a
directory that looks finished, and a build made by other code or other arguments is replaced.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pipeline.core.durable import build_dir, ensure_dir

COMPLETE_MARKER = ".complete"


def builder_id(sources: Iterable[Path]) -> str:
    """The code that builds a checkpoint: one hash over ``sources`` (the builder's files, in order)."""
    import tokenizers
    import transformers

    digest = hashlib.sha256(b"".join(Path(p).read_bytes() for p in sources)).hexdigest()[:16]
    return f"{digest}/transformers-{transformers.__version__}/tokenizers-{tokenizers.__version__}"


def marker(params: dict[str, Any], sources: Iterable[Path]) -> dict[str, Any]:
    return {**params, "builder": builder_id(sources)}


def keyword_defaults(builder: Callable[..., Any]) -> dict[str, Any]:
    """Keyword-only defaults of a builder: its signature is the one place they are written."""
    params = inspect.signature(builder).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def is_built(out_dir: str | os.PathLike[str], params: dict[str, Any], sources: Iterable[Path]) -> bool:
    """True when ``out_dir`` holds a finished build with these arguments, made by this code."""
    try:
        return json.loads((Path(out_dir) / COMPLETE_MARKER).read_text(encoding="utf-8")) == marker(params, sources)
    except (OSError, ValueError):
        return False


def _write_with_marker(write: Callable[[Path], None], params: dict[str, Any],
                       sources: tuple[Path, ...]) -> Callable[[Path], None]:
    def run(tmp: Path) -> None:
        write(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker(params, sources), indent=2, sort_keys=True) + "\n",
                                           encoding="utf-8")  # last: the build is complete
    return run


def ensure_built(out_dir: str | os.PathLike[str], params: dict[str, Any], sources: Iterable[Path],
                 write: Callable[[Path], None]) -> Path:
    """``out_dir`` after building it with ``write(tmp)`` only if no finished build with these arguments
    by this code is there; concurrent callers serialise on a lock next to ``out_dir``
    (:func:`pipeline.core.durable.ensure_dir`)."""
    sources = tuple(sources)
    return ensure_dir(out_dir, lambda out: is_built(out, params, sources), _write_with_marker(write, params, sources))


def rebuild(out_dir: str | os.PathLike[str], params: dict[str, Any], sources: Iterable[Path],
            write: Callable[[Path], None]) -> Path:
    """Build into ``out_dir`` unconditionally (replacing it), marker last."""
    return build_dir(out_dir, _write_with_marker(write, params, tuple(sources)))
