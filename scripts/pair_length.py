"""How short can the pairs be? The vector from pairs cut at N tokens (and from fewer queries) beside
the vector from the full pairs, as the cosine per steered layer and the norm ratio.

    .venv/bin/python scripts/pair_length.py runs/main-job-check/preferences.jsonl \
        [-m qwen2.5-coder-0.5b-instruct] [--caps 96,64,48,32,24] [--queries 64,32] [--threads 1]

The pairs are the ones ``steer`` fits on (self-check rule and the axis's behaviour filter). Each
answer is cut to its first N tokens, so a cap N is what ``steer --response-tokens N`` would have
written with the same seeds (the pairs' sampling is seeded per pair and side); the vector is the
difference of the mean states over the answers on the middle third of the layers, as steer's. A
benchmark, not a test: it prints its figures and the machine beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from alignez_local.align.directions import mean_difference
from alignez_local.align.fit import capture_layers, capture_pairs
from alignez_local.align.pair_filter import keep_contrasting
from alignez_local.align.preferences import load_records, load_selected_pairs
from alignez_local.align.vectors import middle_layers, pairs_measure
from alignez_local.models import resolve_model
from alignez_local.settings import RuntimeSettings, open_engine
from bench_steer import cpu_model  # scripts/ is on the path when a script runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pairs")
    ap.add_argument("-m", "--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--caps", default="96,64,48,32,24")
    ap.add_argument("--queries", default="64,48,32")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    engine = open_engine(resolve_model(args.model), RuntimeSettings(threads=args.threads))
    n_queries = len({r["query"] for r in load_records(args.pairs)})
    pairs, _ = load_selected_pairs(args.pairs)
    pairs, _ = keep_contrasting(pairs, pairs_measure(pairs[0]))
    layers = middle_layers(engine.n_layer)
    read = capture_layers(engine.n_layer, layers)[: max(layers) + 1]
    print(f"{cpu_model()}; {args.model}; {len(pairs)} pairs kept; layers {layers[0]}-{layers[-1]}; {args.threads} thread(s)")

    def cut(text: str, n: int) -> str:
        return engine.detokenize(engine.tokenize(text, add_bos=False)[:n])

    vecs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for cap in sorted({int(c) for c in args.caps.split(",")}, reverse=True):
        short = [dataclasses.replace(p, positive=cut(p.positive, cap), negative=cut(p.negative, cap)) for p in pairs]
        t0 = time.monotonic()
        pos, neg = capture_pairs(engine, short, "l_out", pool="mean", quiet=True, layers=read)
        vecs[cap] = (pos, neg)
        print(f"cap {cap:3d}: capture {time.monotonic() - t0:.0f} s", flush=True)
    full_cap = max(vecs)
    fp, fn = vecs[full_cap]
    ref = mean_difference(fp, fn)[layers]
    print(f"\ncosine to the vector from all {len(pairs)} pairs at {full_cap} tokens (min / mean over layers), norm ratio")
    print("queries  " + "  ".join(f"{c:>17d}" for c in sorted(vecs, reverse=True)))
    for nq in sorted({int(q) for q in args.queries.split(",")}, reverse=True):
        # The first pairs in file order (steer's --limit takes the first queries of the set), as many
        # as the kept pairs' share of the file's queries: 29 of 58 kept for 32 of 64 queries.
        ids = list(range(max(1, round(len(pairs) * nq / n_queries))))
        row = []
        for cap in sorted(vecs, reverse=True):
            pos, neg = vecs[cap]
            v = mean_difference(pos[ids], neg[ids])[layers]
            cos = np.sum(v * ref, axis=1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(ref, axis=1))
            ratio = float(np.mean(np.linalg.norm(v, axis=1) / np.linalg.norm(ref, axis=1)))
            row.append(f"{cos.min():.3f}/{cos.mean():.3f} x{ratio:.2f}")
        print(f"{nq:7d}  " + "  ".join(f"{r:>17s}" for r in row) + f"   ({len(ids)} pairs)")


if __name__ == "__main__":
    main()
