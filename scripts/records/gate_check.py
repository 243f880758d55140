"""How well does a request gate tell risky from benign prompts it was not fitted on? (issue 10, harmless)

    python scripts/records/gate_check.py [--model qwen2.5-coder-0.5b-instruct] [--layer 12]

Fits two gates on the request recipe's built-in queries (108 risky; 42 benign look-alikes plus the
192 ordinary general queries), at one layer of ``l_out`` at the last prompt token:
- ``mean``: the unit mean difference, threshold max(midpoint, 95th percentile of benign), what the
  request recipe ships;
- ``lda``: the shrinkage LDA direction (pooled covariance + lambda * I), same threshold rule.
Reports how often each opens on HarmBench prompts 0..79, the 35 benign evaluation prompts and the
72 helpful evaluation prompts (none of them fitted on). Writes results/gate-check-<model>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from alignez_local.prompt_sets import load_eval_prompts, load_request_kinds
from alignez_local.settings import RuntimeSettings, open_engine

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def threshold(u: np.ndarray, risky: np.ndarray, benign: np.ndarray) -> float:
    return max(float(0.5 * (risky.mean(0) + benign.mean(0)) @ u), float(np.quantile(benign @ u, 0.95)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    kinds = load_request_kinds(None, "harmless")
    harmbench = [x.strip() for x in (REPO.parent / "shared" / "data" / "harmbench_prompts.txt").read_text().splitlines() if x.strip()][:80]
    tests = {"harmbench": harmbench, "benign_eval": [p.text for p in load_eval_prompts(kinds={"benign"})],
             "helpful_eval": [p.text for p in load_eval_prompts(kinds={"helpful"})]}
    with open_engine(a.model, RuntimeSettings(threads=a.threads)) as eng:
        grab = lambda qs: eng.capture([eng.prompt(q) for q in qs], [a.layer], site="l_out")[:, 0].astype(np.float64)  # noqa: E731
        r, b = grab(kinds["risky"]), grab(kinds["benign"])
        t = {k: grab(v) for k, v in tests.items()}
    d = r.mean(0) - b.mean(0)
    gates = {"mean": d / np.linalg.norm(d)}
    centred = np.concatenate([r - r.mean(0), b - b.mean(0)])
    cov = centred.T @ centred / len(centred)
    for lam in (0.1, 1.0):
        w = np.linalg.solve(cov + lam * np.trace(cov) / len(cov) * np.eye(len(cov)), d)
        gates[f"lda{lam:g}"] = w / np.linalg.norm(w)
    out: dict = {"model": a.model, "layer": a.layer, "gates": {}}
    for name, u in gates.items():
        th = threshold(u, r, b)
        rates = {k: float(np.mean(v @ u > th)) for k, v in t.items()}
        out["gates"][name] = rates
        print(name, " ".join(f"{k} {x:.0%}" for k, x in rates.items()), flush=True)
    (HERE / "results" / f"gate-check-{a.model}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
