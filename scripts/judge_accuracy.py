"""How well a judge model reads behaviours and relevance: hand-made examples, figures printed.

    .venv/bin/python scripts/judge_accuracy.py qwen2.5-coder-0.5b-instruct smollm2-135m-instruct [--threads 1]

The examples (alignez_local/data/judge_examples.jsonl) come in pairs: one answer that shows the
persona (or addresses the question) and one that does not. Two figures per check:
- accuracy: P(Yes) >= 0.5 exactly when the example is a positive one;
- ordering: within each pair, the positive answer gets the higher P(Yes) (what steering's
  comparisons rely on: a biased but ordered judge still ranks conditions correctly).
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources

import numpy as np

from alignez_local.evaluation.behaviour import RELEVANCE_QUESTION, JudgeMeasure
from alignez_local.evaluation.judge import Judge
from alignez_local.settings import RuntimeSettings, open_engine


def load_examples() -> list[dict]:
    text = resources.files("alignez_local").joinpath("data/judge_examples.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def judge_probabilities(judge: Judge, examples: list[dict]) -> np.ndarray:
    """Return P(Yes) per example: the behaviour question of its persona, or the relevance question."""
    out = np.zeros(len(examples))
    for i, ex in enumerate(examples):
        question = (JudgeMeasure("judge", "", persona=ex["persona"]).question if ex["check"] == "behaviour"
                    else RELEVANCE_QUESTION)
        out[i] = judge.yes_probability(question, [(ex["question"], ex["answer"])])[0]
    return out


def figures(examples: list[dict], p: np.ndarray, check: str) -> tuple[int, int, int, int]:
    """Return (right, n, pairs ordered right, pairs) for one check."""
    idx = [i for i, ex in enumerate(examples) if ex["check"] == check]
    right = sum((p[i] >= 0.5) == examples[i]["expected"] for i in idx)
    pairs = [(a, b) for a, b in zip(idx[::2], idx[1::2])]
    ordered = sum((p[a] > p[b]) == (examples[a]["expected"] and not examples[b]["expected"]) for a, b in pairs)
    return right, len(idx), ordered, len(pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    examples = load_examples()
    print(f"{'judge':<32} {'check':<10} {'accuracy':>9} {'ordering':>9} {'s':>6}")
    for name in args.models:
        t0 = time.time()
        with Judge(open_engine(name, RuntimeSettings(threads=args.threads, n_ctx=4096, parallel=4))) as judge:
            p = judge_probabilities(judge, examples)
        took = time.time() - t0
        for check in ("behaviour", "relevance"):
            right, n, ordered, pairs = figures(examples, p, check)
            print(f"{name:<32} {check:<10} {right:>4}/{n:<4} {ordered:>4}/{pairs:<4} {took:>6.0f}")


if __name__ == "__main__":
    main()
