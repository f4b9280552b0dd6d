"""The curve analysis behind docs/smol-audio-target.md's "What 3.0 would take": fit, 2x2 and prices."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks import draft_curve


def write_points(tmp_path, acceptance_of):
    """Results files for every curve point, acceptance from ``acceptance_of(prompts, steps)``; the first one in
    the older format (the benchmark's whole acceptance record)."""
    for i, (name, prompts, answers, steps) in enumerate(draft_curve.POINTS):
        acc = acceptance_of(prompts, steps) + (0.5 if answers > 1 else 0.0)
        result = {"acceptance": {"mean_acceptance_length": acc} if i == 0 else acc, "speedup": 1.0 + acc / 10,
                  "speedup_range": [1.0, 2.0], "stage_wall_s": {"train": 3.0 * steps},
                  # the three spellings results use for training's held-out estimate
                  ("training_estimate_walk4" if i % 3 == 0 else "training_estimate_walk4_by_step" if i % 3 == 1
                   else "estimate_walk4_greedy_store_held_out"): {(str(steps) if i % 3 == 1 else f"step{steps}"): acc + 0.1}}
        if name == draft_curve.PRICE_FILE:
            result["stage_wall_s"].update(regenerate=100.0, dump=300.0)
            result["store"] = {"records": 200, "bytes_on_disk": 200 * 2**20}
        (tmp_path / name).write_text(json.dumps(result))


def test_plane_recovers_an_exact_log_linear_curve_and_prices_the_goal(tmp_path):
    write_points(tmp_path, lambda prompts, steps: 0.5 + 0.1 * math.log2(steps) + 0.05 * math.log2(prompts))
    points = draft_curve.load_points(tmp_path)
    assert [p.acceptance for p in points][:2] == pytest.approx(
        [0.5 + 0.1 * math.log2(s) + 0.05 * math.log2(n) for _, n, _, s in draft_curve.POINTS[:2]])
    out = draft_curve.analyse(points, goal=3.0, results_dir=tmp_path)
    plane = out["plane"]
    assert (plane["a"], plane["b_per_step_doubling"], plane["c_per_prompt_doubling"]) == pytest.approx((0.5, 0.1, 0.05))
    assert max(abs(r) for r in plane["residuals"].values()) < 1e-9  # the sampled point (+0.5) is not fitted
    assert [p.held_out_estimate for p in points] == pytest.approx([p.acceptance + 0.1 for p in points])
    assert out["two_by_two_held_out_estimate"] == pytest.approx(out["two_by_two"])
    two = out["two_by_two"]
    assert two["steps_x2_at_1828_prompts"] == pytest.approx(0.1) and two["steps_x2_at_3668_prompts"] == pytest.approx(0.1)
    assert two["prompts_x2_at_2400_steps"] == pytest.approx(0.05 * math.log2(3668 / 1828))
    start = 0.5 + 0.1 * math.log2(2400) + 0.05 * math.log2(3668)
    assert plane["joint_doublings_to_goal"] == pytest.approx((3.0 - start) / 0.15)
    cost = out["cost_by_plane"]
    scale = 2 ** plane["joint_doublings_to_goal"]
    assert cost["steps"] == pytest.approx(2400 * scale) and cost["prompts"] == pytest.approx(3668 * scale)
    assert cost["train_hours_here"] == pytest.approx(2400 * scale * 3.0 / 3600)
    assert cost["stage12_hours_here"] == pytest.approx(3668 * scale * 2.0 / 3600)
    assert cost["store_gib"] == pytest.approx(3668 * scale / 1024)
    assert "joint doublings to 3.0" in draft_curve.report(out)


def test_a_curve_that_does_not_rise_says_the_goal_is_not_reached_by_scaling(tmp_path):
    write_points(tmp_path, lambda prompts, steps: 2.0)
    out = draft_curve.analyse(draft_curve.load_points(tmp_path), goal=3.0, results_dir=tmp_path)
    assert out["plane"]["joint_doublings_to_goal"] == math.inf and out["cost_by_plane"] is None
    assert "not reached by scaling" in draft_curve.report(out)
    assert draft_curve.joint_doublings(3.1, 3.0, 0.1) == 0.0


def test_a_missing_or_malformed_result_names_the_file(tmp_path):
    write_points(tmp_path, lambda prompts, steps: 2.0)
    name = draft_curve.POINTS[2][0]
    (tmp_path / name).write_text("{not json")
    with pytest.raises(SystemExit, match=name):
        draft_curve.load_points(tmp_path)


def test_fit_plane_residuals_are_what_the_plane_leaves():
    steps, prompts = np.array([600.0, 1200, 2400, 1200]), np.array([1828.0, 1828, 1828, 3668])
    acc = np.array([1.8, 2.0, 2.1, 2.05])
    coef, residuals = draft_curve.fit_plane(steps, prompts, acc)
    design = np.stack([np.ones(4), np.log2(steps), np.log2(prompts)], axis=1)
    assert residuals == pytest.approx(acc - design @ coef)
    assert residuals.sum() == pytest.approx(0.0, abs=1e-9)  # least squares with an intercept


def test_a_price_file_without_its_store_names_the_file(tmp_path):
    write_points(tmp_path, lambda prompts, steps: 0.5 + 0.1 * math.log2(steps))
    path = tmp_path / draft_curve.PRICE_FILE
    result = json.loads(path.read_text())
    del result["store"]
    path.write_text(json.dumps(result))
    with pytest.raises(SystemExit, match=draft_curve.PRICE_FILE):
        draft_curve.analyse(draft_curve.load_points(tmp_path), goal=3.0, results_dir=tmp_path)
