"""Preference pairs from the model's OWN better and worse samples, ranked by a judge or by itself.

    python scripts/records/ranked.py sample  [--n 64] [--k 4]
    python scripts/records/ranked.py rank judge|self [--rank-n N]
    python scripts/records/ranked.py pairs   [--gap 1.0]        # writes results/ranked-RANKER.jsonl
    python scripts/records/ranked.py calibrate PROFILE.gguf OUT.gguf   # the profile's strength (fit has none)

Hypothesis: persona contrasts fail on SmolLM2-135M because the model does not act out personas
(docs/results.md §1); a contrast between its own good and bad samples, which differ in real quality,
might give a direction that helps.

- ``sample``: K answers per query (helpful axis built-in queries 0..n-1; 120-151 stay held out for
  screen.py, 180-191 for calibration), temperature 0.8, top_p 0.9, top_k 40, repeat penalty 1.1,
  160 tokens, seed 1000*query_index + k.
- ``rank judge``: each answer scored on its own by the bundled judge (Qwen2.5-Coder-1.5B, score mode,
  log p(Yes) - log p(No)). ``rank self``: the same Judge class around SmolLM2-135M itself.
- ``pairs``: per query, best-scored answer as positive, worst as negative, kept when the score gap is
  at least ``--gap`` nats; records in the format ``alignez fit --prefs`` reads (recipe ``ranked``).
  Also prints how well the two rankers agree.

Everything is cached in results/ranked-smollm2.json after every chunk: a rerun resumes.
Caveat: the ``judge`` ranker uses the same judge model that screen.py evaluates with, so a gain from
its pairs may be the judge's taste (Goodhart); the ``self`` ranker has no such circularity.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from alignez_local.align.axes import get_axis
from alignez_local.evaluation.judge import Judge, open_judge
from alignez_local.prompt_sets import load_queries
from alignez_local.measures.refusal import is_refusal
from alignez_local.llama.engine import Sampling
from alignez_local.models import file_sha256
from alignez_local.settings import RuntimeSettings, open_engine

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m-instruct"
CACHE = HERE / "results" / "ranked-smollm2.json"
SAMPLING = dict(temperature=0.8, top_p=0.9, top_k=40, repeat_penalty=1.1, max_tokens=160)
THREADS = 1


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load() -> dict:
    if CACHE.exists():
        return json.loads(CACHE.read_text())
    return {"model": MODEL, "axis": "helpful", "sampling": SAMPLING, "seed_rule": "1000*query_index + k",
            "answers": {}, "scores": {"judge": {}, "self": {}}, "timings": {}}


def save(cache: dict) -> None:
    tmp = CACHE.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    tmp.replace(CACHE)


def seed_of(qi: int, k: int) -> int:
    return 1000 * qi + k


def sample(cache: dict, n: int, k: int) -> None:
    queries = load_queries(None, axis="helpful")[:n]
    todo = [(qi, j) for qi in range(n) for j in range(k)
            if len(cache["answers"].get(str(qi), {}).get("texts", [])) <= j]
    if not todo:
        log("sample: nothing to do")
        return
    t0 = time.time()
    with open_engine(MODEL, RuntimeSettings(threads=THREADS, parallel=8)) as eng:
        cache["model_sha256"] = file_sha256(eng.path)
        cache["model_ident"] = {"file": eng.path.name, "sha256": cache["model_sha256"], "arch": eng.arch,
                                "n_layer": eng.n_layer, "n_embd": eng.n_embd}
        step = 16
        for start in range(0, len(todo), step):
            part = todo[start : start + step]
            prompts = [eng.prompt(queries[qi]) for qi, _ in part]
            sps = [Sampling(seed=seed_of(qi, j), stop=eng.default_stop, **SAMPLING) for qi, j in part]
            comps = eng.generate(prompts, sps)
            for (qi, j), c in zip(part, comps):
                rec = cache["answers"].setdefault(str(qi), {"query": queries[qi], "texts": [], "finish": [], "seeds": []})
                assert len(rec["texts"]) == j, (qi, j)  # answers are appended in order
                rec["texts"].append(c.text.strip())
                rec["finish"].append(c.finish_reason)
                rec["seeds"].append(seed_of(qi, j))
            save(cache)
            log(f"sample {start + len(part)}/{len(todo)} ({time.time() - t0:.0f} s)")
    cache["timings"]["sample_s"] = round(cache["timings"].get("sample_s", 0.0) + time.time() - t0, 1)
    save(cache)


def rank(cache: dict, ranker: str, n: int | None = None) -> None:
    """Score every sampled answer of the first ``n`` queries (None: all) with ``ranker``."""
    sc = cache["scores"][ranker]
    todo = [(qi, j) for qi, rec in sorted(cache["answers"].items(), key=lambda x: int(x[0]))
            if n is None or int(qi) < n
            for j in range(len(rec["texts"])) if len(sc.get(qi, [])) <= j]
    if not todo:
        log(f"rank {ranker}: nothing to do")
        return
    t0 = time.time()
    if ranker == "judge":
        judge = open_judge(settings=RuntimeSettings(threads=THREADS, n_ctx=8192, parallel=4))
    else:
        judge = Judge(open_engine(MODEL, RuntimeSettings(threads=THREADS, n_ctx=8192, parallel=8)))
    with judge:
        cache.setdefault("rankers", {})[ranker] = judge.describe()["model_name"]
        step = 8
        for start in range(0, len(todo), step):
            part = todo[start : start + step]
            vals = judge.scores([(cache["answers"][qi]["query"], cache["answers"][qi]["texts"][j]) for qi, j in part])
            for (qi, j), v in zip(part, vals):
                lst = sc.setdefault(qi, [])
                assert len(lst) == j, (qi, j)
                lst.append(float(v))
            save(cache)
            log(f"rank {ranker} {start + len(part)}/{len(todo)} ({time.time() - t0:.0f} s)")
    cache["timings"][f"rank_{ranker}_s"] = round(cache["timings"].get(f"rank_{ranker}_s", 0.0) + time.time() - t0, 1)
    save(cache)


def complete(cache: dict, ranker: str) -> list[str]:
    return [qi for qi, rec in sorted(cache["answers"].items(), key=lambda x: int(x[0]))
            if len(cache["scores"][ranker].get(qi, [])) == len(rec["texts"]) >= 2]


def pairs(cache: dict, gap: float) -> None:
    axis = get_axis("helpful")
    summary = {}
    for ranker in ("judge", "self"):
        qis = complete(cache, ranker)
        if not qis:
            continue
        out = HERE / "results" / f"ranked-{ranker}.jsonl"
        kept, gaps = [], []
        for qi in qis:
            rec, s = cache["answers"][qi], np.array(cache["scores"][ranker][qi])
            b, w = int(np.argmax(s)), int(np.argmin(s))
            gaps.append(float(s[b] - s[w]))
            if s[b] - s[w] < gap:
                continue
            pos, neg = rec["texts"][b], rec["texts"][w]
            pid = hashlib.sha256(json.dumps(["ranked", ranker, qi, b, w]).encode()).hexdigest()[:16]
            kept.append({
                "id": pid, "query": rec["query"], "response_index": 0, "recipe": "ranked",
                "axis": {"name": axis.name, "positive": axis.positive, "negative": axis.negative},
                "characteristics": {"positive": "", "negative": ""},
                "response": {"positive": pos, "negative": neg},
                "refusal": {"positive": is_refusal(pos), "negative": is_refusal(neg)},
                "finish_reason": {"positive": rec["finish"][b], "negative": rec["finish"][w]},
                "sampling": {**SAMPLING, "ranker": ranker, "best_k": b, "worst_k": w,
                             "score_positive": float(s[b]), "score_negative": float(s[w])},
                "seed": {"positive": rec["seeds"][b], "negative": rec["seeds"][w]},
                "model": cache.get("model_ident", {"file": MODEL}),
            })
        out.write_text("".join(json.dumps(r) + "\n" for r in kept))
        summary[ranker] = {"queries": len(qis), "pairs_kept": len(kept), "gap_min_nats": gap,
                           "gap_median": round(float(np.median(gaps)), 3),
                           "refusal_pairs": sum(r["refusal"]["positive"] or r["refusal"]["negative"] for r in kept),
                           "file": str(out.relative_to(HERE.parent.parent))}
        log(f"{ranker}: {len(kept)}/{len(qis)} pairs with gap >= {gap} nats (median gap {np.median(gaps):.2f}) -> {out}")
    both = sorted(set(complete(cache, "judge")) & set(complete(cache, "self")), key=int)
    if both:
        rhos, best_same, worst_same, pos_above = [], 0, 0, 0
        sj_all, ss_all = [], []
        for qi in both:
            sj, ss = np.array(cache["scores"]["judge"][qi]), np.array(cache["scores"]["self"][qi])
            r = spearmanr(sj, ss).statistic
            if np.isfinite(r):
                rhos.append(float(r))
            best_same += int(np.argmax(sj) == np.argmax(ss))
            worst_same += int(np.argmin(sj) == np.argmin(ss))
            # does the self-ranker's pair look right to the judge?
            pos_above += int(sj[np.argmax(ss)] > sj[np.argmin(ss)])
            sj_all += list(sj - sj.mean())
            ss_all += list(ss - ss.mean())
        k = len(cache["answers"][both[0]]["texts"])
        summary["agreement"] = {
            "queries": len(both), "k": k,
            "spearman_within_query_mean": round(float(np.mean(rhos)), 3),
            "spearman_pooled_centred": round(float(spearmanr(sj_all, ss_all).statistic), 3),
            "same_best": best_same, "same_worst": worst_same, "chance_each": round(len(both) / k, 1),
            "self_pair_ordered_as_judge": pos_above,
        }
        log(f"agreement: {summary['agreement']}")
    cache["pairs_summary"] = summary
    save(cache)


def calibrate(profile_in: str, profile_out: str) -> None:
    from alignez_local.align.strength_by_kl import kl_calibrated_profile
    from alignez_local.formats.profile import load_profile, save_profile
    from alignez_local.prompt_sets import calibration_prompts
    prof = load_profile(profile_in)
    used = load_queries(None, axis="helpful")[:64]
    t0 = time.time()
    with open_engine(MODEL, RuntimeSettings(threads=THREADS, parallel=8)) as eng:
        prof = kl_calibrated_profile(eng, prof, calibration_prompts(eng, "helpful", used), on_status=log)
    save_profile(profile_out, prof)
    log(f"{profile_out}: calibrated strength {prof.default_strength} ({time.time() - t0:.0f} s)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["sample", "rank", "pairs", "calibrate"])
    ap.add_argument("args", nargs="*")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--gap", type=float, default=1.0)
    ap.add_argument("--rank-n", type=int, default=None, help="rank only the first N queries (budget)")
    a = ap.parse_args()
    if a.stage == "calibrate":
        calibrate(*a.args)
        return
    cache = load()
    if a.stage == "sample":
        sample(cache, a.n, a.k)
    elif a.stage == "rank":
        rank(cache, a.args[0], a.rank_n)
    else:
        pairs(cache, a.gap)


if __name__ == "__main__":
    main()
