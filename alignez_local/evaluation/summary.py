"""``summary.md`` of an evaluation report: Markdown tables, 95% intervals, the refusal detectors side
by side, and what a small local judge can and cannot tell. One function per section."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

JUDGE_LIMITS = (
    "The judge is a small local model (by default Qwen2.5-Coder-1.5B-Instruct, Q4_K_M), not GPT-4. "
    "Measured on hand-made pairs it reliably catches GROSS differences: refusals, rudeness, off-topic "
    "answers and incoherent text (score margins of 3.8-6.6 nats). On SUBTLE quality (a small factual "
    "error, a slightly better explanation) its margins are 0.03-1.3 nats, close to noise: a tie or a "
    "small net win rate here says little about subtle quality. In pairwise mode it has a strong "
    "position bias (92-96% of single-order verdicts for the same slot), which is why every pair is "
    "judged in both orders and only agreeing verdicts count. Read the 95% intervals: an interval that "
    "contains 0 means no difference was detected, not that there is none."
)

# Disagreements between the refusal detectors listed in the summary (all are in report.json).
MAX_DISAGREEMENTS_SHOWN = 20
REFUSAL_KINDS_SHOWN = ("harmful", "benign")

Lines = list[str]


def _pct(x: float | None) -> str:
    """Return a rate as a signed percentage, or n/a."""
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def _ci(ci: Sequence[float | None] | None) -> str:
    """Return an interval as signed percentages, or n/a."""
    if not ci or ci[0] is None or ci[1] is None:
        return "n/a"
    return f"[{100 * ci[0]:+.1f}%, {100 * ci[1]:+.1f}%]"


def _num(x: float | None, fmt: str = "{:.1f}") -> str:
    """Return ``x`` formatted with ``fmt``, or n/a."""
    return "n/a" if x is None else fmt.format(x)


def _rate(group: dict[str, Any], kind: str, judge: bool = False) -> str:
    """Return refusals/n (rate) of one kind by one detector for a table cell; - when absent."""
    r = group.get("refusal", {}).get(kind)
    n_key, ref_key, rate_key = ("judge_n", "judge_refusals", "judge_rate") if judge else ("n", "refusals", "rate")
    if not r or not r.get(n_key):
        return "-"
    return f"{r[ref_key]}/{r[n_key]} ({100 * r[rate_key]:.0f}%)"


def _conditions(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Return (label, statistics) of every set of answers: unsteered, each strength, the reference."""
    out = [("unsteered", report["unsteered"])]
    out += [(f"steered x{r['strength']:g}", r) for r in report["results"]]
    if "reference" in report:
        out.append(("reference", report["reference"]))
    return out


def _header(report: dict[str, Any]) -> Lines:
    """Return the title and the run's models, steering, prompts and sampling."""
    s, models = report["settings"], report.get("models", {})
    L: Lines = ["# alignez eval", ""]
    if not report["complete"]:
        # Written as a checkpoint while the run goes on, and left as is when it is stopped.
        L += [f"**Unfinished (running or stopped during {report['stage_reached']}): partial results; "
              "`alignez eval --resume` with the same options continues it.**", ""]

    def mdesc(key: str) -> str:
        """Return a one-line description of a loaded model of the report."""
        m = models.get(key)
        return f"{m.get('name', '?')} (`{Path(m['path']).name}`, sha256 {m['sha256'][:12]})" if m else "not loaded"

    L += [f"- Answering model: {mdesc('answer')}",
          f"- Judge: {mdesc('judge')}, mode `{s['mode']}`, tie margin {s['margin_nats']:g} nats"]
    if s.get("reference"):
        L.append(f"- Reference model: {mdesc('reference')}")
    L.append("- Steering: " + "; ".join(report["steering"].get("describe", [])[:-1] or ["(not loaded)"]))
    kinds = ", ".join(f"{k} {c}" for k, c in report["prompt_kinds"].items())
    sp = s["sampling"]
    as_kind = f" (plain-text prompts counted as {s['prompt_kind']})" if s.get("prompt_kind") else ""
    L += [
        f"- Prompts: {report['n_prompts']} ({kinds}) from {s['prompts_file']}{as_kind}",
        (f"- Sampling: temperature {sp['temperature']:g}{' (greedy)' if sp['temperature'] == 0 else ''}, "
         f"seed {sp['seed']}, max {sp['max_tokens']} tokens, repeat penalty {sp['repeat_penalty']:g}; "
         "the same for unsteered, steered and reference answers"),
        f"- Created {report['created']}, alignez {report['alignez_version']}",
        "",
        "## What this judge can and cannot tell",
        "",
        JUDGE_LIMITS,
        "",
    ]
    return L


def _verdict_row(label: str, j: dict[str, Any], identical: str) -> str:
    """Return one row of the verdict table."""
    return (f"| {label} | {j['n']} | {j['wins']} | {j['ties']} | {j['losses']} | "
            f"{_pct(j['net_win_rate'])} | {_ci(j['net_win_ci95'])} | {identical} |")


def _verdicts(report: dict[str, Any]) -> Lines:
    """Return the steered-vs-unsteered verdict table (or a note that nothing was judged)."""
    s, results = report["settings"], report["results"]
    if not any("judge" in r for r in results):
        why = "--no-quality-judge: refusals only" if s.get("quality_judge") is False else "the run stopped before judging"
        return ["## Judge", "", f"No verdicts ({why}).", ""]
    L: Lines = [
        "## Steered vs unsteered (judge)",
        "",
        ("Net win rate = (wins - losses) / n, with a bootstrap 95% interval over prompts "
         f"({s['bootstrap_resamples']} resamples). A verdict whose margin is under {s['margin_nats']:g} nats is a tie."),
        "",
        "| strength | n | wins | ties | losses | net win rate | 95% interval | identical answers |",
        "|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    L += [_verdict_row(f"x{r['strength']:g}", r["judge"], str(r["identical_to_unsteered"]))
          for r in results if r.get("judge")]
    ref = report.get("reference", {}).get("judge")
    if ref:
        L.append(_verdict_row("reference", ref, "-"))
    return L + [""]


def _verdicts_by_kind(report: dict[str, Any]) -> Lines:
    """Return the net win rate per prompt kind, when there is more than one kind."""
    kinds = list(report["prompt_kinds"])
    results = report["results"]
    if len(kinds) < 2 or not any("judge" in r for r in results):
        return []
    L: Lines = ["### By prompt kind (net win rate, 95% interval)", "",
                "| strength | " + " | ".join(kinds) + " |", "|---:|" + "---|" * len(kinds)]
    for r in results:
        bk = r.get("judge_by_kind", {})
        cells = [f"{_pct(bk[k]['net_win_rate'])} {_ci(bk[k]['net_win_ci95'])}" if k in bk else "-" for k in kinds]
        L.append(f"| x{r['strength']:g} | " + " | ".join(cells) + " |")
    return L + [""]


def _gap(report: dict[str, Any]) -> Lines:
    """Return the gap-closed lines, when a reference model answered and was judged."""
    if not report["settings"].get("reference") or not any("gap_closed" in r for r in report["results"]):
        return []
    L: Lines = ["### Gap closed", "",
                ("Share of the reference model's net win over the unsteered model that steering recovers "
                 "(steered net win / reference net win, both against the same unsteered answers)."), ""]
    for r in report["results"]:
        g = r.get("gap_closed", {})
        if g.get("value") is None:
            L.append(f"- x{r['strength']:g}: {g.get('note', 'n/a')}")
        else:
            L.append(f"- x{r['strength']:g}: {100 * g['value']:.0f}% (95% interval {_ci(g.get('ci95'))})"
                     + (f"; {g['note']}" if g.get("note") else ""))
    return L + [""]


def _answer_row(label: str, g: dict[str, Any]) -> str:
    """Return one Markdown table row of answer statistics."""
    ln, pp = g.get("lengths", {}), g.get("perplexity", {})
    lens = f"{_num(ln.get('tokens_mean'))} / {_num(ln.get('tokens_median'))}" if ln else "-"
    chars = f"{_num(ln.get('chars_mean'), '{:.0f}')} / {_num(ln.get('chars_median'), '{:.0f}')}" if ln else "-"
    ppl = f"{_num(pp.get('pooled'), '{:.2f}')} / {_num(pp.get('median'), '{:.2f}')}" if pp.get("n_scored") else "-"
    score = _num(g.get("mean_score"), "{:+.2f}") if "mean_score" in g else "-"
    cut = f"{g.get('cut_at_max_tokens', 0)}/{g.get('n_answers', 0)}"
    return f"| {label} | {lens} | {chars} | {cut} | {ppl} | {score} |"


def _answers(report: dict[str, Any]) -> Lines:
    """Return the table of answer lengths, cuts, perplexity and mean judge score per condition."""
    L: Lines = [
        "## Answers",
        "",
        ("Perplexity: of the answer text under the UNSTEERED answering model (fluency; pooled over tokens, "
         "and the median per answer). Answers cut at --max-tokens are judged as cut."),
        "",
        "| answers | tokens mean / median | chars mean / median | cut at max tokens | perplexity pooled / median | mean judge score |",
        "|---|---|---|---:|---|---:|",
    ]
    L += [_answer_row(label, g) for label, g in _conditions(report)]
    return L + [""]


def _refusals(report: dict[str, Any]) -> Lines:
    """Return the refusal rates by both detectors on harmful and benign prompts, and where they disagree."""
    kinds = [k for k in REFUSAL_KINDS_SHOWN if k in report["prompt_kinds"]]
    if not kinds:
        return []
    L: Lines = [
        "## Refusals",
        "",
        ("Two detectors: keywords (`refusal.is_refusal`: the answer opens like a refusal) and the judge "
         "(asked whether the answer refuses or deflects, read from its next-token probabilities; a refusal "
         "when p(Yes) > p(No)). The keyword count is the one to read: on 150 hand-labelled answers of "
         "Qwen2.5-Coder-0.5B it agreed with the labels on 146, the 1.5B judge on 112 (docs/results.md, "
         "Harmless). On harmful prompts a higher rate is safer; on benign prompts a refusal is "
         "an over-refusal."),
        "",
        "| answers | " + " | ".join(f"{k}: keywords | {k}: judge" for k in kinds) + " |",
        "|---|" + "---|---|" * len(kinds),
    ]
    for label, g in _conditions(report):
        L.append(f"| {label} | " + " | ".join(f"{_rate(g, k)} | {_rate(g, k, judge=True)}" for k in kinds) + " |")
    return L + [""] + _disagreements(report, kinds)


def _disagreements(report: dict[str, Any], kinds: Sequence[str]) -> Lines:
    """Return the answers on which the keyword detector and the judge disagree (the first few)."""
    rows: Lines = []
    keys = [("unsteered", None)] + [(f"steered x{r['strength']:g}", r["strength"]) for r in report["results"]]
    keys += [("reference", "reference")] if "reference" in report else []
    for label, key in keys:
        for rec in report["prompts"]:
            ans = _answer_of(rec, key)
            if rec["kind"] in kinds and ans and "judge_refusal" in ans and ans["judge_refusal"] != ans["refusal"]:
                opening = " ".join(ans["answer"].split())[:90].replace("|", "\\|")
                rows.append(f"| {label} | {rec['index']} | {rec['kind']} | {'yes' if ans['refusal'] else 'no'} | "
                            f"{'yes' if ans['judge_refusal'] else 'no'} ({ans['judge_refusal_score']:+.2f}) | {opening} |")
    if not rows:
        return []
    L: Lines = ["### Where the detectors disagree", "",
                f"{len(rows)} answers" + (f"; the first {MAX_DISAGREEMENTS_SHOWN} shown, all in report.json"
                                          if len(rows) > MAX_DISAGREEMENTS_SHOWN else "") + ".", "",
                "| answers | prompt | kind | keywords | judge (nats) | answer opening |", "|---|---:|---|---|---|---|"]
    return L + rows[:MAX_DISAGREEMENTS_SHOWN] + [""]


def _answer_of(rec: dict[str, Any], key: float | str | None) -> dict[str, Any] | None:
    """Return one prompt record's answer of a condition: None = unsteered, a strength, or "reference"."""
    if key is None:
        return rec.get("unsteered")
    if key == "reference":
        return rec.get("reference")
    return next((s for s in rec.get("steered", []) if s["strength"] == key), None)


def _footer(report: dict[str, Any]) -> Lines:
    """Return the plot note, the stage timings and where the details are."""
    L: Lines = []
    if report.get("plot"):
        L += [f"Sweep plot: {report['plot']}", ""]
    t = report.get("timing", {})
    if t:
        L += ["Timing: " + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in t.items()), ""]
    return L + ["Every prompt, answer, score and verdict is in `report.json`.", ""]


def summary_markdown(report: dict[str, Any]) -> str:
    """Return the Markdown summary of a report: tables, 95% intervals and the judge's limits."""
    sections = (_header, _verdicts, _verdicts_by_kind, _gap, _answers, _refusals, _footer)
    return "\n".join(line for section in sections for line in section(report))
