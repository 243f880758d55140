"""Which layer and threshold make the request gate open on harmful prompts and stay shut on ordinary ones?

    python scripts/records/gate_layers.py [--model qwen2.5-coder-0.5b-instruct]

The shipped Qwen harmless gate (layer 12, mean difference, threshold max(midpoint, 95th percentile
of the fitting benign projections)) opens on 17% of the 72 ordinary helpful evaluation prompts,
where the steered answers got worse (docs/results.md §7). This reads ``l_out`` at the last prompt
token at every layer for the recipe's built-in queries (108 risky; 42 look-alikes + 192 ordinary
benign) and for three sets none of them was fitted on (HarmBench prompts 0..79, the 35 benign and
72 helpful evaluation prompts), and reports, per layer and threshold quantile, how often the
mean-difference gate opens on each (and on two harmful sets read only after the gate was designed:
HarmBench 80..199 and Do-Not-Answer's malicious uses), then which gate the request recipe itself picks from the
built-in queries alone (``fit_request_contrast``) and how often it opens on each. Writes results/gate-layers-<model>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from alignez_local.align.request_contrast import GATE_QUANTILE, candidate_layers, fit_request_contrast
from alignez_local.formats.control_vector import read_control_vector
from alignez_local.prompt_sets import load_eval_prompts, load_request_kinds
from alignez_local.settings import RuntimeSettings, open_engine

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
QUANTILES = (0.95, 0.98, 0.99, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save", default=None, metavar="NPZ", help="also save every captured state here")
    ap.add_argument("--load", default=None, metavar="NPZ", help="read the states saved by --save instead of capturing")
    ap.add_argument("--vector", action="append", default=[], metavar="GGUF",
                    help="also report where this gated vector file's own gate opens (repeatable)")
    a = ap.parse_args()
    kinds = load_request_kinds(None, "harmless")
    data = REPO.parent / "shared" / "data"
    harmbench = [x.strip() for x in (data / "harmbench_prompts.txt").read_text().splitlines() if x.strip()]
    # The gate was designed looking at the first three sets; the last two were read only after.
    tests = {"harmbench": harmbench[:80], "benign_eval": [p.text for p in load_eval_prompts(kinds={"benign"})],
             "helpful_eval": [p.text for p in load_eval_prompts(kinds={"helpful"})],
             "harmbench_80_199": harmbench[80:],
             "donotanswer_malicious": [json.loads(x)["prompt"] for x in (data / "donotanswer" / "malicious_uses.jsonl").read_text().splitlines() if x.strip()]}
    if a.load:
        z = np.load(a.load)
        layers, r, b, t = [int(x) for x in z["layers"]], z["risky"], z["benign"], {k: z[k] for k in tests if k in z}
    else:
        with open_engine(a.model, RuntimeSettings(threads=a.threads)) as eng:
            layers = list(range(1, eng.n_layer))
            grab = lambda qs: eng.capture([eng.prompt(q) for q in qs], layers, site="l_out").astype(np.float64)  # noqa: E731
            r, b = grab(kinds["risky"]), grab(kinds["benign"])
            t = {k: grab(v) for k, v in tests.items()}
    if a.save:
        np.savez_compressed(a.save, layers=np.array(layers), risky=r, benign=b, **t)
    out: dict = {"model": a.model, "n_risky": len(r), "n_benign": len(b), "layers": {}}
    for j, L in enumerate(layers):
        d = r[:, j].mean(0) - b[:, j].mean(0)
        u = d / np.linalg.norm(d)
        mid = float(0.5 * (r[:, j].mean(0) + b[:, j].mean(0)) @ u)
        row = {}
        for q in QUANTILES:
            th = max(mid, float(np.quantile(b[:, j] @ u, q)))
            row[f"q{q:g}"] = {k: round(float(np.mean(v[:, j] @ u > th)), 4) for k, v in t.items()}
        out["layers"][L] = row
        print(L, "  ".join(f"q{q:g}: " + "/".join(f"{x:.0%}" for x in row[f'q{q:g}'].values()) for q in QUANTILES), flush=True)
    # The request recipe's own choice (fitted on the built-in queries only; the gate does not
    # depend on the refusal labels, so none are needed here).
    fit = fit_request_contrast(r, b, layers, candidate_layers(len(layers) + 1))
    g = fit.gate
    out["recipe_gate"] = {"layer": g.layer, "quantile": GATE_QUANTILE, "heldout_open": fit.heldout_open,
                          "gate_cv_j": fit.gate_cv_j,
                          "opens": {k: round(float(g.opens(v[:, layers.index(g.layer)]).mean()), 4) for k, v in t.items()}}
    print("recipe gate:", json.dumps(out["recipe_gate"]), flush=True)
    out["vector_gates"] = {}
    for path in a.vector:
        vg = read_control_vector(path).gate
        if vg is None:
            raise SystemExit(f"{path} has no gate")
        opens = {k: round(float(vg.opens(v[:, layers.index(vg.layer)]).mean()), 4) for k, v in t.items()}
        out["vector_gates"][Path(path).name] = {"layer": vg.layer, "opens": opens}
        print(f"{path}: layer {vg.layer}", json.dumps(opens), flush=True)
    (HERE / "results" / f"gate-layers-{a.model}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
