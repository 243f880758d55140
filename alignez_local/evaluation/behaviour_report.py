"""The behaviour table as numbers and as text: the one report of "did the behaviour appear, and
what did it cost", written the same way by ``steer`` (its calibration's report half) and by
``alignez eval --behaviour`` (any files, on the evaluation prompts): each condition's behaviour
rate with its 95% interval, relevance, fluency, combined score and the share of answers that loop;
where a judge read relevance, also the share of answers it reads as relevant (its yes/no)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from alignez_local.align.strength_by_behaviour import BehaviourCalibration

HEADER = f"{'behaviour':>16} {'relevance':>10} {'fluency':>8} {'combined':>9} {'loops':>6}"


def condition_lines(rows: Mapping[str, Mapping[str, Any]], width: int) -> list[str]:
    """Return the column header and one line per condition (``ScoredAnswers.summary()`` rows). The
    judge's yes/no column is shown only where some row has it (relevance read by a judge)."""
    judged = any("relevant_share" in row for row in rows.values())
    lines = [f"  {'condition':<{width}} {HEADER}" + (f" {'relevant':>9}" if judged else "")]
    for name, row in rows.items():
        b = row["behaviour_rate"]
        # Records written before the loop share existed (older report.json files) show a dash.
        loop = f"{100 * row['loop_share']['mean']:>5.0f}%" if "loop_share" in row else f"{'-':>6}"
        lines.append(f"  {name:<{width}} {100 * b['mean']:>5.0f}% [{100 * b['ci95'][0]:>3.0f}-{100 * b['ci95'][1]:>3.0f}] "
                     f"{row['relevance']['mean']:>10.2f} {row['fluency']['mean']:>8.2f} {row['combined']['mean']:>9.2f} {loop}"
                     + ((f" {100 * row['relevant_share']['mean']:>8.0f}%" if "relevant_share" in row else f" {'-':>9}")
                        if judged else ""))
    return lines


def steer_table(cals: Mapping[str, BehaviourCalibration]) -> dict[str, Any]:
    """Return steer's report half side by side: unsteered, prompting, and per file the steered
    answers and its random direction (each with behaviour rate, relevance, fluency, combined, 95% CIs)."""
    table: dict[str, Any] = {}
    for what, cal in cals.items():
        table.setdefault("unsteered", cal.report["unsteered"])
        table.setdefault("prompting", cal.report["prompting"])
        table[f"random direction ({what} x{cal.strength:g})"] = cal.report["random"]
        table[f"{what} x{cal.strength:g}"] = cal.report["steered"]
    return table


def steer_lines(cals: Mapping[str, BehaviourCalibration]) -> list[str]:
    """Return steer's behaviour table as text lines, with each file's verdict against its random direction."""
    if not cals:
        return []
    first = next(iter(cals.values()))
    under = f", every condition but prompting under the system prompt {first.system!r}" if first.system is not None else ""
    lines = [f"behaviour on {first.report_queries} held-out queries (strength chosen on {first.choose_queries} others): "
             f"{first.measure}{under}", *condition_lines(steer_table(cals), 34)]
    for what, cal in cals.items():
        lines.append(f"  {what}: {cal.verdict} (combined {cal.vs_random['combined_diff']:+.2f} vs random, "
                     f"95% [{cal.vs_random['ci95_low']:+.2f}, {cal.vs_random['ci95_high']:+.2f}])")
    return lines


def eval_lines(result: Mapping[str, Any]) -> list[str]:
    """Return ``alignez eval``'s behaviour table (``behaviour_eval.measure_behaviour``) as text lines."""
    return [f"behaviour ({result['measure']['label']}) on {result['n_prompts']} prompts:",
            *condition_lines(result["conditions"], 40)]
