"""Issue 31, part 1, one candidate: a strength that fades over the answer. The vector is added where the
answer is written (the last prompt token and each generated token, as the answer-only placement) at
strength x 0.5 ** (t / HALF_LIFE) for the answer's t-th row: full strength where the answer chooses its
language, register and shape, then less and less, so the later tokens follow the answer's own start
instead of being pushed off the request.

    .venv/bin/python scripts/records/fading.py --trait french [--half-life 8] [--prompt-too] [--vector FILE] [--threads 1]
    .venv/bin/python scripts/records/fading.py --trait french --read 0.3536   # the report half's answers, judged

The bench is steer's own for that trait (the held-out queries not in the vector's pairs, split into the
same choose and report halves, the same judge), the same strength search (calibrate_behaviour), the
random null faded the same way. Prints the trials and the report table beside the file's own figures;
writes results/fading-TRAIT-hH.json with every answer. A research record (not API, not tested).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alignez_local.align.axes import BUILTIN_AXES
from alignez_local.align.preferences import load_pairs
from alignez_local.align.strength_by_behaviour import calibrate_behaviour, random_vector
from alignez_local.align.axes import PreferenceAxis
from alignez_local.evaluation.behaviour_eval import JUDGE_RUNTIME, behaviour_judge
from alignez_local.evaluation.judge import open_judge
from alignez_local.measures.scoring import RELEVANCE_QUESTION
from alignez_local.evaluation.behaviour_report import condition_lines
from alignez_local.formats.control_vector import ControlVector, read_control_vector
from alignez_local.llama.engine import Completion, Engine, Sampling
from alignez_local.models import resolve_model
from alignez_local.pipeline import behaviour_bench
from alignez_local.settings import RuntimeSettings, open_engine

ROOT = Path(__file__).resolve().parents[2]
MODEL = "qwen2.5-coder-0.5b-instruct"


class Fading:
    """Duck-types Steering.generate: ``vector`` x ``strength`` x 0.5 ** (t / half_life) added to the
    t-th output row of each prompt (t = 0: the last prompt token, then each generated token).
    ``prompt_too``: every prompt token at full strength as well (as llama.cpp's control vector), then
    the generated tokens fading (t = 1 for the first). A call's rows of one prompt are its prefill
    when there are several; one row is a decode step (a prefill chunk holding a single token of a
    prompt would be counted as a step: an approximation this record accepts)."""

    def __init__(self, vector: ControlVector, strength: float, half_life: float, prompt_too: bool = False) -> None:
        self.vecs = {L: np.float32(strength) * vector.directions[L] for L in vector.layers}
        self.first, self.half_life, self.prompt_too = min(self.vecs), half_life, prompt_too

    def generate(self, engine: Engine, prompts: Sequence[str], sampling: Sampling, on_token=None,
                 share_prefix: bool = False) -> list[Completion]:
        seen: dict[int, int] = {}  # prompt -> output rows (or decode steps) edited so far, counted at the first layer
        factors: list[float] = []  # this call's rows -> their factor, set at the first layer

        def edit(layer: int, x: np.ndarray, keys: Sequence[int]) -> np.ndarray:
            if layer == self.first:
                counts = Counter(keys)
                prefill = {k for k, n in counts.items() if self.prompt_too and n > 1}  # full strength
                factors[:] = [1.0 if key in prefill else 0.5 ** (seen.get(key, 0) / self.half_life) for key in keys]
                for key in counts:
                    # a decode step counts one; after a prefill the first generated token's row is t = 1
                    seen[key] = max(seen.get(key, 0), 1) if key in prefill else seen.get(key, 0) + 1
            for row, factor in enumerate(factors):
                x[row] += np.float32(factor) * self.vecs[layer]
            return x

        with engine.activation_edit(edit, sorted(self.vecs), site="l_out", all_tokens=self.prompt_too):
            return engine.generate(prompts, sampling, share_prefix=share_prefix)


def read(engine: Engine, axis: PreferenceAxis, used: Sequence[str], steering: Fading, threads: int) -> None:
    """Print the report half's answers under ``steering`` and the judge's relevance of each (the
    question vector_vs_prompt.py asks: P(yes) >= 0.5 counts as addressing the request)."""
    bench = behaviour_bench(engine, axis, used, None)
    qs = list(bench.report)
    answers = [c.text for c in steering.generate(engine, [engine.prompt(q) for q in qs], bench.sampling, share_prefix=True)]
    engine.close()
    judge = open_judge("auto", None, JUDGE_RUNTIME.with_(threads=threads), needs=True)
    assert judge is not None
    p = judge.yes_probability(RELEVANCE_QUESTION, list(zip(qs, answers)))
    judge.close()
    for q, a, yes in zip(qs, answers, p):
        print(f"\n## {q}\n[{yes:.2f}] {a!r}")
    print(f"\njudge: {int((p >= 0.5).sum())} of {len(p)} answers address the request")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trait", required=True, choices=("french", "spanish", "brief", "capitals"))
    ap.add_argument("--vector", default=None, help="the vector file [vectors/MODEL/TRAIT.gguf]")
    ap.add_argument("--pairs", default=None, help="the pairs it was fitted on [vectors/MODEL/TRAIT.preferences.jsonl]")
    ap.add_argument("--half-life", type=float, default=8.0, help="answer rows over which the strength halves")
    ap.add_argument("--prompt-too", action="store_true", help="every prompt token at full strength too")
    ap.add_argument("--read", type=float, default=None, metavar="X",
                    help="no search: answer the report half at strength X and print each answer with the 1.5B "
                         "judge's P(yes) that it addresses the request")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    axis = BUILTIN_AXES[args.trait]
    vec_path = Path(args.vector or ROOT / f"vectors/{MODEL}/{args.trait}.gguf")
    pairs_path = Path(args.pairs or ROOT / f"vectors/{MODEL}/{args.trait}.preferences.jsonl")
    cv = read_control_vector(vec_path)
    used = list(dict.fromkeys(p.query for p in load_pairs(pairs_path)))
    engine = open_engine(resolve_model(MODEL), RuntimeSettings(threads=args.threads))
    if args.read is not None:
        read(engine, axis, used, Fading(cv, args.read, args.half_life, args.prompt_too), args.threads)
        return
    with behaviour_judge("auto", engine, axis) as judge:
        bench = behaviour_bench(engine, axis, used, judge)
        noise = random_vector(cv, 1)
        h = args.half_life
        pt = args.prompt_too
        cal = calibrate_behaviour(bench, lambda s: Fading(cv, s, h, pt), lambda s: Fading(noise, s, h, pt), start=0.125,
                                  on_trial=lambda t: print(f"  x{t.strength:g}: behaviour {100 * t.behaviour_rate:.0f}%, "
                                                           f"relevance {t.relevance:.2f}, fluency {t.fluency:.2f}, "
                                                           f"combined {t.combined:.2f}, loops {100 * t.loop_share:.0f}%, "
                                                           f"unanswered {100 * t.unanswered_share:.0f}%"
                                                           + (" (broken)" if t.broken else ""), flush=True))
    rows = {"unsteered": cal.report["unsteered"], "prompting": cal.report["prompting"],
            f"random x{cal.strength:g}": cal.report["random"], f"fading x{cal.strength:g}": cal.report["steered"]}
    print(f"{args.trait}, fading (half-life {h:g} rows{', prompt at full strength' if pt else ''}), {vec_path.name} (file: x{cv.default_strength_or_one:g}, "
          f"{cv.placement}): {cal.verdict}")
    print("\n".join(condition_lines(rows, 24)), flush=True)
    dest = ROOT / f"scripts/records/results/fading-{args.trait}-h{h:g}{'-prompt' if pt else ''}.json"
    dest.write_text(json.dumps({"trait": args.trait, "vector": str(vec_path.relative_to(ROOT)) if vec_path.is_relative_to(ROOT)
                                else str(vec_path), "half_life": h, "prompt_too": pt, "calibration": cal.as_dict()}, indent=1, default=str))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
