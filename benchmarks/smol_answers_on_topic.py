"""How often the SmolLM2 audio target's stage-1 answers name the spoken prompt's topic (a rough check that
it heard the question; ``modeling.smol_audio.prompts.names_topic``), and the most common openings.

    python -m benchmarks.smol_answers_on_topic STAGE1_DIR [STAGE1_DIR ...]

Reads the committed ``shard-*.jsonl`` of each stage-1 directory; a line that is not a stage-1 record of
a smol-audio prompt (no ``prompt`` or assistant text) is counted and named, never skipped silently.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from modeling.smol_audio.prompts import names_topic


def on_topic(stage1_dir: Path) -> dict:
    named, total, openings, bad = 0, 0, Counter(), []
    for shard in sorted(stage1_dir.glob("shard-*.jsonl")):
        for n, line in enumerate(shard.read_text().splitlines(), 1):
            try:
                row = json.loads(line)
                answer = row["conversations"][-1]["content"][0]["text"]
                prompt = row["prompt"]
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
                bad.append(f"{shard}:{n}: not a smol-audio stage-1 record ({type(err).__name__}: {err})")
                continue
            total += 1
            named += names_topic(prompt, answer)
            openings[" ".join(answer.split()[:4])] += 1
    return {"dir": str(stage1_dir), "records": total, "names_topic": named / max(total, 1),
            "openings_top5": openings.most_common(5), "rejected": bad}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage1_dirs", nargs="+", type=Path, help="stage-1 output directories")
    args = parser.parse_args(argv)
    for d in args.stage1_dirs:
        r = on_topic(d)
        print(f"{r['dir']}: {r['records']} records, {r['names_topic']:.1%} name the topic; most common openings: "
              + ", ".join(f"{o!r} x{c}" for o, c in r["openings_top5"]))
        for line in r["rejected"]:
            print(f"  rejected {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
