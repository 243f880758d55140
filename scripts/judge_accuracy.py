"""How well a judge model reads behaviours and relevance, on hand-made examples (figures printed).

    .venv/bin/python scripts/judge_accuracy.py qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct [--threads 1]
    .venv/bin/python scripts/judge_accuracy.py --pmi qwen2.5-coder-0.5b-instruct    # relevance without a judge

The examples and the two figures (accuracy, ordering) are described in
``alignez_local/evaluation/judge_check.py``. With --pmi the model is no judge: relevance is its own
pointwise mutual information reading (``behaviour.pmi_relevance``), as ``steer`` reads it by default.
"""

from __future__ import annotations

import argparse
import time

from alignez_local.align.behaviour_bench import unsteered_nll
from alignez_local.measures.behaviour import MEASURES
from alignez_local.measures.scoring import Scorer
from alignez_local.evaluation.judge import Judge
from alignez_local.evaluation.judge_check import figures, judge_probabilities, load_examples, pmi_probabilities
from alignez_local.settings import RuntimeSettings, open_engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--pmi", action="store_true", help="Relevance by the model's own PMI reading, no judge.")
    ap.add_argument("--question", action="append", default=[], metavar="TEMPLATE",
                    help="Another wording of the behaviour question, with {persona} (repeatable): its figures beside.")
    args = ap.parse_args()
    print(f"{'reader':<36} {'check':<10} {'accuracy':>9} {'ordering':>9} {'s':>6}")
    for name in args.models:
        t0 = time.time()
        engine = open_engine(name, RuntimeSettings(threads=args.threads, n_ctx=4096, parallel=4))
        if args.pmi:
            examples = load_examples("relevance")
            p = pmi_probabilities(Scorer(MEASURES["capitals"], unsteered_nll(engine)), examples)
            checks, label = ("relevance",), f"{name} (PMI)"
        else:
            examples = load_examples()
            judge = Judge(engine)
            # The persona's question alone, then against the axis's negative persona (what steer uses).
            single = judge_probabilities(judge, load_examples("behaviour"), contrast=False)
            right, n, ordered, pairs = figures(load_examples("behaviour"), single, "behaviour")
            print(f"{name + ' (judge, one pole)':<36} {'behaviour':<10} {right:>4}/{n:<4} {ordered:>4}/{pairs:<4} {time.time() - t0:>6.0f}")
            for template in args.question:
                other = judge_probabilities(judge, load_examples("behaviour"), template=template)
                right, n, ordered, pairs = figures(load_examples("behaviour"), other, "behaviour")
                print(f"  {template!r} vs negative: behaviour {right}/{n} right, {ordered}/{pairs} ordered")
            p = judge_probabilities(judge, examples)
            checks, label = ("behaviour", "relevance"), f"{name} (judge)"
        engine.close()
        for check in checks:
            right, n, ordered, pairs = figures(examples, p, check)
            print(f"{label + (' vs negative' if check == 'behaviour' and not args.pmi else ''):<36} {check:<10} "
                  f"{right:>4}/{n:<4} {ordered:>4}/{pairs:<4} {time.time() - t0:>6.0f}")


if __name__ == "__main__":
    main()
