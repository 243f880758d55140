"""Issue 31, part 1, one candidate: the shipped French vector added only where the answer is being
written (the last prompt token, whose state gives the first answer token, and every generated
token) against llama.cpp's control vector, which is added at every token, the prompt's too.

    .venv/bin/python scripts/records/generated_only.py [--threads 2]

The same search and report as `steer` (strength_by_behaviour.calibrate_behaviour on the same
choose and report halves as the main job), the random null added the same way. Writes
results/generated-only-french.json and prints both tables. A research record (not API, not tested).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alignez_local.align.axes import BUILTIN_AXES
from alignez_local.align.behaviour_bench import CHOOSE_QUERIES, REPORT_QUERIES, axis_bench, split_heldout
from alignez_local.align.steering import Steering
from alignez_local.align.strength_by_behaviour import calibrate_behaviour, random_vector
from alignez_local.evaluation.behaviour_report import condition_lines
from alignez_local.formats.control_vector import ControlVector, read_control_vector
from alignez_local.llama.engine import Completion, Engine, Sampling
from alignez_local.models import resolve_model
from alignez_local.pipeline import STEER_QUERIES
from alignez_local.prompt_sets import heldout_queries, select_queries
from alignez_local.settings import RuntimeSettings, open_engine

ROOT = Path(__file__).resolve().parents[2]


class GeneratedOnly:
    """Duck-types Steering.generate: ``vector`` x ``strength`` added to the rows of the output
    positions only (Engine.activation_edit's default), never to the prompt's other tokens."""

    def __init__(self, vector: ControlVector, strength: float) -> None:
        self.vecs = {L: np.float32(strength) * vector.directions[L] for L in vector.layers}

    def generate(self, engine: Engine, prompts: Sequence[str], sampling: Sampling, on_token=None,
                 share_prefix: bool = False, on_done=None) -> list[Completion]:
        with engine.activation_edit(lambda L, x, _keys: x + self.vecs[L], list(self.vecs), site="l_out"):
            return engine.generate(prompts, sampling, on_token=on_token, share_prefix=share_prefix, on_done=on_done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    engine = open_engine(resolve_model("qwen2.5-coder-0.5b-instruct"), RuntimeSettings(threads=args.threads))
    axis = BUILTIN_AXES["french"]
    used = select_queries(None, STEER_QUERIES, axis="french")
    choose, report = split_heldout([q for q in heldout_queries("french", used) if q not in set(used)],
                                   CHOOSE_QUERIES, REPORT_QUERIES)
    bench = axis_bench(engine, axis, None, choose, report)
    cv = read_control_vector(ROOT / "vectors/qwen2.5-coder-0.5b-instruct/french.gguf")
    noise = random_vector(cv, 1)
    out = {}
    for name, make, null in (
            ("every token (llama.cpp's control vector)", lambda s: Steering.vector(cv, s),
             lambda s: Steering.vector(noise, s, "random")),
            ("generated tokens only", lambda s: GeneratedOnly(cv, s), lambda s: GeneratedOnly(noise, s))):
        cal = calibrate_behaviour(bench, make, null, start=0.125,
                                  on_trial=lambda t: print(f"  x{t.strength:g}: behaviour {100 * t.behaviour_rate:.0f}%, "
                                                           f"relevance {t.relevance:.2f}, fluency {t.fluency:.2f}, "
                                                           f"combined {t.combined:.2f}, loops {100 * t.loop_share:.0f}%"
                                                           + (" (broken)" if t.broken else ""), flush=True))
        rows = {"unsteered": cal.report["unsteered"], "prompting": cal.report["prompting"],
                f"random x{cal.strength:g}": cal.report["random"], f"vector x{cal.strength:g}": cal.report["steered"]}
        print(f"{name}: {cal.verdict}")
        print("\n".join(condition_lines(rows, 24)), flush=True)
        out[name] = cal.as_dict()
    dest = ROOT / "scripts/records/results/generated-only-french.json"
    dest.write_text(json.dumps(out, indent=1))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
