"""The memory model of docs/memory.md against measurements, and its table at the real shapes.

    python -m benchmarks.bench_memory [--store work/demo/store --target work/smol-audio-target]
        [--batch-tokens 256,512,1024] [--steps 3] [--skip-train]

1. Store: writes raw (``--store-codec none``) stores of synthetic samples at three widths and
   compares the predicted hidden-state bytes (:mod:`storage.footprint`) with the chunk files on
   disk: they must be equal, byte for byte.
2. Training: runs ``stages.train`` (one process, ZeRO-2, fp32, ``--steps`` steps, no evaluation)
   on ``--store`` at each ``--batch-tokens`` and compares the peak RSS it records in
   ``FINISHED`` with the model (:mod:`modeling.training.memory`) plus the runtime: the peak RSS
   of a process that imported what a rank imports and opened the store, measured here.
3. Prints the model at the real Qwen2-Audio-7B shape and at the shapes this machine runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from modeling.draft.config import DraftConfig
from modeling.training.flops import draft_parameter_count
from modeling.training.memory import training_memory
from pipeline.core.manifest import Manifest
from storage.footprint import HIDDEN_ARRAYS, bytes_per_token, hidden_row_bytes, raw_hidden_bytes
from storage.layout import SHARDS_DIR
from storage.sample import CapturedSample
from storage.store import create_store, make_header
from storage.writer import ShardWriter, commit_shard

GIB = 2**30
# Qwen2-Audio-7B-Instruct's text shape (tests/targets/test_real_checkpoints.py, reconstructed config)
QWEN2_AUDIO_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                  "num_key_value_heads": 32, "head_dim": 128, "vocab_size": 156032}
SMOLLM2_AUDIO = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
                 "head_dim": 64, "vocab_size": 49152}
TINY_TARGET = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 16, "vocab_size": 151667}
ROWS = {"aux_hidden": "num_tokens", "last_hidden": "num_last", "audio_embeds": "num_audio"}
RUNTIME_PROBE = """
import resource, sys, deepspeed, torch
from modeling.training import trainer
from storage.store import open_store
store = open_store(sys.argv[1])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def draft_of(shape: dict, draft_vocab: int) -> DraftConfig:
    return DraftConfig(**{k: v for k, v in shape.items()}, draft_vocab_size=draft_vocab,
                       target_hidden_size=shape["hidden_size"])


def synthetic_store(root: Path, hidden: int, lengths: list[int]) -> None:
    """A raw store of random samples (half of each sample carries loss, a third is audio)."""
    header = make_header(target_path="synthetic", target_config_hash="0" * 64, hidden_size=hidden,
                         layer_ids=[1, 2, 3], layer_convention="decoder_layer",
                         layer_ids_by_convention={"decoder_layer": [1, 2, 3]}, codec="none")
    manifest = create_store(root, header)
    from pipeline.core.shards import plan_shards

    g = torch.Generator().manual_seed(hidden)
    for shard in plan_shards(len(lengths), 2):
        with ShardWriter(root, shard) as writer:
            for i in range(shard.start, shard.stop):
                n = lengths[i]
                loss = (torch.arange(n) >= n // 2).to(torch.uint8)
                pos = loss[1:].nonzero().flatten()
                spans = [(1, 1 + n // 3)]
                writer.write(CapturedSample(
                    id=f"s{i}", source_hash=f"h{i}", input_ids=torch.randint(0, 1000, (n,), generator=g),
                    loss_mask=loss, aux_hidden=torch.randn(n, 3, hidden, generator=g).to(torch.bfloat16),
                    last_hidden=torch.randn(len(pos), hidden, generator=g).to(torch.bfloat16),
                    last_hidden_positions=pos, audio_spans=spans,
                    audio_embeds=torch.randn(n // 3, hidden, generator=g).to(torch.bfloat16)))
            commit_shard(manifest, shard, writer.finish())


def store_check(hidden: int) -> tuple[int, int]:
    """(predicted, on-disk) hidden-state bytes of a raw synthetic store of width ``hidden``."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic_store(root, hidden, [300, 41, 777, 128, 1024, 5, 512, 260])
        manifest = Manifest(root).load()
        chunk_rows = {a["name"]: a["chunk_rows"] for a in manifest["arrays"]}
        rows = hidden_row_bytes(hidden)
        predicted = on_disk = 0
        for entry in manifest["shards"].values():
            for array in HIDDEN_ARRAYS:
                predicted += raw_hidden_bytes(int(entry[ROWS[array]]), chunk_rows[array], rows[array])
                on_disk += sum(p.stat().st_size for p in (root / SHARDS_DIR / entry["name"] / "arrays" / array).glob("c.*"))
        return predicted, on_disk


def runtime_bytes(store: str) -> int:
    out = subprocess.run([sys.executable, "-c", RUNTIME_PROBE, store], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def measured_training_peak(store: str, target: str, batch_tokens: int, steps: int, draft_vocab: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "stages.train", "--store", store, "--target", target, "--output", tmp + "/run",
               "--zero-stage", "2", "--precision", "fp32", "--batch-tokens", str(batch_tokens), "--max-steps",
               str(steps), "--epochs", "1000", "--save-every", str(steps), "--log-every", "1",
               "--eval-fraction", "0", "--no-fit-eval", "--num-workers", "0", "--draft-vocab-size", str(draft_vocab)]
        subprocess.run(cmd, check=True, capture_output=True)
        return json.loads((Path(tmp) / "run" / "FINISHED").read_text())["resources"]


def model_table() -> list[str]:
    lines = [f"{'shape (draft vocab)':24}{'params':>10}{'store B/tok':>13}{'S':>6}{'ZeRO':>5}{'N':>3}{'states':>9}"
             f"{'activ.':>9}{'frozen':>9}{'total GiB':>11}"]
    for name, shape, bf16, vocab in (("Qwen2-Audio-7B bf16 (32k)", QWEN2_AUDIO_7B, True, 32000),
                                     ("SmolLM2-audio fp32 (4k)", SMOLLM2_AUDIO, False, 4096),
                                     ("tiny target fp32 (256)", TINY_TARGET, False, 256)):
        draft = draft_of(shape, vocab)
        per_token = bytes_per_token(shape["hidden_size"], loss_fraction=0.25)
        for row, zero, world in ((2048, 2, 8), (8192, 2, 8), (8192, 3, 8)):
            m = training_memory(draft, vocab_size=shape["vocab_size"], row_tokens=row, ttt_length=7, zero_stage=zero,
                                world=world, bf16=bf16, table_bytes=2 if bf16 else 4, quadratic=not bf16)
            lines.append(f"{name:24}{draft_parameter_count(draft) / 1e6:>9.1f}M{per_token:>13,.0f}{row:>6}{zero:>5}"
                         f"{world:>3}{m['states'] / GIB:>9.2f}{m['activations'] / GIB:>9.2f}{m['frozen'] / GIB:>9.2f}"
                         f"{m['total'] / GIB:>11.2f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="work/demo/store", help="a store of the --target (the demo's)")
    parser.add_argument("--target", default="work/smol-audio-target")
    parser.add_argument("--batch-tokens", default="256,512,1024", help="comma-separated row lengths to train at")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--draft-vocab-size", type=int, default=4096)
    parser.add_argument("--skip-train", action="store_true", help="only the store check and the table")
    args = parser.parse_args(argv)

    print("== store: predicted vs on-disk hidden-state bytes of raw stores ==")
    for hidden in (64, 576, 1024):
        predicted, on_disk = store_check(hidden)
        print(f"H={hidden:5d}  predicted {predicted:>12,d}  on disk {on_disk:>12,d}  {'equal' if predicted == on_disk else 'DIFFER'}")

    if not args.skip_train:
        from modeling.targets import target_text_config

        text = target_text_config(args.target)
        shape = {k: int(text[k]) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                           "num_key_value_heads", "head_dim", "vocab_size")}
        draft = draft_of(shape, args.draft_vocab_size)
        runtime = runtime_bytes(args.store)
        print(f"\n== training peak RSS, 1 process, ZeRO-2, fp32 ({args.target}; runtime {runtime / GIB:.2f} GiB) ==")
        print(f"{'S':>6}{'model GiB':>11}{'+runtime':>10}{'measured':>10}{'measured/predicted':>20}")
        for row in (int(x) for x in args.batch_tokens.split(",")):
            m = training_memory(draft, vocab_size=shape["vocab_size"], row_tokens=row, ttt_length=7, zero_stage=2,
                                world=1, bf16=False, table_bytes=4)
            res = measured_training_peak(args.store, args.target, row, args.steps, args.draft_vocab_size)
            predicted = m["total"] + runtime
            print(f"{row:>6}{m['total'] / GIB:>11.3f}{predicted / GIB:>10.3f}{res['peak_rss_bytes'] / GIB:>10.3f}"
                  f"{res['peak_rss_bytes'] / predicted:>20.2f}")

    print("\n== the model at the real shapes (ttt 7; per process; bf16 on GPU with a flash kernel, fp32 on CPU "
          "with materialised attention; store at 25% loss tokens, no audio) ==")
    print("\n".join(model_table()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
