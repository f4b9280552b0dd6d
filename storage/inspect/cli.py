"""Inspect a hidden-state store (stage 2) or a stage 1 output directory.

    python -m storage.inspect COMMAND PATH [options]

    command   store  stage 1  what
    summary     x       x     counts, shards done/partial/missing, rejections; store: bytes/token,
                              compression vs raw bf16, SpecForge comparison, --dataset-tokens estimate
    verify      x       x     files vs manifest and checksums (--deep: every chunk, NaN/Inf);
                              exit 1 on problems; --repair sets bad shards aside and re-queues them
    show        x             one sample's text (loss tokens coloured), spans, shapes, L2 norms
    stats       x             length histograms, per-layer activation statistics, --plot PNG
    du          x       x     bytes per shard and per array, from checksums.json / the manifest
    diff        x       x     same samples in the same order, bit-identical? exit 0 yes, 1 no

The kind of PATH is read from its manifest.json. ``--json`` prints the machine-readable result
(summary, verify, stats, du, diff). Exit status: 0 fine, 1 problems or differences, 2 a path that
cannot be inspected.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage.inspect.common import (
    STORE,
    Inspected,
    InspectError,
    Problem,
    detect,
    format_diff,
    format_du,
    format_verify,
)

DESCRIPTION = __doc__.split("\n\n")[0]


def cmd_summary(args: argparse.Namespace, item: Inspected) -> tuple[dict[str, Any], str, int]:
    if item.kind == STORE:
        from storage.inspect.store import format_store_summary, summarize_store

        s = summarize_store(item, args.dataset_tokens)
        return s, format_store_summary(s), 0
    from storage.inspect.stage1 import format_stage1_summary, summarize_stage1

    s = summarize_stage1(item)
    return s, format_stage1_summary(s), 0


def cmd_verify(args: argparse.Namespace, item: Inspected) -> tuple[dict[str, Any], str, int]:
    if item.kind == STORE:
        from storage.inspect.verify import repair_store as repair
        from storage.inspect.verify import verify_store as verify
    else:
        from storage.inspect.stage1 import repair_stage1 as repair
        from storage.inspect.stage1 import verify_stage1 as verify
    v = verify(item, deep=args.deep)
    fixed = None
    if args.repair and v["problems"]:
        fixed = repair(item, [Problem(**p) for p in v["problems"]])
        v["repair"] = fixed
    return v, format_verify(v, fixed), 1 if v["problems"] else 0


def cmd_du(args: argparse.Namespace, item: Inspected) -> tuple[dict[str, Any], str, int]:
    if item.kind == STORE:
        from storage.inspect.store import du_store

        d = du_store(item)
    else:
        from storage.inspect.stage1 import du_stage1

        d = du_stage1(item)
    return d, format_du(d), 0


def cmd_diff(args: argparse.Namespace, item: Inspected) -> tuple[dict[str, Any], str, int]:
    other = detect(args.other)
    if other.kind != item.kind:
        raise InspectError(f"cannot compare a {item.kind} ({item.path}) with a {other.kind} ({other.path})")
    if item.kind == STORE:
        from storage.inspect.store import diff_stores

        d = diff_stores(item.path, other.path, args.max_listed)
    else:
        from storage.inspect.stage1 import diff_stage1

        d = diff_stage1(item, other, args.max_listed)
    return d, format_diff(d), 0 if d["identical"] else 1


def cmd_stats(args: argparse.Namespace, item: Inspected) -> tuple[dict[str, Any], str, int]:
    from storage.inspect.stats import compute_stats, format_stats, plot_stats
    from storage.store import open_store

    store = open_store(item.path)
    s, moments = compute_stats(store, args.max_samples, args.seed, args.outlier_factor)
    if args.plot:
        plot_stats(args.plot, store, s, moments)
        s["plot"] = str(args.plot)
    return s, format_stats(s), 0


def cmd_show(args: argparse.Namespace, item: Inspected) -> tuple[dict[str, Any], str, int]:
    from pipeline.data.samples import load_target_processor
    from storage.inspect.stats import find_sample, show_sample
    from storage.store import open_store

    store = open_store(item.path)
    sample = find_sample(store, args.sample)
    target = args.target or store.header["target"]["path"]
    if not Path(target, "tokenizer_config.json").is_file():
        raise InspectError(f"--target {target}: no tokenizer there (give the target model directory)")
    tokenizer, _ = load_target_processor(target)
    color = args.color or (not args.no_color and sys.stdout.isatty())
    return {}, show_sample(store, sample, tokenizer, color), 0


COMMANDS: dict[str, tuple[Callable[..., tuple[dict[str, Any], str, int]], bool, str]] = {
    # name: (function, applies to stage 1 too, help)
    "summary": (cmd_summary, True, "counts, shards, rejections, bytes per token and estimates"),
    "verify": (cmd_verify, True, "check files against manifest and checksums; exit 1 on problems"),
    "show": (cmd_show, False, "one sample: decoded text with loss tokens marked, shapes, L2 norms"),
    "stats": (cmd_stats, False, "length histograms and per-layer activation statistics"),
    "du": (cmd_du, True, "bytes per shard and per array (no directory walk)"),
    "diff": (cmd_diff, True, "are two stores (or stage 1 dirs) sample-for-sample identical?"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m storage.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p: dict[str, argparse.ArgumentParser] = {name: sub.add_parser(name, help=h, description=h)
                                             for name, (_, _, h) in COMMANDS.items()}
    for name, cmd in p.items():
        cmd.add_argument("path", type=Path, help="store or stage 1 directory" if COMMANDS[name][1] else "store")
        if name != "show":
            cmd.add_argument("--json", action="store_true", help="print the machine-readable result")
    p["summary"].add_argument("--dataset-tokens", type=int, help="estimate the store size for this many tokens")
    p["verify"].add_argument("--deep", action="store_true", help="also hash and decode every chunk, scan NaN/Inf")
    p["verify"].add_argument("--repair", action="store_true",
                             help="set bad shards aside (.bad-<name>-<time>/) and drop them from the manifest "
                                  "so that rerunning the stage redoes them; nothing is deleted")
    p["show"].add_argument("sample", help="sample id, or its index in the store")
    p["show"].add_argument("--target", help="target model directory for the tokenizer (default: the store's)")
    p["show"].add_argument("--no-color", action="store_true", help="mark loss tokens [[like this]]")
    p["show"].add_argument("--color", action="store_true", help="colour even when stdout is not a terminal")
    p["stats"].add_argument("--max-samples", type=int, default=256, help="samples read for activation statistics")
    p["stats"].add_argument("--seed", type=int, default=0, help="which samples, when not all are read")
    p["stats"].add_argument("--outlier-factor", type=float, default=6.0,
                            help="a channel is an outlier when its RMS exceeds this x the median channel RMS")
    p["stats"].add_argument("--plot", type=Path, help="write the plots to this PNG")
    p["diff"].add_argument("other", type=Path, help="the second store or stage 1 directory")
    p["diff"].add_argument("--max-listed", type=int, default=10, help="differences listed at most")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fn, stage1_ok, _ = COMMANDS[args.command]
    try:
        item = detect(args.path)
        if item.kind != STORE and not stage1_ok:
            raise InspectError(f"{args.command} needs a hidden-state store; {item.path} is a stage 1 output "
                               f"(for its records use python -m pipeline.tools.view)")
        result, text, status = fn(args, item)
    except InspectError as err:
        print(f"storage.inspect: error: {err}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:  # a damaged store the reader cannot open
        print(f"storage.inspect: error: {type(err).__name__}: {err}\n(`python -m storage.inspect verify "
              f"{args.path}` names the damaged shards; --repair re-queues them)", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str) if getattr(args, "json", False) else text)
    return status


if __name__ == "__main__":
    sys.exit(main())
