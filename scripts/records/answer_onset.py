"""Issue 31, part 1: a trait vector switched on after the answer's first tokens.

The shipped brief vector (answer-only) makes some answers refusals or non-answers from their first
token ("I'm sorry, but I can't assist with that."; "Air is a living organism."), where the unsteered
model begins "To patch a small hole in a plaster wall, ...". Added only from the ONSET-th answer
token on (``concept_onset.from_onset``: the ``answer-after:N`` placement: the model writes its first ONSET tokens unsteered), does the
answer keep its opening and still end short?

    .venv/bin/python scripts/records/answer_onset.py --run runs/ao-brief --axis brief --onsets 2,4 --threads 1
    .venv/bin/python scripts/records/answer_onset.py --run runs/ao-brief --axis brief --onsets 2 --strength 0.7071 \
        --system "You are a helpful assistant." --tag=-system

``--run`` is a finished ``alignez steer`` folder (its vector.gguf and preferences.jsonl); ``--axis``
a built-in axis. Each onset's strength is chosen as ``steer`` chooses (``calibrate_behaviour`` on
the run's choose half, the random direction of the same norm behind the same onset as the null)
unless ``--strength`` fixes it (then chosen elsewhere: say where), and reported on the 16 report
queries; then the chosen strength answers the wider report set ``scripts/vector_vs_prompt.py
--report-queries 64`` reads (the pool's last 64 held-out queries other than the 8 chosen on), and
the bundled 1.5B judge reads whether each answer addresses the request. ``--system``: those 64
answers are written under this system prompt. Writes results/answer-onset-AXIS[TAG].json. A
research record (not API, not tested).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from concept_onset import from_onset  # noqa: E402  (a sibling records script)
from vector_vs_prompt import heldout_halves, judged  # noqa: E402

from alignez_local.align.axes import BUILTIN_AXES  # noqa: E402
from alignez_local.align.strength_by_behaviour import calibrate_behaviour, random_vector, trial_status  # noqa: E402
from alignez_local.evaluation.behaviour_eval import JUDGE_RUNTIME  # noqa: E402
from alignez_local.evaluation.behaviour_report import condition_lines  # noqa: E402
from alignez_local.evaluation.judge import open_judge  # noqa: E402
from alignez_local.formats.control_vector import read_control_vector  # noqa: E402
from alignez_local.models import resolve_model  # noqa: E402
from alignez_local.pipeline import STEER_QUERIES, SteerPaths, behaviour_bench  # noqa: E402
from alignez_local.prompt_sets import select_queries  # noqa: E402
from alignez_local.settings import RuntimeSettings, open_engine  # noqa: E402

WIDE = 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, type=Path, help="a finished steer folder")
    ap.add_argument("--axis", required=True, choices=sorted(BUILTIN_AXES))
    ap.add_argument("--onsets", default="2,4", help="answer tokens written unsteered before the vector is switched on")
    ap.add_argument("--strength", type=float, default=None, help="read this strength instead of choosing one")
    ap.add_argument("--system", default=None, help="system prompt of the wide set's answers")
    ap.add_argument("--start", type=float, default=0.25, help="first strength tried")
    ap.add_argument("--tag", default="", help="appended to the result file's name")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    axis = BUILTIN_AXES[args.axis]
    model = json.loads((args.run / "report.json").read_text())["model"]["name"]
    engine = open_engine(resolve_model(model), RuntimeSettings(threads=args.threads))
    bench = behaviour_bench(engine, axis, SteerPaths.prepare(args.run).fitted_queries(
        select_queries(None, STEER_QUERIES, axis.name)), None)
    bench.fixed("unsteered", "choose")  # the fluency and PMI references, as steer sets them before any trial
    cv = read_control_vector(args.run / "vector.gguf")
    noise = random_vector(cv, 1)
    choose, wide = heldout_halves(axis.name, args.run / "preferences.jsonl", WIDE)
    assert choose == bench.choose, "the run's choose half is not the one vector_vs_prompt.py reads"
    out: dict[str, object] = {"run": str(args.run), "model": model, "axis": axis.name, "system": args.system,
                              "layers": cv.layers, "wide_queries": wide, "onsets": {}}
    dest = ROOT / f"scripts/records/results/answer-onset-{axis.name}{args.tag}.json"
    for onset in (int(s) for s in args.onsets.split(",")):
        t0 = time.perf_counter()
        row: dict[str, object] = {}
        if args.strength is None:
            cal = calibrate_behaviour(bench, lambda s, o=onset: from_onset(cv, s, o),
                                      lambda s, o=onset: from_onset(noise, s, o), start=args.start,
                                      on_trial=lambda t, o=onset: print(trial_status(f"onset {o}", t), flush=True))
            strength = cal.strength
            rows = {"unsteered": cal.report["unsteered"], "prompting": cal.report["prompting"],
                    f"random x{strength:g}": cal.report["random"], f"vector x{strength:g}": cal.report["steered"]}
            print(f"onset {onset}: {cal.verdict}")
            print("\n".join(condition_lines(rows, 24)), flush=True)
            row.update(cal.as_dict())
        else:
            strength = args.strength
        answers = bench.answers(wide, from_onset(cv, strength, onset), args.system)
        scored = bench.scorer.score(wide, answers)
        s = scored.summary(0)
        row.update({"strength": strength, "wide_answers": answers, "wide_summary": s, "wide_loops": scored.looping.tolist()})
        out["onsets"][str(onset)] = row  # type: ignore[index]
        print(f"onset {onset} x{strength:g} on {len(wide)}: behaviour {100 * s['behaviour_rate']['mean']:.0f}%, "
              f"loops {100 * s['loop_share']['mean']:.0f}% ({time.perf_counter() - t0:.0f}s)", flush=True)
        dest.write_text(json.dumps(out, indent=1, ensure_ascii=False))
    engine.close()
    judge = open_judge("auto", None, JUDGE_RUNTIME.with_(threads=args.threads), needs=True)
    for onset, row in out["onsets"].items():  # type: ignore[union-attr]
        row["wide_judge"] = judged(judge, wide, row["wide_answers"], 0)
        print(f"onset {onset} x{row['strength']:g}: the judge reads {100 * row['wide_judge']['share']:.0f}% "
              f"{row['wide_judge']['ci95']} of {len(wide)} answers as addressing the request", flush=True)
    judge.close()
    dest.write_text(json.dumps(out, indent=1, ensure_ascii=False))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
