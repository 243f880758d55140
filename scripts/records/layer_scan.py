"""Issue 31, part 1, one candidate: which layers to steer, read from the behaviour itself. Each layer
alone gets the pairs' difference of means at that layer, at a few strengths that put the same total
push into that one layer as the shipped file puts into its eight (x K times the file's strength,
K = 4, 8 by default; K = 2 showed no behaviour at any layer for French or capitals), placed as the
shipped file is (every token, or the answer's tokens only), and
each is tried on steer's choose half (8 queries) as one trial of steer's own search (the same
scorer, break rule, loop and unanswered rules). The report half is not touched: a layer set found
here is then measured by `alignez steer --variants layers:...`, which chooses and reports as always.

    .venv/bin/python scripts/records/layer_scan.py --trait french [--k 4,8] [--layers 1-23] [--threads 1]
    .venv/bin/python scripts/records/layer_scan.py --trait capitals --k 2,4,8 --base 1.4142   # as recorded

Prints one line per trial and a table per layer (its best eligible trial); writes
results/layer-scan-TRAIT.json. A research record (not API, not tested).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from alignez_local.align.preferences import load_pairs
from alignez_local.align.steering import Steering
from alignez_local.align.layer_scan import LayerScan, scan_layers
from alignez_local.align.strength_by_behaviour import chosen, trial_status
from alignez_local.align.vectors import FitSettings, fit_with_difference, mean_diff_vector
from alignez_local.evaluation.behaviour_eval import axis_of, behaviour_judge
from alignez_local.formats.control_vector import read_control_vector
from alignez_local.models import ModelId, resolve_model
from alignez_local.pipeline import behaviour_bench
from alignez_local.settings import RuntimeSettings, open_engine
from alignez_local.specs import parse_layer_list

ROOT = Path(__file__).resolve().parents[2]
MODEL = "qwen2.5-coder-0.5b-instruct"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trait", required=True, choices=("french", "spanish", "brief", "capitals"))
    ap.add_argument("--k", default="4,8", help="strengths per layer, as multiples of the shipped file's strength")
    ap.add_argument("--layers", default=None, help="layers to scan [1 to the last]")
    ap.add_argument("--base", type=float, default=None,
                    help="the strength K multiplies [the shipped file's; capitals' recorded scan: 1.4142, the "
                         "eight-layer file's, since the shipped file is now the layer-3 one at x11.3137]")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    vec_path = ROOT / f"vectors/{MODEL}/{args.trait}.gguf"
    pairs_path = ROOT / f"vectors/{MODEL}/{args.trait}.preferences.jsonl"
    shipped = read_control_vector(vec_path)
    axis = axis_of(Steering.vector(shipped, 1.0))  # as the file records it (Spanish is a custom axis, not a built-in)
    assert axis is not None, f"{vec_path} names no axis"
    s0 = args.base or shipped.default_strength_or_one
    ks = [float(k) for k in args.k.split(",")]
    used = list(dict.fromkeys(p.query for p in load_pairs(pairs_path)))
    engine = open_engine(resolve_model(MODEL), RuntimeSettings(threads=args.threads))
    model = ModelId.of(engine, MODEL)
    layers = parse_layer_list(args.layers, engine.n_layer) if args.layers else list(range(1, engine.n_layer))
    t0 = time.time()
    with behaviour_judge("auto", engine, axis) as judge:
        bench = behaviour_bench(engine, axis, used, judge)
        fitted = fit_with_difference(engine, pairs_path, FitSettings(), model, axis=axis.name, name=axis.name,
                                     measure=bench.scorer.measure, other_layers=layers)
        # The fit must be the shipped file's: same pairs, same filter, same directions on its layers.
        mid = mean_diff_vector(engine, fitted.difference, shipped.layers, fitted.profile, axis.name)
        drift = max(float(abs(mid.directions[L] - shipped.directions[L]).max()) for L in shipped.layers)
        print(f"{args.trait}: K x {s0:g}; shipped x{shipped.default_strength_or_one:g} ({shipped.placement}) on layers {shipped.layers[0]}-{shipped.layers[-1]}; re-fit max |diff| {drift:.2e}",
              flush=True)
        # placed as the shipped file is (brief: the answer's tokens only); steer's own scan (align/layer_scan.py)
        ones = {L: mean_diff_vector(engine, fitted.difference, [L], fitted.profile, axis.name).placed(shipped.placement)
                for L in layers}
        done: list[int] = []

        def line(layer: int, t) -> None:
            print(trial_status(f"layer {layer}", t), flush=True)
            done.append(layer)
            if len(done) % len(ks) == 0:
                n = len(done) // len(ks)
                print(f"  [{n}/{len(layers)} layers, about {(time.time() - t0) / n * (len(layers) - n) / 60:.0f} min left]",
                      flush=True)

        found = scan_layers(bench, LayerScan(lambda L, s: Steering.vector(ones[L], s), layers, ks), s0, on_trial=line)
        rows = found.trials
        prompting, unsteered = bench.fixed("prompting", "choose").summary(), bench.fixed("unsteered", "choose").summary()
    print(f"\n{args.trait}, choose half ({len(bench.choose)} queries); unsteered behaviour "
          f"{100 * unsteered['behaviour_rate']['mean']:.0f}%, prompting {100 * prompting['behaviour_rate']['mean']:.0f}%")
    print("layer | best trial (eligible first) | every K: behaviour% / combined")
    for L, trials in rows.items():
        best = chosen(trials)
        every = "  ".join(f"x{t.strength:g}: {100 * t.behaviour_rate:.0f}/{t.combined:.2f}{' B' if t.broken else ''}"
                          for t in trials)
        print(f"{L:5d} | x{best.strength:g} {100 * best.behaviour_rate:.0f}% comb {best.combined:.2f} "
              f"rel {best.relevance:.2f} flu {best.fluency:.2f} loops {100 * best.loop_share:.0f}%"
              f"{'' if best.eligible else ' (not eligible)'} | {every}")
    dest = ROOT / f"scripts/records/results/layer-scan-{args.trait}.json"
    dest.write_text(json.dumps({"trait": args.trait, "model": MODEL, "shipped_strength": s0, "k": ks,
                                "seconds": round(time.time() - t0), "unsteered": unsteered, "prompting": prompting,
                                "layers": {str(L): [t.record() for t in trials] for L, trials in rows.items()}},
                               indent=1, default=str))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
