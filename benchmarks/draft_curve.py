"""What a held-out mean acceptance length of 3.0 would take on the listening SmolLM2 target, read from the
committed curve points (``benchmarks/results/smol_draft_listening_*.json``): vLLM's acceptance at k=4 on the
20 held-out spoken prompts against the draft's training steps and the distinct stage-1 prompts.

    python -m benchmarks.draft_curve [--goal 3.0] [--out benchmarks/results/smol_draft_curve_fit.json]

Two readings, both printed:
- the 2x2 (1,828 and 3,668 prompts, 1,200 and 2,400 steps): what one doubling of each axis gave at each
  level of the other, and what doubling both together gave;
- a least-squares plane ``acceptance = a + b log2(steps) + c log2(prompts)`` over every one-answer-per-prompt
  point, with its residuals, and the number of joint doublings it needs from the largest point to the goal.
  It is a straight line in log2 through a small range: acceptance is bounded (k + 1 = 5), so the curve must
  bend somewhere, and five points 0.3 apart cannot say where. Read the count as an order of magnitude.

The cost of those doublings is priced with this machine's measured rates, read from the same files: seconds a
draft step (stage 3's wall time over its steps: the step cost depends on the packed row, not on the data
size), seconds and bytes a stage-1 prompt (stages 1 and 2 of the 1,828-prompt store).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.core.durable import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"

# (results file, distinct stage-1 prompts, answers a prompt, draft steps). The store behind the 1,828-prompt
# points is also the one whose stage-1/2 rates price the data (PRICE_FILE).
POINTS: tuple[tuple[str, int, int, int], ...] = (
    ("smol_draft_listening_1828_600.json", 1828, 1, 600),
    ("smol_draft_listening_1828_1200.json", 1828, 1, 1200),
    ("smol_draft_listening_1828_2400.json", 1828, 1, 2400),
    ("smol_draft_listening_more_prompts_1200.json", 3668, 1, 1200),
    ("smol_draft_listening_more_prompts_2400.json", 3668, 1, 2400),
    ("smol_draft_listening_1828_sampled_1200.json", 1828, 3, 1200),
)
PRICE_FILE = "smol_draft_listening_1828_600.json"
PROMPT_LEVELS, STEP_LEVELS = (1828, 3668), (1200, 2400)  # the 2x2's axes; its larger corner is the curve's end


@dataclass(frozen=True)
class CurvePoint:
    file: str
    prompts: int
    answers_per_prompt: int
    steps: int
    acceptance: float
    held_out_estimate: float
    speedup: float
    speedup_range: tuple[float, float]
    train_s_per_step: float | None


def acceptance_of(result: dict) -> float:
    """vLLM's mean acceptance length: older results keep the benchmark's whole acceptance record."""
    acc = result["acceptance"]
    return float(acc["mean_acceptance_length"] if isinstance(acc, dict) else acc)


# Where each result keeps training's decode-walk estimate (k=4) on the 1,828-prompt store's held-out rows (~170
# answers, against vLLM's 20 prompts: the steadier reading of the 2x2), newest spelling first.
ESTIMATE_KEYS = (("estimate_walk4_greedy_store_held_out", "step{}"), ("training_estimate_walk4_by_step", "{}"),
                 ("training_estimate_walk4", "step{}"))


def held_out_estimate(result: dict, steps: int) -> float:
    for key, step_key in ESTIMATE_KEYS:
        if key in result:
            return float(result[key][step_key.format(steps)])
    raise KeyError(f"no held-out estimate (one of {[k for k, _ in ESTIMATE_KEYS]})")


def load_points(results_dir: Path = RESULTS) -> list[CurvePoint]:
    points = []
    for name, prompts, answers, steps in POINTS:
        path = results_dir / name
        try:
            result = json.loads(path.read_text())
            train_s = result.get("stage_wall_s", {}).get("train")
            points.append(CurvePoint(name, prompts, answers, steps, acceptance_of(result),
                                     held_out_estimate(result, steps), float(result["speedup"]),
                                     tuple(result["speedup_range"]), train_s / steps if train_s else None))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise SystemExit(f"{path}: not a curve result ({type(err).__name__}: {err})") from err
    return points


def fit_plane(steps: np.ndarray, prompts: np.ndarray, acceptance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (a, b, c) of ``acceptance = a + b log2(steps) + c log2(prompts)``, and the residuals."""
    design = np.stack([np.ones_like(steps, dtype=float), np.log2(steps), np.log2(prompts)], axis=1)
    coef, *_ = np.linalg.lstsq(design, acceptance, rcond=None)
    return coef, acceptance - design @ coef


def joint_doublings(start: float, goal: float, gain_per_joint_doubling: float) -> float:
    """Doublings of steps and prompts together to go from ``start`` to ``goal`` at a constant gain each."""
    if goal <= start:
        return 0.0
    # below 1e-6 a doubling (a flat curve's least-squares slope is ~1e-17, not 0) nothing is gained
    return math.inf if gain_per_joint_doubling < 1e-6 else (goal - start) / gain_per_joint_doubling


def data_rates(results_dir: Path = RESULTS) -> tuple[float, float]:
    """(seconds of stages 1-2, store bytes) a stage-1 prompt, from PRICE_FILE's store."""
    path = results_dir / PRICE_FILE
    try:
        priced = json.loads(path.read_text())
        records = priced["store"]["records"]
        wall = priced["stage_wall_s"]
        return (wall["regenerate"] + wall["dump"]) / records, priced["store"]["bytes_on_disk"] / records
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ZeroDivisionError) as err:
        raise SystemExit(f"{path}: no stage-1/2 rates ({type(err).__name__}: {err})") from err


def price(largest: CurvePoint, s_per_step: float, rates: tuple[float, float], doublings: float) -> dict:
    """Steps, prompts, hours and bytes of ``largest`` scaled by ``2**doublings`` on both axes."""
    stage12_s_per_prompt, bytes_per_prompt = rates
    scale = 2.0 ** doublings
    steps, prompts = largest.steps * scale, largest.prompts * scale
    return {"from": asdict(largest), "scale": scale, "steps": steps, "prompts": prompts,
            "train_s_per_step_here": s_per_step, "stage12_s_per_prompt_here": stage12_s_per_prompt,
            "train_hours_here": steps * s_per_step / 3600, "stage12_hours_here": prompts * stage12_s_per_prompt / 3600,
            "store_gib": prompts * bytes_per_prompt / 2**30}


def two_by_two(grid: dict[tuple[int, int], float]) -> dict[str, float]:
    """What doubling each axis gave at each level of the other, and both together: grid[(prompts, steps)]."""
    (lo_p, hi_p), (lo_s, hi_s) = PROMPT_LEVELS, STEP_LEVELS
    return {
        "steps_x2_at_1828_prompts": grid[lo_p, hi_s] - grid[lo_p, lo_s],
        "steps_x2_at_3668_prompts": grid[hi_p, hi_s] - grid[hi_p, lo_s],
        "prompts_x2_at_1200_steps": grid[hi_p, lo_s] - grid[lo_p, lo_s],
        "prompts_x2_at_2400_steps": grid[hi_p, hi_s] - grid[lo_p, hi_s],
        "both_x2": grid[hi_p, hi_s] - grid[lo_p, lo_s],
    }


def analyse(points: list[CurvePoint], goal: float, results_dir: Path = RESULTS) -> dict:
    one = [p for p in points if p.answers_per_prompt == 1]
    grid = {(p.prompts, p.steps): p.acceptance for p in one}
    largest = next(p for p in one if (p.prompts, p.steps) == (PROMPT_LEVELS[1], STEP_LEVELS[1]))
    coef, residuals = fit_plane(np.array([p.steps for p in one], float), np.array([p.prompts for p in one], float),
                                np.array([p.acceptance for p in one]))
    start = largest.acceptance
    by_plane = joint_doublings(start, goal, coef[1] + coef[2])
    in_vllm = two_by_two(grid)
    by_diagonal = joint_doublings(start, goal, in_vllm["both_x2"])
    out = {"goal": goal, "points": [asdict(p) for p in points], "two_by_two": in_vllm,
           "two_by_two_held_out_estimate": two_by_two({(p.prompts, p.steps): p.held_out_estimate for p in one}),
           "plane": {"a": coef[0], "b_per_step_doubling": coef[1], "c_per_prompt_doubling": coef[2],
                     "residuals": dict(zip((p.file for p in one), residuals.tolist(), strict=True)),
                     "joint_doublings_to_goal": by_plane},
           "diagonal_joint_doublings_to_goal": by_diagonal}
    s_per_step = float(np.median([p.train_s_per_step for p in points if p.train_s_per_step]))
    rates = data_rates(results_dir)
    for key, doublings in (("cost_by_plane", by_plane), ("cost_by_diagonal", by_diagonal)):
        out[key] = price(largest, s_per_step, rates, doublings) if math.isfinite(doublings) else None
    return out


def report(out: dict) -> str:
    lines = ["| prompts | answers/prompt | steps | held-out estimate | vLLM acceptance (k=4) | speedup [range] |",
             "|---|---|---|---|---|---|"]
    for p in out["points"]:
        lo, hi = p["speedup_range"]
        lines.append(f"| {p['prompts']:,} | {p['answers_per_prompt']} | {p['steps']:,} | {p['held_out_estimate']:.2f} "
                     f"| {p['acceptance']:.2f} "
                     f"| {p['speedup']:.2f}x [{lo:.2f}-{hi:.2f}] |")
    lines.append("")
    for label, key in (("2x2 in vLLM (20 prompts)", "two_by_two"),
                       ("2x2 in the held-out estimate (~170 answers)", "two_by_two_held_out_estimate")):
        t = out[key]
        lines.append("{}: steps x2 gave {:+.2f} at 1,828 prompts, {:+.2f} at 3,668; prompts x2 gave {:+.2f} at "
                     "1,200 steps, {:+.2f} at 2,400; both x2 {:+.2f}".format(
                         label, t["steps_x2_at_1828_prompts"], t["steps_x2_at_3668_prompts"],
                         t["prompts_x2_at_1200_steps"], t["prompts_x2_at_2400_steps"], t["both_x2"]))
    pl = out["plane"]
    lines.append(f"plane: {pl['a']:.3f} + {pl['b_per_step_doubling']:.3f} log2(steps) + "
                 f"{pl['c_per_prompt_doubling']:.3f} log2(prompts); residuals "
                 + ", ".join(f"{r:+.3f}" for r in pl["residuals"].values()))
    for label, key, n in (("plane", "cost_by_plane", pl["joint_doublings_to_goal"]),
                          ("2x2 diagonal", "cost_by_diagonal", out["diagonal_joint_doublings_to_goal"])):
        c = out[key]
        if c is None:
            lines.append(f"{label}: no gain per joint doubling: {out['goal']} is not reached by scaling")
            continue
        lines.append(f"{label}: {n:.1f} joint doublings to {out['goal']} (if the log2 line held) = "
                     f"{c['steps']:,.0f} steps and {c['prompts']:,.0f} prompts; on this machine "
                     f"{c['train_hours_here']:,.0f} h of stage 3 ({c['train_s_per_step_here']:.2f} s a step) and "
                     f"{c['stage12_hours_here']:,.0f} h of stages 1-2 ({c['stage12_s_per_prompt_here']:.2f} s a "
                     f"prompt), a {c['store_gib']:,.0f} GiB store")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--goal", type=float, default=3.0, help="held-out mean acceptance length to price")
    parser.add_argument("--out", type=Path, help="also write the analysis as JSON here")
    args = parser.parse_args(argv)
    out = analyse(load_points(), args.goal)
    print(report(out))
    if args.out:
        atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
