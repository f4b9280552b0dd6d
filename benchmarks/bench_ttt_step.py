"""One TTT forward+backward step: ``modeling.draft.ttt`` vs the public-trainer style reference.

Each (shape, implementation) runs in its own subprocess so peak RSS (``ru_maxrss``) does not
mix; the child caps its address space (``--mem-limit-gb``) so an oversized reference fails
with an allocation error instead of waking the OOM killer on a shared machine.

Rows are packed like audio SFT data: samples of ``--sample-len`` tokens whose last
``--loss-frac`` is the supervised response (ASR answers are ~10-25% of a sample; the rest
is audio frames and prompt). ``--loss-frac 1`` is the dense worst case for the fast path.

    python -m benchmarks.bench_ttt_step --shape both
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

SHAPES = {
    # H, heads, kv heads, head_dim, MLP, target hidden, target vocab, draft vocab, S, sample len
    "tiny": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                 intermediate_size=688, target_hidden_size=256, vocab_size=4096, draft_vocab_size=512,
                 seq=512, sample_len=128),
    # Qwen2-Audio-7B's LM: 32 heads of 128, MLP 11008, vocab 156032.
    "real": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                 intermediate_size=11008, target_hidden_size=4096, vocab_size=156032,
                 draft_vocab_size=32000, seq=2048, sample_len=512),
}


@dataclass
class Row:
    shape: str
    impl: str
    seq: int
    loss_frac: float
    status: str = "ok"
    step_s: float = 0.0
    tokens_per_s: float = 0.0
    peak_gib: float = 0.0
    setup_gib: float = 0.0
    loss: float = 0.0
    supervised: int = 0


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def child(args: argparse.Namespace) -> Row:
    """Build the shape, run ``args.repeats`` timed steps of one implementation."""
    limit = int(args.mem_limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    torch.set_num_threads(args.threads)
    from modeling.draft.config import DraftConfig
    from modeling.draft.model import Eagle3Draft
    from modeling.draft.ttt import ttt_loss
    from modeling.draft.ttt_reference import ttt_loss_reference
    from modeling.draft.vocab import build_draft_vocab, count_supervised_tokens

    spec = dict(SHAPES[args.shape])
    default_seq = spec.pop("seq")
    seq = args.seq or default_seq
    sample_len = min(spec.pop("sample_len"), seq)
    row = Row(args.shape, args.impl, seq, args.loss_frac)
    torch.manual_seed(0)
    cfg = DraftConfig(**spec, num_target_layers=32, rms_norm_eps=1e-5)
    draft = Eagle3Draft(cfg)
    with torch.no_grad():
        draft.embed_tokens.weight.normal_(std=0.02)
    ids = torch.randint(0, cfg.vocab_size, (1, seq))
    pos = (torch.arange(seq) % sample_len).unsqueeze(0)
    loss_mask = (pos >= round(sample_len * (1 - args.loss_frac))).long()
    head = torch.randn(cfg.vocab_size, cfg.target_hidden_size) * 0.02
    # Teacher mostly agrees with the data's next token, like a real target on its own outputs.
    target_hidden = torch.cat((ids[:, 1:], ids[:, :1]), 1)
    target_hidden = head[target_hidden] * 10.0 + 0.02 * torch.randn(1, seq, cfg.target_hidden_size)
    aux = torch.randn(1, seq, 3 * cfg.target_hidden_size)
    vocab = build_draft_vocab(count_supervised_tokens(ids, loss_mask, cfg.vocab_size) + 1, cfg.draft_vocab_size)
    draft.set_vocab_mapping(vocab.d2t, vocab.t2d)
    fn = ttt_loss if args.impl == "ours" else ttt_loss_reference
    kw = dict(input_ids=ids, loss_mask=loss_mask, aux_hidden=aux, target_hidden=target_hidden,
              target_lm_head=head, position_ids=pos, ttt_length=args.ttt_length)
    row.setup_gib = _rss_gib()
    times = []
    try:
        for _ in range(args.repeats):
            draft.zero_grad(set_to_none=True)
            start = time.perf_counter()
            res = fn(draft, **kw)
            res.loss.backward()
            times.append(time.perf_counter() - start)
    except (RuntimeError, MemoryError) as err:
        oom = isinstance(err, MemoryError) or "allocate" in str(err)
        row.status = (f"out of memory (cap {args.mem_limit_gb:.1f} GiB)" if oom
                      else f"failed: {str(err).splitlines()[0][:60]}")
    else:
        row.step_s = statistics.median(times)
        row.tokens_per_s = seq / row.step_s
        row.loss = float(res.loss)
        row.supervised = int(res.step_count[0])
    row.peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


def _mem_cap_gib(requested: float) -> float:
    """Cap below what is free *now*: other jobs share the box, and RLIMIT_AS above free
    memory lets the kernel OOM killer pick a process instead of failing our allocation."""
    with open("/proc/meminfo") as f:
        avail_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
    return min(requested, avail_kib / 2**20 - 1.0)


def spawn(args: argparse.Namespace, shape: str, impl: str, seq: int, loss_frac: float, repeats: int) -> Row:
    cap = _mem_cap_gib(args.mem_limit_gb)
    cmd = [sys.executable, "-m", "benchmarks.bench_ttt_step", "--child", "--shape", shape, "--impl", impl,
           "--seq", str(seq), "--loss-frac", str(loss_frac), "--repeats", str(repeats),
           "--ttt-length", str(args.ttt_length), "--mem-limit-gb", f"{cap:.2f}", "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        why = "killed (out of memory)" if out.returncode == -9 else f"crashed rc={out.returncode}"
        return Row(shape, impl, seq, loss_frac, status=f"{why}, cap {cap:.1f} GiB")
    row = Row(**json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"  {row}", file=sys.stderr, flush=True)
    return row


def table(rows: list[Row]) -> str:
    lines = ["| shape | S | supervised | impl | step (s) | tokens/s | peak RSS (GiB) | setup RSS (GiB) | loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {r.shape} | {r.seq} | {r.loss_frac:.0%} | {r.impl} | {r.status} | - | "
                         f"{r.peak_gib:.2f} | {r.setup_gib:.2f} | - |")
            continue
        lines.append(f"| {r.shape} | {r.seq} | {r.loss_frac:.0%} ({r.supervised}) | {r.impl} | {r.step_s:.3f} | "
                     f"{r.tokens_per_s:,.0f} | {r.peak_gib:.2f} | {r.setup_gib:.2f} | {r.loss:.5f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["tiny", "real", "both"], default="both")
    p.add_argument("--loss-frac", type=float, default=0.25, help="supervised fraction of each sample")
    p.add_argument("--ttt-length", type=int, default=7)
    p.add_argument("--repeats", type=int, default=0, help="timed steps (default: 5 tiny, 1 real)")
    p.add_argument("--mem-limit-gb", type=float, default=21.0, help="address-space cap per child")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per child; 1 because 2 threads on a shared 2-core box spin-wait")
    p.add_argument("--dense", action="store_true", help="also run --loss-frac 1.0")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=["ours", "ref"], default="ours", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=0, help="override S (0: the shape's)")
    p.add_argument("--min-seq", type=int, default=512, help="smallest S to retry a reference that does not fit")
    args = p.parse_args()
    if args.child:
        print(json.dumps(asdict(child(args))))
        return
    rows: list[Row] = []
    fracs = [args.loss_frac] + ([1.0] if args.dense else [])
    for shape in (["tiny", "real"] if args.shape == "both" else [args.shape]):
        seq = args.seq or SHAPES[shape]["seq"]
        repeats = args.repeats or (5 if shape == "tiny" else 1)
        for frac in fracs:
            rows.append(spawn(args, shape, "ours", seq, frac, repeats))
            ref, ref_seq = spawn(args, shape, "ref", seq, frac, repeats), seq
            rows.append(ref)
            while ref.status != "ok" and ref_seq > args.min_seq:  # reference too big: halve S
                ref_seq //= 2
                ref = spawn(args, shape, "ref", ref_seq, frac, repeats)
                rows.append(ref)
            if ref_seq != seq and ref.status == "ok":  # ours at the size the reference fits
                rows.append(spawn(args, shape, "ours", ref_seq, frac, repeats))
    print(f"load average {os.getloadavg()[0]:.1f}, {args.threads} torch thread(s), fp32, ttt_length {args.ttt_length}")
    print(table(rows))


if __name__ == "__main__":
    main()
