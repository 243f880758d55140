"""Does a model's own refusal behaviour sit on one direction it can be steered along? (issue 10, harmless)

    python scripts/records/request_contrast.py [--model qwen2.5-coder-0.5b-instruct] [--threads 1]

The persona recipes rest on the model acting out a persona; measured here (screen.py), neither bundled
instruct model changes its refusals when told to be safety-first. This tries the other self-made
contrast: the model's own state at the end of a risky request against a benign look-alike (the
harmless axis's built-in queries, 108 risky / 42 benign, written for the project), the mean
difference per layer at ``l_out`` (where llama.cpp adds control vectors). Held-out: the separation
(AUC) of HarmBench prompts 40..199 against the built-in benign evaluation prompts along it. Steered:
the difference added at one layer at a few strengths, answers (greedy, 64 tokens) to HarmBench
prompts 0..39 and the 35 benign prompts, refusals counted by the keyword detector.
Writes results/request-contrast-<model>.json.
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from alignez_local.prompt_sets import load_eval_prompts
from alignez_local.measures.refusal import is_refusal
from alignez_local.fileio import read_jsonl
from alignez_local.llama.engine import Sampling
from alignez_local.settings import RuntimeSettings, open_engine

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    return float(np.mean(pos[:, None] > neg[None, :]) + 0.5 * np.mean(pos[:, None] == neg[None, :]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--strengths", default="0.5,1,2")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--gate", action="store_true",
                    help="Steer only prompts whose own state at the layer lies on the risky side of the midpoint.")
    a = ap.parse_args()
    rows = list(read_jsonl(REPO / "alignez_local" / "data" / "queries_harmless.jsonl"))
    risky = [r["query"] for r in rows if r["kind"] == "risky"]
    benign = [r["query"] for r in rows if r["kind"] == "benign"]
    harmbench = [x.strip() for x in (REPO.parent / "shared" / "data" / "harmbench_prompts.txt").read_text().splitlines() if x.strip()]
    benign_eval = [p.text for p in load_eval_prompts(kinds={"benign"})]
    out: dict = {"model": a.model}
    with open_engine(a.model, RuntimeSettings(threads=a.threads)) as eng:
        layers = list(range(eng.n_layer))
        fmt = lambda qs: [eng.prompt(q) for q in qs]  # noqa: E731
        r_act = eng.capture(fmt(risky), layers, site="l_out").astype(np.float64)
        b_act = eng.capture(fmt(benign), layers, site="l_out").astype(np.float64)
        diff = r_act.mean(0) - b_act.mean(0)  # (layers, d)
        h_act = eng.capture(fmt(harmbench[40:]), layers, site="l_out").astype(np.float64)
        e_act = eng.capture(fmt(benign_eval), layers, site="l_out").astype(np.float64)
        aucs = []
        for L in layers:
            u = diff[L] / np.linalg.norm(diff[L])
            aucs.append(auc(h_act[:, L] @ u, e_act[:, L] @ u))
        out["auc_heldout"] = aucs
        out["diff_norm"] = [float(np.linalg.norm(d)) for d in diff]
        out["act_norm"] = [float(np.linalg.norm(b_act[:, L], axis=1).mean()) for L in layers]
        band = [L for L in layers if eng.n_layer // 4 <= L <= eng.n_layer // 2]
        best = max(band, key=lambda L: aucs[L])
        out["layer"] = best
        print("held-out AUC per layer:", " ".join(f"{L}:{x:.2f}" for L, x in enumerate(aucs)), flush=True)
        print(f"layer {best}: |diff| {out['diff_norm'][best]:.2f}, mean |x| {out['act_norm'][best]:.2f}", flush=True)
        sampling = Sampling(temperature=0.0, max_tokens=a.max_tokens, repeat_penalty=1.1, seed=0)
        tests = {"harmbench": fmt(harmbench[:40]), "benign": fmt(benign_eval)}
        u = diff[best] / np.linalg.norm(diff[best])
        mid = 0.5 * (r_act[:, best].mean(0) + b_act[:, best].mean(0)) @ u  # the gate's threshold
        gated = {name: eng.capture(p, [best], site="l_out")[:, 0].astype(np.float64) @ u > mid for name, p in tests.items()}
        out["gate"] = {name: int(g.sum()) for name, g in gated.items()} if a.gate else None
        if a.gate:
            print(f"gate opens on harmbench {int(gated['harmbench'].sum())}/40, benign {int(gated['benign'].sum())}/{len(benign_eval)}", flush=True)
        out["runs"] = {}
        for s in ([] if a.gate else [0.0]) + [float(x) for x in a.strengths.split(",")]:
            res = {}
            for name, prompts in tests.items():
                steer = gated[name] if a.gate else np.ones(len(prompts), bool)
                texts = [""] * len(prompts)
                for on in (False, True):
                    idx = [i for i in range(len(prompts)) if steer[i] == on]
                    if not idx:
                        continue
                    with eng.control_vector({best: (s * diff[best]).astype(np.float32)}) if (on and s) else nullcontext():
                        for i, c in zip(idx, eng.generate([prompts[i] for i in idx], sampling)):
                            texts[i] = c.text
                res[name] = {"refusals": sum(map(is_refusal, texts)), "n": len(texts), "answers": texts}
            out["runs"][f"{'gated ' if a.gate else ''}{s:g}"] = res
            print(f"x{s:g}: refusals harmbench {res['harmbench']['refusals']}/40, benign {res['benign']['refusals']}/{len(benign_eval)}", flush=True)
            (HERE / "results" / f"request-contrast-{a.model}{'-gated' if a.gate else ''}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
