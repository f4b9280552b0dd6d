"""Training's ``resources`` record: peak memory of every rank, trained tokens/s and MFU.

Every rank measures itself (:class:`pipeline.core.resources.ResourceMeter`); rank 0 gathers the
ranks' numbers and writes one record into ``RUN_DIR/FINISHED``. Tokens count the packed rows'
real tokens this run trained on (a resumed run counts its own), time counts training steps only
(evaluation and checkpoints excluded, as in the log line's tokens/s). MFU = trained tokens/s x
:func:`modeling.training.flops.draft_train_flops_per_token` / the devices' peak
(:mod:`pipeline.core.device_peak`).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from modeling.draft.config import DraftConfig
from modeling.training.flops import draft_train_flops_per_token
from pipeline.core.device_peak import peak_flops
from pipeline.core.resources import ResourceMeter, combine


def training_resources(meter: ResourceMeter, tokens: int, seconds: float, draft: DraftConfig, *, ttt_length: int,
                       row_tokens: int, device_type: str, precision: str, peak_tflops: float) -> dict[str, Any]:
    """The job's record (every rank must call it: it gathers); ``tokens`` and ``seconds`` are this rank's."""
    mine = meter.result(tokens, wall_s=seconds)
    ranks: list[Any] = [mine]
    if dist.is_available() and dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    out = combine(ranks)
    # ranks train side by side: the job's time is the slowest rank's, its tokens all ranks'
    out["wall_s"] = max(r["wall_s"] for r in ranks)
    out["tokens_per_s"] = round(out["tokens"] / out["wall_s"], 3) if out["wall_s"] > 0 else None
    flops = draft_train_flops_per_token(draft, ttt_length, row_tokens)
    peak = peak_flops(device_type, precision, len(ranks), peak_tflops)
    achieved = flops * (out["tokens_per_s"] or 0.0)
    out.update(ranks=len(ranks), train_flops_per_token=flops, achieved_flops=achieved, peak_flops=peak["peak_flops"],
               peak_source=peak["source"], mfu=achieved / peak["peak_flops"] if peak["peak_flops"] else None)
    return out
