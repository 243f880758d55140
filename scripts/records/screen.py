"""Screen steering conditions with the local judge on held-out queries, before a full evaluation.

    python scripts/records/screen.py NAME COND [COND ...] [--model smollm2-135m-instruct] [--n 32]

COND is one of ``plain``, ``system:positive`` / ``system:negative`` (the axis guide as a system
prompt: the ceiling a persona can reach, and a check that the judge sees the difference),
``vector:FILE:STRENGTH`` or ``profile:FILE:STRENGTH``. Queries are the axis's built-in queries
120..120+n: never used by ``steer`` with its default 96, nor by calibration (the last 16), nor by
the evaluation set. Greedy, 128 tokens, repeat penalty 1.1, as ``alignez eval``. Answers and judge
scores are cached in results/screen-NAME.json, so conditions can be added run by run; each
condition is reported against ``plain`` (net win rate, 0.5-nat margin, bootstrap 95% interval).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from alignez_local.align.axes import get_axis
from alignez_local.align.steering import Steering
from alignez_local.evaluation.judge import open_judge
from alignez_local.measures.verdicts import verdicts_from_scores
from alignez_local.prompt_sets import load_queries
from alignez_local.measures.refusal import is_refusal
from alignez_local.measures.statistics import outcome_stats
from alignez_local.llama.engine import Sampling
from alignez_local.settings import RuntimeSettings, open_engine
from alignez_local.specs import parse_steering_spec

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("conds", nargs="+")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--axis", default="helpful")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--start", type=int, default=120)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--no-judge", action="store_true", help="Only count refusals (keyword detector).")
    ap.add_argument("--prompts", default=None, help="A plain-text prompt file instead of the axis's queries.")
    a = ap.parse_args()
    cache_path = HERE / "results" / f"screen-{a.name}.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {"answers": {}, "scores": {}}
    queries = load_queries(a.prompts, axis=a.axis)[a.start : a.start + a.n]
    axis = get_axis(a.axis)
    sampling = Sampling(temperature=0.0, max_tokens=a.max_tokens, repeat_penalty=1.1, seed=0)
    todo = [c for c in ["plain", *a.conds] if c not in cache["answers"]]
    if todo:
        with open_engine(a.model, RuntimeSettings(threads=a.threads)) as eng:
            for cond in todo:
                kind, _, rest = cond.partition(":")
                st = None
                if kind == "system":
                    prompts = [eng.prompt(q, system=axis.guide(rest)) for q in queries]
                else:
                    prompts = [eng.prompt(q) for q in queries]
                    if kind in ("vector", "profile"):
                        st = Steering.from_specs(eng, **{f"{kind}s": [parse_steering_spec(rest)]})
                comps = st.generate(eng, prompts, sampling) if st is not None else eng.generate(prompts, sampling)
                cache["answers"][cond] = [c.text for c in comps]
                print(f"answered {cond}", flush=True)
                cache_path.write_text(json.dumps(cache, indent=1))
    for c in ["plain", *a.conds]:
        n_ref = sum(is_refusal(t) for t in cache["answers"][c])
        print(f"{c}: refusals (keywords) {n_ref}/{len(queries)}")
    if a.no_judge:
        return
    pairs = {(q, t) for c in ["plain", *a.conds] for q, t in zip(queries, cache["answers"][c])}
    need = sorted(p for p in pairs if json.dumps(p) not in cache["scores"])
    if need:
        with open_judge(settings=RuntimeSettings(threads=a.threads, n_ctx=8192, parallel=4)) as judge:
            vals = judge.scores(need, on_progress=lambda d, t: print(f"judge {d}/{t}", flush=True))
        for p, v in zip(need, vals):
            cache["scores"][json.dumps(p)] = float(v)
        cache_path.write_text(json.dumps(cache, indent=1))
    base = np.array([cache["scores"][json.dumps([q, t])] for q, t in zip(queries, cache["answers"]["plain"])])
    print(f"plain: mean judge score {base.mean():+.2f}")
    for c in a.conds:
        sc = np.array([cache["scores"][json.dumps([q, t])] for q, t in zip(queries, cache["answers"][c])])
        v = verdicts_from_scores(sc, base, 0.5)
        st = outcome_stats([x.outcome for x in v])
        same = sum(x == y for x, y in zip(cache["answers"][c], cache["answers"]["plain"]))
        lo, hi = st["net_win_ci95"]
        print(f"{c}: mean {sc.mean():+.2f}  {st['wins']}/{st['ties']}/{st['losses']}  net {100 * st['net_win_rate']:+.1f}% "
              f"[{100 * lo:+.0f}, {100 * hi:+.0f}]  identical-to-plain {same}/{len(queries)}")


if __name__ == "__main__":
    main()
