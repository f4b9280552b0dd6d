"""Print one tokenized sample: loss tokens coloured, audio spans marked.

    python -m pipeline.tools.view --target DIR --input X.jsonl --index N [--no-color]

Green text carries loss (loss_mask 1); ``[AUDIO x N]`` stands for an audio span of N tokens.
Use it to check that the loss falls on exactly the assistant answers before dumping terabytes.
"""

from __future__ import annotations

import argparse
import sys

from modeling.targets import chat_tokenizer_for
from pipeline.data.audio import AudioLimits
from pipeline.data.records import RecordError, read_conversations
from pipeline.data.samples import prepare_sample
from pipeline.data.template import format_sample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.view", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="target model directory (tokenizer, processor)")
    parser.add_argument("--input", required=True, help="conversation jsonl (input or stage 1 output)")
    parser.add_argument("--index", type=int, default=0, help="record index in the file (0-based)")
    parser.add_argument("--no-color", action="store_true", help="mark loss tokens with [[...]] instead of colour")
    args = parser.parse_args(argv)

    result = read_conversations(args.input, check_audio=False)
    by_index = {r.index: r for r in result.records}
    bad = {r.index: r for r in result.rejected}
    if args.index in bad:
        print(f"record {args.index} is rejected: {bad[args.index].message()}", file=sys.stderr)
        return 1
    if args.index not in by_index:
        print(f"no record {args.index} in {args.input} ({result.total} records)", file=sys.stderr)
        return 1
    chat = chat_tokenizer_for(args.target)
    tokenizer = chat.tokenizer
    try:
        sample = prepare_sample(by_index[args.index], chat, limits=AudioLimits(max_seconds=chat.family.max_audio_seconds))
    except RecordError as err:
        print(f"record {args.index}: {err}", file=sys.stderr)
        return 1
    enc = sample.encoded
    color = not args.no_color and sys.stdout.isatty()
    print(f"id={sample.record.id} tokens={len(enc.input_ids)} loss_tokens={int(enc.loss_mask.sum())} "
          f"audio_spans={enc.audio_spans}")
    print(format_sample(tokenizer, enc, color=color))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
