"""Measure one preference file: self-check agreement and held-out pair accuracy, per pool and filter.

    python scripts/records/measure.py DATA.jsonl [--model smollm2-135m-instruct] [--site ffn_out]

1. Both self-checks (pairwise, likelihood) on every pair; cached beside the data as *.checked.jsonl.
2. Activations of both answers at every layer, pooled two ways: ``last`` token (what fit does today)
   and ``mean`` over the response tokens.
3. Per filter (none; each check, dropping or flipping), per pool: 5-fold cross-validated pair
   accuracy per layer (SVD first direction fitted on 4 folds, scored on the fifth, so every kept pair
   is held out once), and fit_layer's own single 20% split (fit_profile's diagnostic). Accuracy is
   reported twice: on the filtered pairs with their (possibly flipped) labels, and on ALL non-refusal
   pairs with the labels as generated (a filter that only removes hard pairs does not gain there).

Writes scripts/records/results/<data name>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from alignez_local.align.directions import fit_layer, find_directions, select_layers, similar_pair_mask
from alignez_local.align.selfcheck import likelihood_scores, pairwise_scores, refusal_reason, select_pairs
from alignez_local.fileio import read_jsonl
from alignez_local.llama.engine import Engine
from alignez_local.settings import RuntimeSettings, open_engine

HERE = Path(__file__).resolve().parent
FOLDS = 5


def checked_records(engine: Engine | None, data: Path, limit: int, checks: tuple[str, ...]) -> list[dict[str, Any]]:
    """Return the first ``limit`` records with the ``checks`` stored under their names, cached per check."""
    recs = [dict(r) for r in read_jsonl(data)][:limit]
    for check in checks:
        cache = data.with_suffix(f".{check}{limit}.json")
        if not cache.exists():
            if engine is None:
                continue
            t0 = time.monotonic()
            scores = (pairwise_scores if check == "pairwise" else likelihood_scores)(engine, recs)
            cache.write_text(json.dumps({"seconds": time.monotonic() - t0, "scores": scores}) + "\n")
        stored = json.loads(cache.read_text())
        for r, sc in zip(recs, stored["scores"]):
            r[check] = sc
            r.setdefault("check_seconds", {})[check] = stored["seconds"] / len(recs)
    return recs


def capture(engine: Engine, recs: list[dict[str, Any]], site: str, pools: tuple[str, ...] = ("last", "mean")) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return {pool: (pos, neg)} activations (pairs x layers x n_embd) for each pool (last, mean)."""
    prompts = [engine.prompt(str(r["query"])) for r in recs]
    texts = [p + str(r["response"][s]) for s in ("positive", "negative") for p, r in zip(prompts, recs)]
    starts = [len(engine.tokenize(p)) for p in prompts] * 2
    layers = list(range(engine.n_layer))
    n = len(recs)
    out = {}
    for pool in pools:
        acts = engine.capture(texts, layers, site=site, reduce=pool, mean_from=starts if pool == "mean" else None)
        out[pool] = (acts[:n].astype(np.float64), acts[n:].astype(np.float64))
    return out


def cv_accuracy(pos: np.ndarray, neg: np.ndarray, fit_idx: np.ndarray, signs: np.ndarray,
                all_idx: np.ndarray, orig_signs: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Return (accuracy on the filtered pairs, accuracy on all pairs as generated), both held out.

    Folds split the filtered pairs; every pair of ``all_idx`` outside the filter is scored by the
    direction of the fold it would fall in (a random fold), so it is held out too.
    """
    rng = np.random.default_rng(seed)
    fold_of = {int(i): f for i, f in zip(fit_idx, rng.permutation(len(fit_idx)) % FOLDS)}
    for i in all_idx:
        fold_of.setdefault(int(i), int(rng.integers(FOLDS)))
    hit_f, n_f, hit_a, n_a = 0, 0, 0, 0
    for f in range(FOLDS):
        train = [j for j, i in enumerate(fit_idx) if fold_of[int(i)] != f]
        tp, tn = _labelled(pos, neg, fit_idx[train], signs[train])
        keep = similar_pair_mask(tp, tn, 0.8)
        if keep.sum() < 2:
            continue
        d = find_directions(tp[keep], tn[keep], "svd")[0].astype(np.float64)
        test_f = [j for j, i in enumerate(fit_idx) if fold_of[int(i)] == f]
        qp, qn = _labelled(pos, neg, fit_idx[test_f], signs[test_f])
        hit_f += int(((qp - qn) @ d > 0).sum()); n_f += len(test_f)
        test_a = [j for j, i in enumerate(all_idx) if fold_of[int(i)] == f]
        ap, an = _labelled(pos, neg, all_idx[test_a], orig_signs[test_a])
        hit_a += int(((ap - an) @ d > 0).sum()); n_a += len(test_a)
    return hit_f / max(n_f, 1), hit_a / max(n_a, 1)


def _labelled(pos: np.ndarray, neg: np.ndarray, idx: np.ndarray, signs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, q = pos[idx], neg[idx]
    flip = signs < 0
    p2, q2 = p.copy(), q.copy()
    p2[flip], q2[flip] = q[flip], p[flip]
    return p2, q2


def variants(recs: list[dict[str, Any]], checks: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray, dict[str, Any]]]:
    """Return {name: (pair indices, +1/-1 labels, select_pairs stats)} for every filter."""
    out = {}
    base = np.array([i for i, r in enumerate(recs) if not refusal_reason(r)])
    out["none"] = (base, np.ones(len(base)), {"kept": len(base), "dropped_refusal": len(recs) - len(base)})
    for check in checks:
        tagged = [{**r, "selfcheck": r[check], "_i": i} for i, r in enumerate(recs)]
        for flip in (False, True):
            kept, flipped, _, stats = select_pairs(tagged, flip=flip)
            idx = np.array([r["_i"] for r in kept] + [r["_i"] for r in flipped])
            signs = np.array([1.0] * len(kept) + [-1.0] * len(flipped))
            out[f"{check}-{'flip' if flip else 'drop'}"] = (idx, signs, stats)
    return out


def cached_capture(engine: Engine, recs: list[dict[str, Any]], data: Path, site: str, limit: int, pools: tuple[str, ...]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    """Return ``capture`` for the records and its wall time, cached beside the data as one .npz per pool."""
    out, seconds = {}, 0.0
    for pool in pools:
        cache = data.with_suffix(f".{site}-{pool}{limit}.npz")
        if not cache.exists():
            t0 = time.monotonic()
            p, n = capture(engine, recs, site, (pool,))[pool]
            np.savez(cache, seconds=time.monotonic() - t0, pos=p.astype(np.float32), neg=n.astype(np.float32))
        z = np.load(cache)
        out[pool] = (z["pos"].astype(np.float64), z["neg"].astype(np.float64))
        seconds += float(z["seconds"])
    return out, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", type=Path)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--site", default="ffn_out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--checks", default="likelihood,pairwise")
    ap.add_argument("--pools", default="last,mean")
    ap.add_argument("--stage", choices=("checks", "capture", "analyze", "all"), default="all",
                    help="run only the checks or only the capture (two processes share a busy machine better)")
    args = ap.parse_args()
    checks = tuple(c for c in args.checks.split(",") if c)
    pools = tuple(c for c in args.pools.split(",") if c)
    engine = open_engine(args.model, RuntimeSettings(threads=args.threads, n_ctx=16384, parallel=16))
    if args.stage == "capture":
        recs = [dict(r) for r in read_jsonl(args.data)][: args.limit]
        cached_capture(engine, recs, args.data, args.site, args.limit, pools)
        return
    recs = checked_records(None if args.stage == "analyze" else engine, args.data, args.limit, checks)
    if args.stage == "checks":
        return
    checks = tuple(c for c in checks if c in recs[0])
    acts, capture_s = cached_capture(engine, recs, args.data, args.site, args.limit, pools)
    base = np.array([i for i, r in enumerate(recs) if not refusal_reason(r)])
    result: dict[str, Any] = {
        "data": args.data.name, "model": args.model, "site": args.site, "pairs": len(recs),
        "recipe": recs[0].get("recipe", "paper"), "capture_seconds": round(capture_s, 1),
        "check_seconds_per_pair": recs[0].get("check_seconds"),
        "refusals": {s: sum(bool(r.get("refusal", {}).get(s)) for r in recs) for s in ("positive", "negative")},
        "agreement": {c: float(np.mean([recs[i][c]["score"] > 0 for i in base])) for c in checks},
        "checks_agree_with_each_other": float(np.mean([(recs[i]["pairwise"]["score"] > 0) == (recs[i]["likelihood"]["score"] > 0) for i in base]))
        if len(checks) == 2 else None,
        "variants": {},
    }
    for name, (idx, signs, stats) in variants(recs, checks).items():
        per_pool = {}
        for pool, (pos, neg) in acts.items():
            layers = {}
            for L in range(1, engine.n_layer - 1):
                acc_f, acc_all = cv_accuracy(pos[:, L], neg[:, L], idx, signs, base, np.ones(len(base)))
                lp, ln = _labelled(pos[:, L], neg[:, L], idx, signs)
                single = fit_layer(L, lp, ln, holdout=0.2, seed=0)
                layers[L] = {"cv_filtered": acc_f, "cv_all": acc_all, "fit_heldout": single.heldout_accuracy, "fit": single}
            fits = {L: v.pop("fit") for L, v in layers.items()}
            chosen = select_layers(fits, engine.n_layer)
            top5 = sorted(layers, key=lambda L: -layers[L]["cv_filtered"])[:5]
            per_pool[pool] = {
                "chosen_by_fit": chosen,
                "fit_heldout_on_chosen": float(np.mean([layers[L]["fit_heldout"] for L in chosen])),
                "fit_heldout_pairs": int(round(0.2 * len(idx))),
                "cv_filtered_on_chosen": float(np.mean([layers[L]["cv_filtered"] for L in chosen])),
                "cv_all_on_chosen": float(np.mean([layers[L]["cv_all"] for L in chosen])),
                "top5_by_cv": top5,
                "cv_filtered_top5": float(np.mean([layers[L]["cv_filtered"] for L in top5])),
                "cv_all_top5": float(np.mean([layers[L]["cv_all"] for L in top5])),
                "per_layer": layers,
            }
        result["variants"][name] = {"n_fit": len(idx), "stats": stats, "pools": per_pool}
    out = HERE / "results" / (args.data.stem + f".{args.site}.n{args.limit}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    summarize(result)


def summarize(result: dict[str, Any]) -> None:
    print(f"{result['data']}: pairs {result['pairs']} refusals {result['refusals']} agreement {result['agreement']}")
    for name, v in result["variants"].items():
        for pool, p in v["pools"].items():
            print(f"  {name:16s} {pool:4s} n={v['n_fit']:3d} chosen={p['chosen_by_fit']} fit_heldout={p['fit_heldout_on_chosen']:.2f} "
                  f"cv_filt(chosen)={p['cv_filtered_on_chosen']:.2f} cv_all(chosen)={p['cv_all_on_chosen']:.2f} "
                  f"cv_filt(top5)={p['cv_filtered_top5']:.2f} cv_all(top5)={p['cv_all_top5']:.2f}")


if __name__ == "__main__":
    main()
