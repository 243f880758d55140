"""The ``system only`` condition for a ``scripts/vector_vs_prompt.py --report-queries N`` record made
before that script had it: the same queries answered under a neutral system prompt with no vector,
scored and judged as that script does (issue 31).

    .venv/bin/python scripts/records/system_only.py scripts/records/results/vector-vs-prompt-64-spanish.json \
        scripts/records/results/vector-vs-prompt-64-brief.json \
        --system "You are a helpful assistant." --threads 1

Writes results/system-only-TRAIT.json for each record (answers, summary, the judge's reading). A
research record (not API, not tested).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from vector_vs_prompt import heldout_halves, judged  # noqa: E402

from alignez_local.align.axes import BUILTIN_AXES, stored_axis  # noqa: E402
from alignez_local.align.behaviour_bench import axis_bench  # noqa: E402
from alignez_local.evaluation.behaviour_eval import JUDGE_RUNTIME  # noqa: E402
from alignez_local.evaluation.judge import open_judge  # noqa: E402
from alignez_local.settings import RuntimeSettings, open_engine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", nargs="+", type=Path, help="vector_vs_prompt.py --out files (single-turn settings)")
    ap.add_argument("--system", default="You are a helpful assistant.")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    done: dict[str, dict] = {}
    engine = None
    for path in args.records:
        (name, rec), = json.loads(path.read_text())["settings"].items()
        if engine is None:
            engine = open_engine(rec["model"], RuntimeSettings(threads=args.threads, n_ctx=8192))
        vdir = ROOT / "vectors" / rec["model"]
        prov = json.loads((vdir / f"{rec['trait']}.provenance.json").read_text())
        axis = BUILTIN_AXES.get(rec["trait"]) or stored_axis(
            **{k: v for k, v in prov["axis"].items() if k in ("name", "positive", "negative", "measure")})
        choose, _ = heldout_halves(axis.name, vdir / f"{rec['trait']}.preferences.jsonl")
        qs = rec["rows"]["turn 1"]["unsteered"]["questions"]
        bench = axis_bench(engine, axis, None, choose, qs)
        bench.fixed("unsteered", "choose")  # the fluency and PMI references, as vector_vs_prompt.py sets them
        answers = bench.answers(qs, None, args.system)
        scored = bench.scorer.score(qs, answers)
        done[rec["trait"]] = {"record": str(path), "setting": name, "system": args.system, "questions": qs,
                              "answers": answers, "summary": scored.summary(0), "loops": scored.looping.tolist()}
        s = scored.summary(0)
        print(f"{rec['trait']}, system only: behaviour {100 * s['behaviour_rate']['mean']:.0f}%, relevance "
              f"{s['relevance']['mean']:.2f}, loops {100 * s['loop_share']['mean']:.0f}%", flush=True)
    if engine is not None:
        engine.close()
    judge = open_judge("auto", None, JUDGE_RUNTIME.with_(threads=args.threads), needs=True)
    for trait, row in done.items():
        row["judge_relevance"] = judged(judge, row["questions"], row["answers"], 0)
        print(f"{trait}, system only: the judge reads {100 * row['judge_relevance']['share']:.0f}% as relevant", flush=True)
        (ROOT / f"scripts/records/results/system-only-{trait}.json").write_text(json.dumps(row, indent=1, ensure_ascii=False))
    judge.close()


if __name__ == "__main__":
    main()
