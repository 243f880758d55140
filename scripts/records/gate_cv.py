"""Which gate rule generalises? Layer, direction and threshold chosen for held-out accuracy (issue 20).

    python scripts/records/gate_cv.py [--model qwen2.5-coder-0.5b-instruct]

Reads the states ``gate_states.py`` cached (each prompt read alone, ``l_out`` at the last prompt
token, layers 3-18) and fits the request recipe's gate on the built-in requests exactly as
``fit_request_contrast`` does (the same seeded 20% held-out split; the gate fitted on the other 80%),
under several rules:

- ``quantile``: the rule before issue 20 (threshold at the 99th percentile of out-of-fold benign
  scores, layer by cross-validated Youden's J);
- ``j@cap``: threshold and layer by cross-validated Youden's J, the threshold opening on at most
  ``cap`` of the out-of-fold benign scores;
- ``f1@cap``: the same by cross-validated F1 (CAST's ``find_best_condition_point`` criterion);
- ``j@0.02`` with another shrinkage of the LDA direction (0.1, 0.3, 1, 3), or gate layers 3-18
  instead of 6-12 (the recipe's default since issue 20: ``j@0.02``, shrinkage 0.1, chosen here);
- ``or``: two gates at two layers, either opens (thresholds chosen together on the out-of-fold
  scores, best J under the cap). The shipped file format holds one gate, so this is measured only.

Sets, each marked by its use: **choose** = the built-in held-out requests (risky and benign) and
HarmBench (all 200); the rule is chosen on these, by J = mean(open on built-in held-out risky, open
on HarmBench) - open on built-in held-out benign, among the rules that give one gate (the file
format holds one) opening on at most 5% of the built-in held-out benign requests. **report** = each Do-Not-Answer risk area and the
evaluation prompts (helpful, benign, harmful), read only to report. No set was fitted on but the
built-in 80%. Writes results/gate-cv-<model>.json and prints the table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gate_states import LAYERS, StateCache, request_sets  # noqa: E402

from alignez_local.align.request_contrast import (  # noqa: E402
    GATE_SHRINKAGE, HELDOUT, candidate_layers, choose_gate, gate_direction, oof_scores, split,
)
from alignez_local.formats.gate import Gate

CHOOSE = ("builtin_risky_heldout", "builtin_benign_heldout", "harmbench")
GRID = np.concatenate([np.arange(0.95, 1.0, 0.0025), [1.0]])


def two_layer_or(rf: dict, bf: dict, l1: int, l2: int, cap: float, seed: int = 0, shrink: float = 1.0) -> tuple[list[Gate], dict]:
    """Return two gates (either opens) at layers l1, l2 with thresholds chosen together on out-of-fold scores."""
    s = {L: oof_scores(rf[L], bf[L], seed=seed, shrinkage=shrink) for L in (l1, l2)}
    t = {L: np.concatenate([np.quantile(s[L][1], GRID[:-1]), [s[L][1].max() + 1e-9]]) for L in (l1, l2)}
    best = None
    for a, b in itertools.product(t[l1], t[l2]):
        tpr = float(np.mean((s[l1][0] > a) | (s[l2][0] > b)))
        fpr = float(np.mean((s[l1][1] > a) | (s[l2][1] > b)))
        if fpr <= cap + 1e-12 and (best is None or tpr - fpr > best[0] + 1e-12):
            best = (tpr - fpr, a, b, tpr, fpr)
    assert best is not None  # the highest thresholds open on no benign score
    gates = []
    for L, m in ((l1, best[1]), (l2, best[2])):
        u = gate_direction(rf[L], bf[L], shrink)
        gates.append(Gate(L, u.astype(np.float32), float(bf[L].mean(0) @ u) + float(m)))
    return gates, {"j": best[0], "risky_open": best[3], "benign_open": best[4]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vector", action="append", default=[], metavar="GGUF",
                    help="also report where this gated vector file's own gate opens (repeatable)")
    a = ap.parse_args()
    sets = request_sets()
    cache = StateCache(a.model)
    missing = [k for k, v in sets.items() if any(t not in cache.states for t in v)]
    if any(k in missing for k in ("builtin_risky", "builtin_benign", "harmbench")):
        raise SystemExit(f"the choose sets are not all captured ({', '.join(missing)}); run gate_states.py")
    if missing:
        print(f"not captured yet, left out: {', '.join(missing)}", flush=True)
    X = {k: cache.get(v) for k, v in sets.items() if k not in missing}
    idx = {L: i for i, L in enumerate(LAYERS)}
    rng = np.random.default_rng(a.seed)  # the split fit_request_contrast makes with the same seed
    (r_fit, r_out), (b_fit, b_out) = split(len(X["builtin_risky"]), HELDOUT, rng), split(len(X["builtin_benign"]), HELDOUT, rng)
    R, B = X.pop("builtin_risky"), X.pop("builtin_benign")
    X = {"builtin_risky_heldout": R[r_out], "builtin_benign_heldout": B[b_out], **X}
    n_layer = 24
    cand = candidate_layers(n_layer)
    rf = {L: R[r_fit][:, idx[L]] for L in LAYERS}
    bf = {L: B[b_fit][:, idx[L]] for L in LAYERS}

    def rates(gates: list[Gate]) -> dict[str, float]:
        return {k: round(float(np.mean(np.any([g.opens(v[:, idx[g.layer]]) for g in gates], axis=0))), 4) for k, v in X.items()}

    configs: dict[str, dict] = {}

    def run(name: str, rule: str, cap: float, shrink: float = GATE_SHRINKAGE, layers=cand) -> None:
        g, cv = choose_gate({L: rf[L] for L in layers}, {L: bf[L] for L in layers}, seed=a.seed, rule=rule,
                            max_benign=cap, shrinkage=shrink)
        configs[name] = {"layers": [g.layer], "cv": {k: round(v, 4) for k, v in cv[g.layer].items()},
                         "cv_per_layer": {str(L): {k: round(v, 4) for k, v in c.items()} for L, c in cv.items()},
                         "open": rates([g])}
        print(name, configs[name]["layers"], configs[name]["cv"], flush=True)

    run("quantile (before issue 20)", "quantile", 1.0, shrink=1.0)
    for cap in (0.01, 0.02, 0.03, 0.05):
        run(f"j@{cap:g}", "j", cap, shrink=1.0)
        run(f"f1@{cap:g}", "f1", cap, shrink=1.0)
    for shrink in (0.1, 0.3, 1.0, 3.0):
        run(f"j@0.02 shrinkage {shrink:g}", "j", 0.02, shrink)
    run("j@0.02 shrinkage 0.1 layers 3-18", "j", 0.02, 0.1, layers=LAYERS)
    for cap, shrink in ((0.02, 1.0), (0.03, 1.0), (0.02, 0.1)):
        best = None
        for l1, l2 in itertools.combinations(cand, 2):
            gates, cv = two_layer_or(rf, bf, l1, l2, cap, a.seed, shrink)
            if best is None or cv["j"] > best[1]["j"]:
                best = (gates, cv)
        gates, cv = best
        name = f"or@{cap:g}" + ("" if shrink == 1.0 else f" shrinkage {shrink:g}")
        configs[name] = {"layers": [g.layer for g in gates], "cv": {k: round(v, 4) for k, v in cv.items()},
                         "open": rates(gates)}
        print(name, configs[name]["layers"], configs[name]["cv"], flush=True)

    files = {}
    for path in a.vector:
        from alignez_local.formats.control_vector import read_control_vector

        g = read_control_vector(path).gate
        if g is None or g.layer not in idx:
            raise SystemExit(f"{path}: no gate, or its layer was not cached")
        files[f"file {Path(path).name}"] = {"layers": [g.layer], "open": rates([g]), "path": path}
    for c in [*configs.values(), *files.values()]:  # (a file's gate may have been fitted on some "held-out" ones)
        o = c["open"]
        c["choose_j"] = round(0.5 * (o["builtin_risky_heldout"] + o["harmbench"]) - o["builtin_benign_heldout"], 4)
    # Shippable: one gate (the file format holds one), opening on at most 5% of the held-out benign
    # requests (the strength may add at most 1 point of over-refusal; every benign request the gate
    # opens on is one that may tip). Of those, the best choose J.
    ok = [k for k, c in configs.items() if len(c["layers"]) == 1 and c["open"]["builtin_benign_heldout"] <= 0.05]
    chosen = max(ok, key=lambda k: configs[k]["choose_j"])
    names = list(next(iter(configs.values()))["open"])
    print("\nopen rates (choose sets: " + ", ".join(CHOOSE) + "; the rest report only)")
    print(f"{'rule':<28} {'layers':<8} {'cJ':>5} " + " ".join(f"{n[:14]:>14}" for n in names))
    for k, c in {**configs, **files}.items():
        mark = "*" if k == chosen else " "
        print(f"{mark}{k:<27} {','.join(map(str, c['layers'])):<8} {c.get('choose_j', float('nan')):>5.2f} "
              + " ".join(f"{100 * c['open'][n]:>13.0f}%" for n in names))
    out = {"model": a.model, "seed": a.seed, "layers_cached": LAYERS, "candidate_layers": cand,
           "sizes": {k: int(len(v)) for k, v in X.items()}, "n_fit": {"risky": len(r_fit), "benign": len(b_fit)},
           "choose_sets": list(CHOOSE), "report_sets": [n for n in names if n not in CHOOSE],
           "chosen": chosen, "configs": configs, "files": files}
    (HERE / "results" / f"gate-cv-{a.model}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
