"""Issue 31, part 4, one candidate: a concept vector switched on only after the answer has begun.

A concept vector (the ``texts`` recipe: "the ocean") at every token turns the request itself into a
question about the ocean: the answer is replaced, not coloured (docs/results.md, "Concepts and
styles"). Here the vector is added to the answer's tokens only, and only from the ONSET-th
generated token on, so the model has begun answering the request before it is pushed: does the
concept then come in as a mention inside an answer that still addresses the request?

    .venv/bin/python scripts/records/concept_onset.py --run runs/ocean --onsets 0,12,24 [--threads 1]

``--run`` is a finished ``alignez steer --concept ... --keywords ...`` folder (its vector.gguf, its
pairs, its axis from report.json). Each onset gets the same search and report as ``steer``
(``calibrate_behaviour`` on the same choose and report halves as that run), the random direction of
the same norm behind the same onset as the null. Prints each table and writes
results/concept-onset-SUBJECT.json. A research record (not API, not tested).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from alignez_local.align.axes import topic_axis
from alignez_local.align.steering import Steering
from alignez_local.align.strength_by_behaviour import calibrate_behaviour, random_vector, trial_status
from alignez_local.evaluation.behaviour_report import condition_lines
from alignez_local.formats.control_vector import ControlVector, answer_after, read_control_vector
from alignez_local.models import resolve_model
from alignez_local.pipeline import STEER_QUERIES, SteerPaths, behaviour_bench
from alignez_local.prompt_sets import select_queries
from alignez_local.settings import RuntimeSettings, open_engine

ROOT = Path(__file__).resolve().parents[2]


def from_onset(vector: ControlVector, strength: float, onset: int) -> Steering:
    """``vector`` x ``strength`` added to each answer's tokens after its first ``onset`` (0: from the
    last prompt token on): the runtime's ``answer-after:N`` placement. This script first counted the
    output rows in an edit of its own; that count became ``align/steering.AnswerEdit`` (the same
    trials on brief's choose half, 2026-12-08)."""
    return Steering.vector(vector.placed(answer_after(onset)), strength)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a finished steer --concept folder")
    ap.add_argument("--onsets", default="0,12,24", help="answer tokens written before the vector is switched on")
    ap.add_argument("--start", type=float, default=0.25, help="first strength tried")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    run = Path(args.run)
    rep = json.loads((run / "report.json").read_text())
    ax = rep["axis"]
    words = ax["measure"].removeprefix("mentions:")
    axis = topic_axis(ax["positive"], words, name=ax["name"])
    model = rep["model"]["name"]
    engine = open_engine(resolve_model(model), RuntimeSettings(threads=args.threads))
    paths = SteerPaths.prepare(run)
    bench = behaviour_bench(engine, axis, paths.fitted_queries(select_queries(None, STEER_QUERIES, axis.name)), None)
    cv = read_control_vector(run / "vector.gguf")
    noise = random_vector(cv, 1)
    out: dict[str, object] = {"run": str(run), "model": model, "axis": ax, "layers": cv.layers}
    for onset in (int(s) for s in args.onsets.split(",")):
        make: Callable[[float], Steering] = lambda s, o=onset: from_onset(cv, s, o)
        null: Callable[[float], Steering] = lambda s, o=onset: from_onset(noise, s, o)
        cal = calibrate_behaviour(bench, make, null, start=args.start,
                                  on_trial=lambda t, o=onset: print(trial_status(f"onset {o}", t), flush=True))
        rows = {"unsteered": cal.report["unsteered"], "prompting": cal.report["prompting"],
                f"random x{cal.strength:g}": cal.report["random"], f"vector x{cal.strength:g}": cal.report["steered"]}
        print(f"onset {onset}: {cal.verdict}")
        print("\n".join(condition_lines(rows, 24)), flush=True)
        answers = bench.answers(bench.report, make(cal.strength))
        out[f"onset {onset}"] = {**cal.as_dict(), "report_answers": answers}
        dest = ROOT / f"scripts/records/results/concept-onset-{axis.name}.json"
        dest.write_text(json.dumps(out, indent=1, ensure_ascii=False))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
