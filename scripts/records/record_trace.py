"""Record a progress trace of a real generation run, for tests/test_progress.py to replay.

    python scripts/records/record_trace.py [--model PATH_OR_NAME] [--limit 40] [--tokens 48]

Without --model it writes the suite's tiny random-weight model and runs on it (seconds of CPU).
Sequences stop at random there, so pairs differ in cost, which is what the estimator has to handle.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from alignez_local.align.axes import get_axis
from alignez_local.align.preferences import GenerationSettings, generate_preferences
from alignez_local.prompt_sets import load_queries
from alignez_local.progress import Progress
from alignez_local.settings import RuntimeSettings, open_engine

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--recipe", default="paper")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from alignez_local.testing import write_tiny_llama

            model = str(write_tiny_llama(Path(tmp) / "tiny.gguf"))
        engine = open_engine(model, RuntimeSettings(threads=1, n_ctx=2048, parallel=2))
        queries = load_queries()[: args.limit]
        bar = Progress(len(queries), "generate helpful")
        settings = GenerationSettings(characteristics_tokens=args.tokens // 2, response_tokens=args.tokens)
        generate_preferences(engine, queries, get_axis("helpful"), Path(tmp) / "p.jsonl", settings,
                             recipe=args.recipe, progress=bar, selfcheck=None)
    name = "tiny" if args.model is None else Path(args.model).stem
    out = HERE / "results" / f"progress-trace-{name}-{args.recipe}.json"
    out.write_text(json.dumps({"model": name, "recipe": args.recipe, "items_total": len(queries),
                               "points": bar.trace.points}) + "\n")
    print(out)


if __name__ == "__main__":
    main()
