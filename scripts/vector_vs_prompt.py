"""Issue 31, part 3: where a shipped vector beats the same instruction given as a system prompt.

    .venv/bin/python scripts/vector_vs_prompt.py --setting all --threads 1 --out runs/vvp.json
    .venv/bin/python scripts/vector_vs_prompt.py --setting conversation,capitals --threads 1 --judge capitals

Four conditions in each setting, every one answering for itself:

- ``unsteered``: no system prompt (the model's template default), no vector;
- ``prompting``: the axis's positive guide (``axis.guide("positive")``, what ``steer`` compares
  with) as the system prompt;
- ``random direction``: a random direction of the vector's norm at the vector's strength
  (``behaviour_eval.null_steering``, the null ``alignez eval`` uses), no system prompt;
- ``vector``: the shipped file (``vectors/<model>/<trait>.gguf``) at its calibrated
  ``default_strength`` (``Steering.from_specs`` with no strength given), no system prompt.

Settings (``SETTINGS``):

- ``conversation`` (French) and ``conversation-brief``: Qwen2.5-Coder-0.5B, ``--turns`` (6) user
  turns in one conversation, each a different held-out query; each condition answers every turn
  itself and its own answers are the history (prompting keeps its system prompt at the top).
  Conversation i asks report queries i, i+1, ..., i+5 (mod 16), so turn 1 and turn 6 each ask all
  16 queries once. Rows for turn 1 (the single-turn reference) and turn 6.
- ``opposite`` (French) and ``opposite-brief``: one turn whose user message ends with the opposite
  request (``OPPOSITE``: "Please answer in English." / "Please answer in detail, with several
  paragraphs."). Prompting = the guide as system prompt against that user message; vector = no
  system prompt + vector. The behaviour measured is still the axis's (French, brief): the question
  is whose instruction wins.
- ``weak-follower``: SmolLM2-135M-Instruct, French, one turn (a model that follows instructions poorly).
- ``capitals``: Qwen2.5-Coder-0.5B, capitals, one turn (a behaviour a prompt hardly gets).

What is read: the answer of the last turn, scored by the project's Scorer built by
``behaviour_bench.axis_bench`` (the axis's measure; relevance from the answer's PMI with its
question under the unsteered model; fluency against the unsteered model's own single-turn answers,
plain and under the guide, on the 8 choose-half queries, as ``steer`` sets it), **against the bare
held-out query of that turn, read as a single-turn chat prompt**: the earlier turns and the appended
opposite request are not in the context the answer is read in. Greedy decoding, ``behaviour_bench
.SAMPLING`` (40 tokens, repeat penalty 1.1); earlier turns' answers enter the history as written
(40 tokens, possibly cut mid-sentence). Queries: the report half of the axis's held-out pool
(``prompt_sets.heldout_queries`` minus the queries of the shipped vector's preferences.jsonl,
``split_heldout``: the 16 the shipped strength was reported on, never chosen on); n = 16 per setting
unless ``--limit``. ``--report-queries N`` widens the report set to the last N queries of that pool
other than the 8 the strength was chosen on (the 16 among them), for intervals half as wide at
N = 64.

``--vector-system TEXT`` adds two conditions: ``system only`` (TEXT as the system prompt, no
vector) and ``vector + system`` (the vector with TEXT as the system prompt). A neutral TEXT such as
"You are a helpful assistant." asks for no behaviour; without one Qwen's template puts its own
default system prompt there.

``--judge`` adds the bundled 1.5B judge's yes/no relevance (``Judge.yes_probability`` with
``scoring.RELEVANCE_QUESTION`` on the same (query, answer) pairs): the share with P(yes) >= 0.5.

Output: a markdown table on stdout (``--md`` also writes it), JSON with every summary and answer
(``--out``), progress on stderr. A row is flagged "vector wins, intervals do not overlap" when the
vector's combined 95% interval lies entirely above prompting's (same setting, same turn).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignez_local.align.axes import BUILTIN_AXES, stored_axis
from alignez_local.align.behaviour_bench import (CHOOSE_QUERIES, REPORT_QUERIES, BehaviourBench,
                                                 axis_bench, split_heldout)
from alignez_local.align.steering import Steering
from alignez_local.evaluation.behaviour_eval import JUDGE_RUNTIME, null_steering
from alignez_local.evaluation.judge import Judge, open_judge
from alignez_local.llama.engine import Engine
from alignez_local.measures.scoring import RELEVANCE_QUESTION, ScoredAnswers
from alignez_local.measures.statistics import bootstrap_ci
from alignez_local.prompt_sets import heldout_queries
from alignez_local.settings import RuntimeSettings, open_engine

ROOT = Path(__file__).resolve().parents[1]
QWEN, SMOL = "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"
OPPOSITE = {"french": "Please answer in English.", "brief": "Please answer in detail, with several paragraphs."}


@dataclass(frozen=True)
class Setting:
    model: str
    trait: str
    turns: int = 1
    suffix: str = ""  # appended to every user message (the opposite request)
    what: str = ""


SETTINGS: dict[str, Setting] = {
    "conversation": Setting(QWEN, "french", turns=6, what="6-turn conversation"),
    "conversation-brief": Setting(QWEN, "brief", turns=6, what="6-turn conversation"),
    "opposite": Setting(QWEN, "french", suffix=OPPOSITE["french"], what="user asks for English"),
    "opposite-brief": Setting(QWEN, "brief", suffix=OPPOSITE["brief"], what="user asks for detail"),
    "capitals": Setting(QWEN, "capitals", what="single turn"),
    "weak-follower": Setting(SMOL, "french", what="single turn, weak instruction follower"),
    # The plain single turn of the shipped rows (issue 31, part 5: the suite table's judge column).
    "single-french": Setting(QWEN, "french", what="single turn"),
    "single-spanish": Setting(QWEN, "spanish", what="single turn"),
    "single-brief": Setting(QWEN, "brief", what="single turn"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def converse(bench: BehaviourBench, conversations: Sequence[Sequence[str]], steering: Steering,
             system: str | None, suffix: str = "") -> list[list[str]]:
    """Return answers[conversation][turn]: each conversation's user turns (``suffix`` appended to
    each) answered one turn at a time by ``steering`` under ``system``, the history being its own
    answers. Every turn is one ``Steering.generate`` over all conversations (the bench's sampling,
    shared prompt head decoded once, as ``BehaviourBench.completions`` does; a one-turn conversation
    gets exactly the prompts ``completions`` builds)."""
    engine = bench.engine
    history: list[list[dict[str, str]]] = [[{"role": "system", "content": system}] if system else [] for _ in conversations]
    answers: list[list[str]] = [[] for _ in conversations]
    for t in range(len(conversations[0])):
        for h, conv in zip(history, conversations):
            h.append({"role": "user", "content": conv[t] + (" " + suffix if suffix else "")})
        done = steering.generate(engine, [engine.format_chat(h) for h in history], bench.sampling, share_prefix=True)
        for h, a, c in zip(history, answers, done):
            h.append({"role": "assistant", "content": c.text})
            a.append(c.text)
        log(f"    turn {t + 1}: {sum(len(c.tokens) for c in done)} tokens")
    return answers


def judged(judge: Judge, questions: Sequence[str], answers: Sequence[str], seed: int) -> dict[str, Any]:
    """Return the judge's relevance: the share of answers with P(yes) >= 0.5, its 95% interval, the mean P."""
    p = judge.yes_probability(RELEVANCE_QUESTION, list(zip(questions, answers)))
    hit = (p >= 0.5).astype(float)
    lo, hi = bootstrap_ci(hit, seed=seed)
    return {"share": round(float(hit.mean()), 4), "ci95": [round(lo, 4), round(hi, 4)],
            "mean_p": round(float(p.mean()), 4), "p": [round(float(x), 4) for x in p]}


def heldout_halves(axis_name: str, pairs: Path, report_queries: int = REPORT_QUERIES) -> tuple[list[str], list[str]]:
    """Return (choose, report) for a file fitted on ``pairs`` (its preferences.jsonl): the axis's
    held-out pool minus the pairs' queries, split as ``steer`` split it (8 to choose on, 16 to report
    on); a ``report_queries`` above 16 widens the report set to the pool's last N queries other than
    the choose half (the 16 are the last of them)."""
    used = [json.loads(line)["query"] for line in pairs.read_text().splitlines() if line.strip()]
    pool = [q for q in heldout_queries(axis_name, used) if q not in set(used)]
    choose, report = split_heldout(pool, CHOOSE_QUERIES, REPORT_QUERIES)
    if report_queries > REPORT_QUERIES:
        rest = [q for q in dict.fromkeys(pool) if q not in set(choose)]
        report = rest[max(0, len(rest) - report_queries):]
    assert not set(report) & set(used) and not set(choose) & set(used)
    return choose, report


def run_setting(name: str, st: Setting, engine: Engine, limit: int | None, seed: int,
                judge_fn: Any | None, vector: Path | None = None, report_queries: int = REPORT_QUERIES,
                vector_system: str | None = None) -> dict[str, Any]:
    """Return one setting's rows (per turn read, per condition: summary, answers, judge). ``vector``:
    a candidate file fitted on the shipped file's pairs, read in its place (the same queries).
    ``report_queries``: how many of the pool's last queries, other than the choose half, to report on.
    ``vector_system``: also read the vector under this system prompt."""
    shipped = ROOT / "vectors" / st.model / f"{st.trait}.gguf"
    vec_path = vector.resolve() if vector else shipped
    # A user-named axis (Spanish) is the one its file's provenance records, as `alignez eval` reads it.
    axis = BUILTIN_AXES.get(st.trait) or stored_axis(**{k: v for k, v in json.loads(
        shipped.with_suffix(".provenance.json").read_text())["axis"].items() if k in ("name", "positive", "negative", "measure")})
    assert axis is not None
    choose, report = heldout_halves(axis.name, ROOT / "vectors" / st.model / f"{st.trait}.preferences.jsonl", report_queries)
    bench = axis_bench(engine, axis, None, choose, report)
    bench.fixed("unsteered", "choose")  # sets the fluency and PMI references on the choose half, as steer does
    steering = Steering.from_specs(engine, [str(vec_path)])
    slot = steering.vectors[0]
    (null_name, null), = null_steering(steering, seed).items()
    conditions = {"unsteered": (Steering(), None), "prompting": (Steering(), bench.system),
                  null_name: (null, None), f"vector x{slot.strength:g}": (steering, None)}
    if vector_system:
        conditions["system only"] = (Steering(), vector_system)
        conditions[f"vector + system x{slot.strength:g}"] = (steering, vector_system)
    n = len(report) if limit is None else min(limit, len(report))
    convs = [[report[(i + k) % len(report)] for k in range(st.turns)] for i in range(n)]
    reads = sorted({0, st.turns - 1})
    out: dict[str, Any] = {
        "model": st.model, "trait": st.trait, "what": st.what, "vector": str(vec_path.relative_to(ROOT) if vec_path.is_relative_to(ROOT) else vec_path),
        "strength": slot.strength, "strength_origin": slot.origin, "measure": bench.scorer.measure.describe(),
        "system_prompt": bench.system, "vector_system": vector_system, "user_suffix": st.suffix, "turns": st.turns, "n": n,
        "max_tokens": bench.sampling.max_tokens, "turns_read": [t + 1 for t in reads],
        "conversations": convs, "rows": {}}
    for cname, (steer, system) in conditions.items():
        t0 = time.perf_counter()
        log(f"  {name}: {cname} ({st.turns} turn{'s' if st.turns > 1 else ''}, {n} conversations)")
        answers = converse(bench, convs, steer, system, st.suffix)
        gen_s = time.perf_counter() - t0
        for t in reads:
            qs, ans = [c[t] for c in convs], [a[t] for a in answers]
            scored: ScoredAnswers = bench.scorer.score(qs, ans)
            row = {"summary": scored.summary(seed), "questions": qs, "answers": ans,
                   "behaviour": scored.behaviour.round(4).tolist(), "relevance": scored.relevance.round(4).tolist(),
                   "fluency": scored.fluency.round(4).tolist(), "combined": scored.combined.round(4).tolist(),
                   "loops": scored.looping.tolist()}
            out["rows"].setdefault(f"turn {t + 1}", {})[cname] = row
        out.setdefault("seconds", {})[cname] = {"generate": round(gen_s, 1), "total": round(time.perf_counter() - t0, 1)}
        log(f"  {name}: {cname} done in {time.perf_counter() - t0:.0f}s")
        out.setdefault("transcripts", {})[cname] = answers
    if judge_fn is not None:
        judge = judge_fn()
        for turn, rows in out["rows"].items():
            for cname, row in rows.items():
                t0 = time.perf_counter()
                row["judge_relevance"] = judged(judge, row["questions"], row["answers"], seed)
                log(f"  {name}: judge {turn} {cname} {time.perf_counter() - t0:.0f}s")
    for turn, rows in out["rows"].items():
        vec = next(r for c, r in rows.items() if c.startswith("vector x"))["summary"]["combined"]["ci95"]
        pro = rows["prompting"]["summary"]["combined"]["ci95"]
        out.setdefault("vector_wins", {})[turn] = bool(vec[0] > pro[1])
    return out


def pct(x: dict[str, Any]) -> str:
    return f"{100 * x['mean']:.0f}% [{100 * x['ci95'][0]:.0f}-{100 * x['ci95'][1]:.0f}]"


def table(results: dict[str, dict[str, Any]]) -> str:
    """Return the markdown table: one line per setting, turn read and condition."""
    judge = any("judge_relevance" in r for res in results.values() for rows in res["rows"].values() for r in rows.values())
    head = ("| setting | model, trait | turn | condition | behaviour [95%] | relevance | fluency | combined [95%] | loops |"
            + (" judge relevant [95%] |" if judge else "") + " flag |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, res in results.items():
        model = "SmolLM2-135M" if res["model"] == SMOL else "Qwen2.5-Coder-0.5B"
        for turn, rows in res["rows"].items():
            for cname, row in rows.items():
                s = row["summary"]
                c = s["combined"]
                flag = ("vector wins, intervals do not overlap" if cname.startswith("vector x") and res["vector_wins"][turn]
                        else "")
                j = ""
                if judge:
                    jr = row.get("judge_relevance")
                    j = (f" {100 * jr['share']:.0f}% [{100 * jr['ci95'][0]:.0f}-{100 * jr['ci95'][1]:.0f}] |"
                         if jr else " |")
                lines.append(f"| {name} | {model}, {res['trait']} | {turn.split()[1]}/{res['turns']} | {cname} | "
                             f"{pct(s['behaviour_rate'])} | {s['relevance']['mean']:.2f} | {s['fluency']['mean']:.2f} | "
                             f"{c['mean']:.2f} [{c['ci95'][0]:.2f}-{c['ci95'][1]:.2f}] | "
                             f"{100 * s['loop_share']['mean']:.0f}% |{j} {flag} |")
    return "\n".join(lines)


def wins_line(results: dict[str, dict[str, Any]]) -> str:
    wins = [f"{n} turn {t.split()[1]}" for n, r in results.items() for t, w in r["vector_wins"].items() if w]
    return f"vector's combined 95% interval entirely above prompting's: {', '.join(wins) or 'nowhere'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", default="all", help=f"comma-separated, of: all, {', '.join(SETTINGS)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None, help="conversations (queries) per setting [the whole report set]")
    ap.add_argument("--report-queries", type=int, default=REPORT_QUERIES,
                    help="report on this many held-out queries (never the 8 chosen on; the standard 16 among them)")
    ap.add_argument("--vector-system", default=None, metavar="TEXT",
                    help="add two conditions: TEXT as the system prompt alone, and the vector under it")
    ap.add_argument("--turns", type=int, default=None, help="override the conversation settings' 6 turns")
    ap.add_argument("--judge", nargs="?", const="all", default="",
                    help="add the bundled 1.5B judge's yes/no relevance (on all settings, or a comma-separated few)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vector", type=Path, default=None,
                    help="read this file instead of the shipped one (fitted on the shipped pairs; one setting)")
    ap.add_argument("--out", type=Path, default=None, help="JSON with every summary and answer")
    ap.add_argument("--md", type=Path, default=None, help="also write the markdown table here")
    ap.add_argument("--table-from", type=Path, default=None, help="print the table of a JSON --out and exit (runs nothing)")
    args = ap.parse_args()
    if args.table_from:
        saved = json.loads(args.table_from.read_text())["settings"]
        print(table(saved))
        print(f"\n{wins_line(saved)}")
        return
    names = list(SETTINGS) if args.setting == "all" else [s.strip() for s in args.setting.split(",")]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        ap.error(f"unknown setting {', '.join(unknown)}; use all or {', '.join(SETTINGS)}")
    judged_settings = [s.strip() for s in args.judge.split(",") if s.strip()]
    runtime = RuntimeSettings(threads=args.threads, n_ctx=8192)
    engines: dict[str, Engine] = {}
    judges: list[Judge] = []

    def get_judge() -> Judge:
        if not judges:
            log("opening the judge")
            j = open_judge("auto", None, JUDGE_RUNTIME.with_(threads=args.threads), needs=True)
            assert j is not None
            judges.append(j)
        return judges[0]

    results: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for name in names:
        st = SETTINGS[name]
        if args.turns and st.turns > 1:
            st = Setting(st.model, st.trait, args.turns, st.suffix, f"{args.turns}-turn conversation")
        if st.model not in engines:
            for e in engines.values():
                e.close()
            engines = {st.model: open_engine(st.model, runtime)}
        t0 = time.perf_counter()
        log(f"{name}: {st.model} {st.trait} ({st.what})")
        results[name] = run_setting(name, st, engines[st.model], args.limit, args.seed,
                                    get_judge if {"all", name} & set(judged_settings) else None, args.vector,
                                    args.report_queries, args.vector_system)
        results[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        log(f"{name}: {results[name]['wall_s']:.0f}s")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"threads": args.threads, "settings": results}, indent=1, ensure_ascii=False))
    md = table(results)
    print(md)
    print(f"\n{wins_line(results)}")
    print(f"total {time.perf_counter() - started:.0f}s, {args.threads} thread(s)")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md + "\n")
    for e in engines.values():
        e.close()
    for j in judges:
        j.close()


if __name__ == "__main__":
    main()
