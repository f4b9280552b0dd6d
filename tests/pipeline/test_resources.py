"""The resource meter reads real peaks: of this process, of a live child (sampled) and of a reaped one."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline.core.resources import ResourceMeter, combine, peak_rss_bytes

MIB = 2**20
HOLD_S = 1.0  # several sampling periods


def test_peak_of_this_process_covers_an_array_it_touched():
    size = 192 * MIB
    with ResourceMeter() as meter:
        block = np.ones(size, dtype=np.uint8)  # every page written: resident
        time.sleep(HOLD_S)
        held = int(block.sum())
        del block
    res = meter.result(tokens=10)
    assert held == size
    assert res["peak_rss_bytes"] >= size and res["peak_tree_rss_bytes"] >= size
    assert res["peak_rss_bytes"] <= peak_rss_bytes()  # the kernel's lifetime peak: it never falls
    assert res["tokens"] == 10 and res["tokens_per_s"] == pytest.approx(10 / res["wall_s"], rel=1e-3)
    assert res["wall_s"] >= HOLD_S


def test_a_child_counts_in_the_tree_while_alive_and_in_children_once_reaped():
    size = 160 * MIB
    code = f"import numpy as np, time; b = np.ones({size}, dtype=np.uint8); time.sleep({HOLD_S}); print(int(b.sum()))"
    with ResourceMeter() as meter:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = meter.result()
    assert int(out.stdout) == size
    assert res["peak_tree_rss_bytes"] >= size and res["peak_rss_children_bytes"] >= size


def test_combine_adds_time_and_tokens_and_keeps_the_largest_peak():
    parts = [{"wall_s": 2.0, "tokens": 10, "peak_rss_bytes": 5}, {"wall_s": 3.0, "tokens": 40, "peak_rss_bytes": 9}]
    assert combine(parts) == {"wall_s": 5.0, "tokens": 50, "tokens_per_s": 10.0, "peak_rss_bytes": 9}
