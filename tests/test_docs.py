"""The documentation names only flags, commands and files that exist.

Every ``--flag`` written after one of the project's commands (``python -m stages.X``,
``deepspeed/torchrun ... -m stages.train``, ``run_pipeline.py``, ``python -m storage.inspect SUB``,
``python -m pipeline.X``, ``python -m benchmarks.X``) in a code span or block of README.md or
docs/*.md must be an option of that command's argparse parser (built in-process from the same code
the command runs, no subprocess); a boolean switch must not be given a value (``--tie-check false``
is an error: the switch is ``--no-tie-check``). A flag in a span of its own (``--split-long-audio``)
must belong to some project command or to a known outside tool. ``make X`` must be a Makefile
target. Every repository path in backticks (``pipeline/core/config.py``, ``configs/demo.yaml``,
``tests/x.py::test_y``) and every relative Markdown link must exist.

Pages written in parallel branches (see ``PENDING``) may be linked before they land; every
docs/*.md present when the test runs is checked.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
# linked from README/docs before their branches are merged; checked like any page once present
PENDING = {"docs/inputs.md", "docs/real-checkpoints.md"}
# first path components that name the repository's own files
REPO_DIRS = ("pipeline", "stages", "storage", "modeling", "configs", "tests", "benchmarks", "docs", ".ci")
ROOT_FILES = ("run_pipeline.py", "pyproject.toml", "Makefile", "README.md")
# made by the tests or the commands, not committed
GENERATED = ("tests/.cache",)
# flags of other tools the docs mention in spans of their own (vLLM, SGLang, DeepSpeed, torchrun,
# Slurm, pip); a project flag of the same name is checked against the project's parsers first
EXTERNAL_FLAGS = {
    # vLLM server / SGLang
    "--model", "--chat-template-content-format", "--max-num-seqs", "--speculative-config",
    "--gpu-memory-utilization", "--speculative-algorithm", "--speculative-draft-model-path",
    "--speculative-num-steps", "--speculative-eagle-topk", "--speculative-num-draft-tokens",
    # DeepSpeed and torchrun launchers
    "--num_gpus", "--num_nodes", "--hostfile", "--module", "--no_local_rank", "--local_rank",
    "--nnodes", "--nproc-per-node", "--rdzv-backend", "--rdzv-id", "--rdzv-endpoint",
    # Slurm
    "--array", "--dependency", "--kill-on-invalid-dep", "--requeue", "--open-mode", "--chdir",
    "--cpus-per-task", "--gpus-per-node", "--gres", "--time", "--signal", "--job-name",
    # pip
    "--dry-run", "--report",
    # TensorBoard
    "--logdir",
}

FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
INVOCATION = re.compile(
    r"(?:python3?\s+-m\s+|--module\s+|(?<![\w-])-m\s+)"
    r"(?P<mod>(?:stages|pipeline|storage|benchmarks|modeling)(?:\.\w+)+)"
    r"(?:\s+(?P<sub>summary|verify|show|stats|du|diff)\b)?"
    r"|(?P<rp>run_pipeline\.py)(?:\s+(?P<rpcmd>run|status|emit-slurm)\b)?"
)
INSPECT_ROW = re.compile(r"^(?P<sub>summary|verify|show|stats|du|diff)\s+[A-Z]")
MAKE = re.compile(r"(?<![\w-])make\s+(?P<target>[a-z][\w-]*)")
SEPARATORS = re.compile(r"\s(?:&&|\|\||\||;)\s")
PLACEHOLDER_FLAGS = {"--flag"}  # "[--flag value ...]": any flag of the command


# ------------------------------------------------------------------------------------------------
# the parsers


class _Captured(Exception):
    pass


def _capture(main: Callable[..., object], takes_argv: bool = True) -> argparse.ArgumentParser:
    """The parser ``main`` builds: stop it at ``parse_args`` (nothing after that runs)."""

    def stop(self: argparse.ArgumentParser, *_: object, **__: object) -> None:
        raise _Captured(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop):
        try:
            main([]) if takes_argv else main()
        except _Captured as captured:
            return captured.args[0]
    raise AssertionError(f"{main.__module__}.main() built no argparse parser")


def _stage_parser(module: str, cls_name: str, cls_module: str | None = None) -> argparse.ArgumentParser:
    from pipeline.core.config import build_parser

    cls = getattr(importlib.import_module(cls_module or module), cls_name)
    parser = build_parser(cls, f"python -m {module}", "")
    if module == "stages.train":  # handled by stages.train.main before the parser sees argv
        parser.add_argument("--check-only", action="store_true")
    return parser


@functools.cache
def parsers() -> dict[str, argparse.ArgumentParser]:
    """Command key -> parser. Keys: module names, ``storage.inspect SUB``, ``run_pipeline.py``."""
    out: dict[str, argparse.ArgumentParser] = {
        "stages.regenerate": _stage_parser("stages.regenerate", "RegenerateConfig"),
        "stages.dump": _stage_parser("stages.dump", "DumpConfig"),
        "stages.train": _stage_parser("stages.train", "TrainConfig", "modeling.training.config"),
        "stages.export": _stage_parser("stages.export", "ExportConfig"),
        "stages.benchmark": _stage_parser("stages.benchmark", "BenchmarkConfig"),
        "pipeline.tools.install_check": argparse.ArgumentParser(prog="python -m pipeline.tools.install_check"),
    }
    from storage.inspect.cli import build_parser as inspect_parser

    inspect = inspect_parser()
    out["storage.inspect"] = inspect
    for action in inspect._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[f"storage.inspect {name}"] = sub
    import run_pipeline

    out["run_pipeline.py"] = _capture(run_pipeline.main)
    for module in ("pipeline.core.faults", "pipeline.tools.view", "pipeline.tools.tiny_target", "modeling.asr_target.train_target",
                   "modeling.asr_target.speech", "benchmarks.bench_asr_target", "benchmarks.bench_batch_invariance",
                   "benchmarks.bench_codecs", "benchmarks.bench_store", "benchmarks.bench_train",
                   "benchmarks.bench_ttt_step", "benchmarks.bench_audio_vs_text", "modeling.smol_audio.dataset",
                   "modeling.smol_audio.build", "modeling.smol_audio.teacher", "modeling.smol_audio.train",
                   "benchmarks.bench_smol_target", "benchmarks.probe_smol_reading", "benchmarks.eval_draft_on_store",
                   "benchmarks.draft_curve"):
        main = importlib.import_module(module).main
        takes_argv = bool(main.__code__.co_argcount)
        out[module] = _capture(main, takes_argv)
    return out


@functools.cache
def parser_of(module: str) -> argparse.ArgumentParser:
    """A project command not listed in :func:`parsers` (a new one): the parser its ``main`` builds.
    A module whose source never builds an ArgumentParser takes no flags (and its main is not run)."""
    path = REPO / Path(*module.split("."))
    source = (path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__main__.py")
    main = getattr(importlib.import_module(module), "main", None)
    if main is None or not source.is_file() or "ArgumentParser" not in source.read_text():
        return argparse.ArgumentParser(prog=f"python -m {module}")
    return _capture(main, bool(main.__code__.co_argcount))


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: a for a in parser._actions for opt in a.option_strings}


def make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.M)}


# ------------------------------------------------------------------------------------------------
# reading the Markdown


@dataclass
class Snippet:
    where: str  # file:line
    text: str
    block: bool  # a fenced code block line (else an inline span)


def snippets(text: str, name: str) -> Iterator[Snippet]:
    """Code-block lines (backslash continuations joined; ``#   [--flag ...]`` comment lines joined to
    the command above) and inline code spans (which may wrap a line), with their line numbers."""
    lines = text.splitlines()
    fence = False
    pending: tuple[int, str] | None = None
    last_cmd: Snippet | None = None
    prose: list[tuple[int, str]] = []  # (line number, line) outside fences, flushed at each fence

    def spans() -> Iterator[Snippet]:
        joined = "\n".join(line for _, line in prose)
        for m in re.finditer(r"(`+)((?:(?!\n\s*\n).)+?)\1", joined, re.S):
            no = prose[0][0] + joined.count("\n", 0, m.start())
            yield Snippet(f"{name}:{no}", " ".join(m.group(2).split()), False)
        prose.clear()

    for no, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            fence = not fence
            if last_cmd is not None:
                yield last_cmd
            last_cmd = None
            if fence and prose:
                yield from spans()
            continue
        if fence:
            if pending is not None:
                start, acc = pending
                line, no = acc + " " + line.strip(), start
            if line.rstrip().endswith("\\"):
                pending = (no, line.rstrip()[:-1])
                continue
            pending = None
            if re.match(r"^\s*#\s+\[--", line) and last_cmd is not None:  # "#   [--step 5000] ..."
                last_cmd.text += " " + line.strip().lstrip("#")
                continue
            if last_cmd is not None:
                yield last_cmd
            last_cmd = Snippet(f"{name}:{no}", line, True)
            continue
        prose.append((no, line))
    if last_cmd is not None:
        yield last_cmd
    if prose:
        yield from spans()


def _next_token(text: str, end: int) -> str:
    m = re.match(r"\s*(\S+)", text[end:])
    return m.group(1) if m else ""


def _takes_no_value(action: argparse.Action) -> bool:
    return action.nargs == 0


def _value_after(token: str) -> bool:
    """The token after a flag is a value given to it (not a flag, comment, or optional-part bracket)."""
    return bool(token) and not token.startswith(("-", "#", "[", "]", "\\", "...", "(", "`", ">", "|"))


def check_flags(snippet: Snippet) -> list[str]:
    """Problems with the ``--flags`` and ``make`` targets of one snippet."""
    problems: list[str] = []
    table = parsers()
    for m in MAKE.finditer(snippet.text):
        if m.group("target") not in make_targets():
            problems.append(f"{snippet.where}: `make {m.group('target')}`: no such Makefile target")
    for part in SEPARATORS.split(snippet.text):
        calls = list(INVOCATION.finditer(part))
        if not calls:
            row = INSPECT_ROW.match(part) if not snippet.block else None
            if row:
                calls_spans = [(f"storage.inspect {row.group('sub')}", row.end(), len(part))]
            else:
                if not snippet.block:
                    problems += _check_bare(snippet, part)
                continue
        else:
            calls_spans = []
            for i, c in enumerate(calls):
                end = calls[i + 1].start() if i + 1 < len(calls) else len(part)
                if c.group("rp"):
                    key = "run_pipeline.py"
                elif c.group("sub") and c.group("mod") == "storage.inspect":
                    key = f"storage.inspect {c.group('sub')}"
                else:
                    key = c.group("mod")
                calls_spans.append((key, c.end(), end))
        for key, start, end in calls_spans:
            module = key.split()[0]
            if key in table:
                parser = table[key]
            elif not module.startswith(("stages.", "pipeline.", "storage.", "benchmarks.")):
                continue  # modeling.* are not commands
            elif not _module_exists(module):
                problems.append(f"{snippet.where}: `python -m {module}`: no such module")
                continue
            else:
                parser = parser_of(module)
            opts = options(parser)
            seg = part[start:end]
            for f in FLAG.finditer(seg):
                flag = f.group(0)
                if flag in PLACEHOLDER_FLAGS:
                    continue
                if flag not in opts:
                    problems.append(f"{snippet.where}: `{flag}` is not an option of `{key}`")
                elif _takes_no_value(opts[flag]) and "=" not in seg[f.end():f.end() + 1] \
                        and _value_after(_next_token(seg, f.end())):
                    problems.append(f"{snippet.where}: `{flag}` of `{key}` takes no value "
                                    f"(got {_next_token(seg, f.end())!r})")
                elif _takes_no_value(opts[flag]) and seg[f.end():f.end() + 1] == "=":
                    problems.append(f"{snippet.where}: `{flag}` of `{key}` takes no value")
    return problems


def _check_bare(snippet: Snippet, part: str) -> list[str]:
    """A span without a command: each flag belongs to a project command or a known outside tool."""
    problems = []
    table = parsers()
    for f in FLAG.finditer(part):
        flag = f.group(0)
        if flag in PLACEHOLDER_FLAGS:
            continue
        owners = [opts[flag] for opts in map(options, table.values()) if flag in opts]
        if not owners:
            if flag not in EXTERNAL_FLAGS:
                problems.append(f"{snippet.where}: `{flag}` is not an option of any project command")
            continue
        nxt = _next_token(part, f.end())
        if part[f.end():f.end() + 1] != "=" and _value_after(nxt) and all(map(_takes_no_value, owners)) \
                and not nxt.startswith(("/", "|")) and nxt not in ("or", "and"):
            problems.append(f"{snippet.where}: `{flag}` takes no value (got {nxt!r})")
    return problems


def _module_exists(module: str) -> bool:
    path = REPO / Path(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


PATH_TOKEN = re.compile(r"^(?P<path>[\w.-]+(?:/[\w.-]+)*/?)(?:::(?P<test>\w+))?$")


def check_paths(snippet: Snippet) -> list[str]:
    """Repository paths in an inline span: each whitespace-separated token that starts with one of
    the repository's folders (or is a root file) must exist; ``file.py::test_x`` also needs the test."""
    if snippet.block:
        return []
    problems = []
    for token in snippet.text.split():
        token = token.strip("(),;:[]'\"")
        m = PATH_TOKEN.match(token)
        if not m:
            continue
        path = m.group("path")
        first = path.split("/")[0]
        if not ((first in REPO_DIRS and "/" in path) or path in ROOT_FILES):
            continue
        if path.rstrip("/") in PENDING or any(path.startswith(g) for g in GENERATED):
            continue
        full = REPO / path
        if not full.exists():
            problems.append(f"{snippet.where}: `{path}` does not exist")
        elif m.group("test") and not re.search(rf"def {m.group('test')}\b", full.read_text()):
            problems.append(f"{snippet.where}: `{path}` has no test `{m.group('test')}`")
    return problems


LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    fence = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        m = None if fence else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def check_links(text: str, page: Path) -> list[str]:
    """Relative Markdown links (``[x](docs/stage-dump.md#resume)``, ``![..](../benchmarks/...)``):
    the file exists and, for a Markdown page, so does the heading the ``#anchor`` names."""
    problems = []
    fence = False
    where = page.relative_to(REPO) if page.is_relative_to(REPO) else page
    for no, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = not fence
        if fence:
            continue
        for m in LINK.finditer(line):
            target, _, anchor = m.group("target").partition("#")
            if re.match(r"^[a-z]+:", target):
                continue
            full = (page.parent / target).resolve() if target else page
            rel = full.relative_to(REPO).as_posix() if full.is_relative_to(REPO) else str(full)
            if rel in PENDING and not full.exists():
                continue
            if not full.exists() and full != page:
                problems.append(f"{where}:{no}: link to `{target}` does not exist")
            elif anchor and full.suffix == ".md":
                heads = anchors(text if full == page else full.read_text())
                if anchor not in heads:
                    problems.append(f"{where}:{no}: link to `{m.group('target')}`: no such heading")
    return problems


def check_page(text: str, page: Path) -> list[str]:
    name = page.relative_to(REPO).as_posix() if page.is_relative_to(REPO) else page.name
    problems = []
    for snippet in snippets(text, name):
        problems += check_flags(snippet)
        problems += check_paths(snippet)
    return problems + check_links(text, page)


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


# ------------------------------------------------------------------------------------------------
# the tests


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_docs_name_real_flags_commands_and_paths(page: Path) -> None:
    problems = check_page(page.read_text(), page)
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_wrong_flag_a_valued_switch_and_a_wrong_path() -> None:
    page = REPO / "docs" / "bogus.md"  # never written: the text is checked as if it were there
    bad = """# A page with mistakes

```bash
python -m stages.dump --target DIR --input data.jsonl --store STORE --bogus-flag 3
python -m stages.benchmark --target DIR --draft D --input x.jsonl --output R.json --tie-check false
python run_pipeline.py --config configs/demo.yaml --stage train
```

The tie check (`modeling/tie_check.py`, `--tie-check false` to skip) and
`python -m storage.inspect verify STORE --deeep`; see `configs/no-such.yaml`,
`tests/stages/test_dump.py::test_that_does_not_exist` and [stage 9](stage-nine.md). `make nothing`.
See [resume](stage-dump.md#no-such-heading).
"""
    problems = check_page(bad, page)
    expected = ["`--bogus-flag` is not an option of `stages.dump`",
                "`--tie-check` of `stages.benchmark` takes no value (got 'false')",
                "`--stage` is not an option of `run_pipeline.py`",
                "`modeling/tie_check.py` does not exist",
                "`--tie-check` takes no value (got 'false')",
                "`--deeep` is not an option of `storage.inspect verify`",
                "`configs/no-such.yaml` does not exist",
                "has no test `test_that_does_not_exist`",
                "link to `stage-nine.md` does not exist",
                "`make nothing`: no such Makefile target",
                "link to `stage-dump.md#no-such-heading`: no such heading"]
    for message in expected:
        assert any(message in p for p in problems), f"not caught: {message}\n" + "\n".join(problems)
    assert len(problems) == len(expected), "\n".join(problems)
    good = bad.replace(" --bogus-flag 3", "").replace("--tie-check false", "--no-tie-check") \
        .replace(" --stage train", " --only train").replace("modeling/tie_check.py", "modeling/target_io/tie_check.py") \
        .replace("--deeep", "--deep").replace("configs/no-such.yaml", "configs/demo.yaml") \
        .replace("test_that_does_not_exist", "test_crash_chain_then_resume_is_identical") \
        .replace("stage-nine.md", "stage-dump.md").replace("make nothing", "make demo") \
        .replace("#no-such-heading", "#resume")
    assert check_page(good, page) == []
