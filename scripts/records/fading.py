"""Issue 31, part 1, one candidate: a strength that fades over the answer. The vector is added where the
answer is written (the last prompt token and each generated token, as the answer-only placement) at
strength x 0.5 ** (t / HALF_LIFE) for the answer's t-th row: full strength where the answer chooses its
language, register and shape, then less and less, so the later tokens follow the answer's own start
instead of being pushed off the request.

    .venv/bin/python scripts/records/fading.py --trait french [--half-life 8] [--vector FILE] [--threads 1]

The bench is steer's own for that trait (the held-out queries not in the vector's pairs, split into the
same choose and report halves, the same judge), the same strength search (calibrate_behaviour), the
random null faded the same way. Prints the trials and the report table beside the file's own figures;
writes results/fading-TRAIT-hH.json with every answer. A research record (not API, not tested).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alignez_local.align.axes import BUILTIN_AXES
from alignez_local.align.preferences import load_pairs
from alignez_local.align.strength_by_behaviour import calibrate_behaviour, random_vector
from alignez_local.evaluation.behaviour_eval import behaviour_judge
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
    t-th output row of each prompt (t = 0: the last prompt token, then each generated token)."""

    def __init__(self, vector: ControlVector, strength: float, half_life: float) -> None:
        self.vecs = {L: np.float32(strength) * vector.directions[L] for L in vector.layers}
        self.first, self.half_life = min(self.vecs), half_life

    def generate(self, engine: Engine, prompts: Sequence[str], sampling: Sampling, on_token=None,
                 share_prefix: bool = False) -> list[Completion]:
        seen: dict[int, int] = {}  # prompt -> output rows edited so far (counted at the first layer)
        step: dict[int, int] = {}

        def edit(layer: int, x: np.ndarray, keys: Sequence[int]) -> np.ndarray:
            for row, key in enumerate(keys):
                if layer == self.first:
                    step[key] = seen.get(key, 0)
                    seen[key] = step[key] + 1
                x[row] += np.float32(0.5 ** (step[key] / self.half_life)) * self.vecs[layer]
            return x

        with engine.activation_edit(edit, sorted(self.vecs), site="l_out"):
            return engine.generate(prompts, sampling, share_prefix=share_prefix)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trait", required=True, choices=("french", "spanish", "brief", "capitals"))
    ap.add_argument("--vector", default=None, help="the vector file [vectors/MODEL/TRAIT.gguf]")
    ap.add_argument("--pairs", default=None, help="the pairs it was fitted on [vectors/MODEL/TRAIT.preferences.jsonl]")
    ap.add_argument("--half-life", type=float, default=8.0, help="answer rows over which the strength halves")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    axis = BUILTIN_AXES[args.trait]
    vec_path = Path(args.vector or ROOT / f"vectors/{MODEL}/{args.trait}.gguf")
    pairs_path = Path(args.pairs or ROOT / f"vectors/{MODEL}/{args.trait}.preferences.jsonl")
    cv = read_control_vector(vec_path)
    used = list(dict.fromkeys(p.query for p in load_pairs(pairs_path)))
    engine = open_engine(resolve_model(MODEL), RuntimeSettings(threads=args.threads))
    with behaviour_judge("auto", engine, axis) as judge:
        bench = behaviour_bench(engine, axis, used, judge)
        noise = random_vector(cv, 1)
        h = args.half_life
        cal = calibrate_behaviour(bench, lambda s: Fading(cv, s, h), lambda s: Fading(noise, s, h), start=0.125,
                                  on_trial=lambda t: print(f"  x{t.strength:g}: behaviour {100 * t.behaviour_rate:.0f}%, "
                                                           f"relevance {t.relevance:.2f}, fluency {t.fluency:.2f}, "
                                                           f"combined {t.combined:.2f}, loops {100 * t.loop_share:.0f}%, "
                                                           f"unanswered {100 * t.unanswered_share:.0f}%"
                                                           + (" (broken)" if t.broken else ""), flush=True))
    rows = {"unsteered": cal.report["unsteered"], "prompting": cal.report["prompting"],
            f"random x{cal.strength:g}": cal.report["random"], f"fading x{cal.strength:g}": cal.report["steered"]}
    print(f"{args.trait}, fading (half-life {h:g} rows), {vec_path.name} (file: x{cv.default_strength_or_one:g}, "
          f"{cv.placement}): {cal.verdict}")
    print("\n".join(condition_lines(rows, 24)), flush=True)
    dest = ROOT / f"scripts/records/results/fading-{args.trait}-h{h:g}.json"
    dest.write_text(json.dumps({"trait": args.trait, "vector": str(vec_path.relative_to(ROOT)) if vec_path.is_relative_to(ROOT)
                                else str(vec_path), "half_life": h, "calibration": cal.as_dict()}, indent=1, default=str))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
