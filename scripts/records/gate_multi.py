"""Several gates on the shipped model: does a second or third gate help, judged as the recipe judges it? (issue 29)

    taskset -c 1 python scripts/records/gate_multi.py [--model qwen2.5-coder-0.5b-instruct] [--threads 1]

Reads the built-in risky and benign requests' states alone (``read_alone``, ``l_out`` at the last
prompt token, the recipe's candidate layers; cached in ``runs/gate-multi/<model>.npz``) and fits
the request recipe's gates on them exactly as ``fit_request_contrast`` does (the same seeded 20%
held out), once with one gate (``max_gates=1``, the file format before issue 29) and once with up
to 3 (the recipe's default since): the chosen layers and rule, the nested cross-validated figures of
each rule's best try, and the open rates on the held-out built-in requests (**choose**: the recipe
chose on the other 80%) and, read only to report, HarmBench, each Do-Not-Answer area and the
evaluation prompts (each decided as the prompt read alone decides: ``read_gates``). Needs
``../shared/data`` for the report sets. Writes results/gate-multi-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from gate_states import request_sets  # noqa: E402

from alignez_local.align.gate_reading import read_alone, read_gates  # noqa: E402
from alignez_local.align.request_contrast import candidate_layers, fit_request_contrast  # noqa: E402
from alignez_local.settings import RuntimeSettings, open_engine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    engine = open_engine(a.model, RuntimeSettings(threads=a.threads))
    layers = candidate_layers(engine.n_layer)
    sets = request_sets()
    cache = REPO / "runs" / "gate-multi" / f"{a.model}.npz"
    if cache.is_file():
        z = np.load(cache)
        risky, benign = z["risky"], z["benign"]
    else:
        t0 = time.time()
        risky = read_alone(engine, [engine.prompt(q) for q in sets["builtin_risky"]], layers)
        benign = read_alone(engine, [engine.prompt(q) for q in sets["builtin_benign"]], layers)
        print(f"states read alone in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, risky=risky, benign=benign)
    fits = {n: fit_request_contrast(risky, benign, layers, layers, seed=a.seed, max_gates=n) for n in (1, 3)}
    report_sets = {k: v for k, v in sets.items() if not k.startswith("builtin_")}
    out: dict[str, object] = {"model": a.model, "seed": a.seed, "layers": layers,
                              "sizes": {k: len(v) for k, v in sets.items()}, "fits": {}}
    t0 = time.time()
    for n, fit in fits.items():
        row: dict[str, object] = {"gates": [{"layer": g.layer, "comparison": g.comparison, "threshold": round(g.threshold, 4)}
                                            for g in fit.gate], "rule": fit.gate.rule, "heldout_open": fit.heldout_open,
                                  "gates_cv": fit.gates_cv, "gates_tried": fit.gates_tried, "open": {}}
        for name, texts in report_sets.items():
            opened = read_gates(engine, [engine.prompt(t) for t in texts], [fit.gate])[:, 0]
            row["open"][name] = round(float(opened.mean()), 4)  # type: ignore[index]
        out["fits"][f"max_gates={n}"] = row  # type: ignore[index]
        print(f"max_gates={n}: {fit.gate.summary()}  held-out risky {fit.heldout_open['risky']:.0%} "
              f"benign {fit.heldout_open['benign']:.0%}  nested {fit.gates_cv['nested_cv'] if fit.gates_cv else None}", flush=True)
        for name, v in row["open"].items():  # type: ignore[attr-defined]
            print(f"  {name:<60} {100 * v:5.1f}%", flush=True)
        print(f"  tried: {json.dumps(fit.gates_tried)}", flush=True)
    print(f"report sets read in {time.time() - t0:.0f}s", file=sys.stderr)
    (HERE / "results" / f"gate-multi-{a.model}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
