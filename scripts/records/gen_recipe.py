"""Generate preference pairs with one recipe on a bundled model (an experiment, run nice'd).

    python scripts/records/gen_recipe.py RECIPE [--axis helpful] [--limit 64] [--tokens 96]

Writes scripts/records/data/<model>-<axis>-<recipe>.jsonl and appends the wall time to
scripts/records/results/gen_times.json. One llama.cpp thread: on a shared 2-core machine the
OpenMP barrier of two threads spins against other jobs and runs several times slower.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from alignez_local.align.axes import get_axis
from alignez_local.align.preferences import GenerationSettings, generate_preferences
from alignez_local.prompt_sets import load_queries
from alignez_local.models import file_sha256, resolve_model
from alignez_local.progress import Progress
from alignez_local.settings import RuntimeSettings, open_engine

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--axis", default="helpful")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--responses", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=32)
    args = ap.parse_args()
    # 32 sequences per batch: decoding a 135M model is far cheaper per token in a wide batch.
    engine = open_engine(args.model, RuntimeSettings(threads=args.threads, n_ctx=256 * args.parallel, parallel=args.parallel))
    queries = load_queries(axis=args.axis)[: args.limit]
    out = HERE / "data" / f"{args.model}-{args.axis}-{args.recipe}.jsonl"
    settings = GenerationSettings(response_tokens=args.tokens, responses_per_query=args.responses)
    t0 = time.monotonic()
    bar = Progress(len(queries) * args.responses, f"generate {args.axis}")
    written, had = generate_preferences(engine, queries, get_axis(args.axis), out, settings,
                                        file_sha256(resolve_model(args.model)), recipe=args.recipe, selfcheck=None,
                                        progress=bar)
    wall = time.monotonic() - t0
    # The progress trace (seconds, pairs, token work) is the recorded trace tests/test_progress.py replays.
    trace = HERE / "results" / f"progress-trace-{args.model}-{args.axis}-{args.recipe}.json"
    trace.write_text(json.dumps({"items_total": bar.total - had, "points": bar.trace.points}) + "\n")
    times = HERE / "results" / "gen_times.json"
    log = json.loads(times.read_text()) if times.exists() else []
    log.append({"model": args.model, "axis": args.axis, "recipe": args.recipe, "queries": len(queries),
                "response_tokens": args.tokens, "written": written, "had": had, "wall_s": round(wall, 1),
                "threads": args.threads, "parallel": args.parallel, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    times.write_text(json.dumps(log, indent=1) + "\n")
    print(f"{args.recipe}: wrote {written} (had {had}) in {wall:.0f} s -> {out}")


if __name__ == "__main__":
    main()
