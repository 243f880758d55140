"""The trait suite: steer each trait with each recipe variant and print the behaviour table.

    .venv/bin/python scripts/trait_suite.py qwen2.5-coder-0.5b-instruct --traits "french;brief" --variants default,contrast
    .venv/bin/python scripts/trait_suite.py smollm2-135m-instruct --limit 48 --out runs/suite
    .venv/bin/python scripts/trait_suite.py qwen2.5-coder-0.5b-instruct --limit 24 \
        --traits "topic:the ocean=ocean,sea,wave,tide,beach,shore,coral,marine,whale,seawater" --concept-targets

Every run is ``pipeline.run_steer`` (the code ``alignez steer`` runs): the same measures, the same
choose/report split, the same random-direction and prompting baselines. A variant changes the
recipe, the site, the pooling, the direction or the layers (``VARIANTS``; ``default``: the recipe
``alignez steer`` uses for the axis). Besides the built-in traits, ``custom:POS/NEG`` is a persona
axis, ``topic:SUBJECT=W1,W2`` a concept to bring up (read by its keywords) and ``style:STYLE=W1,W2``
a style (issue 31's behaviours a prompt cannot get; ``--concept-targets`` checks its targets). Variants with the same
recipe share the generated pairs (copied from the first run of that recipe), so only fitting and
calibration are paid again. Results go to OUT/<model>/<trait>/<variant>/report.json, one JSON line
per run to OUT/<model>/suite.jsonl (a re-run skips the runs already there), and a markdown table
to stdout (``--table`` prints it from suite.jsonl without running anything).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from alignez_local.evaluation.behaviour_eval import JUDGE_RUNTIME
from alignez_local.evaluation.judge import open_judge
from alignez_local.evaluation.behaviour_report import steer_lines
from alignez_local.prompt_sets import select_queries
from alignez_local import pipeline
from alignez_local.align.axes import BUILTIN_AXES, TRAITS, PreferenceAxis, custom_axis, style_axis, topic_axis
from alignez_local.api import default_recipe
from alignez_local.align.preferences import GenerationSettings
from alignez_local.errors import AlignezError
from alignez_local.measures.behaviour import measure_for
from alignez_local.align.vectors import FitSettings
from alignez_local.models import ModelId
from alignez_local.settings import RuntimeSettings, open_engine


def variants(n_layer: int) -> dict[str, dict[str, Any]]:
    """Return variant name -> (recipe, FitSettings changes, profile calibrated?)."""
    mid = n_layer // 2
    return {
        # The default: the plain recipe, l_out, mean over the answer, difference of means on the middle
        # third, fitted on the pairs the axis's checker reads as contrasting (align/pair_filter.py).
        "default": {"recipe": None, "fit": {}, "profile": True},
        "texts": {"recipe": "texts", "fit": {}, "profile": False},
        "plain": {"recipe": "plain", "fit": {}, "profile": False},
        "unfiltered": {"recipe": "plain", "fit": {"behaviour_filter": False}, "profile": False},
        "contrast": {"recipe": "contrast", "fit": {}, "profile": False},
        "direct": {"recipe": "direct", "fit": {}, "profile": False},
        "last-token": {"recipe": "plain", "fit": {"pool": "last"}, "profile": False},
        "ffn_out": {"recipe": "plain", "fit": {"site": "ffn_out"}, "profile": False},
        "profile-vector": {"recipe": "plain", "fit": {"vector_from": "profile"}, "profile": False},
        "pca": {"recipe": "plain", "fit": {"method": "pca-diff", "vector_from": "profile"}, "profile": False},
        "one-layer": {"recipe": "plain", "fit": {"vector_layers": [mid]}, "profile": False},
        "all-layers": {"recipe": "plain", "fit": {"vector_layers": list(range(1, n_layer - 1))}, "profile": False},
        "paper": {"recipe": "paper", "fit": {"site": "ffn_out", "pool": "last", "vector_from": "profile"}, "profile": True},
    }


def row(model: str, trait: str, variant: str, res: pipeline.SteerResult) -> dict[str, Any]:
    """Return one table row: per file, the reported figures beside unsteered, prompting and random."""
    out: dict[str, Any] = {"model": model, "trait": trait, "variant": variant, "timings": res.timings,
                           "pairs": res.profile.provenance.get("data_quality", {}).get("behaviour_filter")}
    for what, cal in res.calibration.items():
        rep = cal.report
        out[what] = {
            "strength": cal.strength, "beats_random": cal.beats_random, "verdict": cal.verdict,
            **{f"{cond}_{m}": rep[cond][m]["mean"] for cond in ("unsteered", "prompting", "random", "steered")
               for m in ("behaviour_rate", "relevance", "fluency", "combined", "loop_share") if m in rep[cond]},
            "steered_behaviour_ci95": rep["steered"]["behaviour_rate"]["ci95"],
            "vs_random": cal.vs_random,
        }
    return out


def concept_targets(c: dict[str, Any]) -> str:
    """Return which of issue 31's targets for a behaviour a prompt cannot get one vector row meets:
    prompting <= 35%, the vector >= 60% and beating the random direction, relevance within 0.10 of
    unsteered's, no more looping than unsteered."""
    checks = {"prompting<=35%": c["prompting_behaviour_rate"] <= 0.35, "vector>=60%": c["steered_behaviour_rate"] >= 0.6,
              "beats random": bool(c["beats_random"]),
              "relevance": c["steered_relevance"] >= c["unsteered_relevance"] - 0.10,
              "loops": c.get("steered_loop_share", 0.0) <= c.get("unsteered_loop_share", 0.0)}
    missed = [k for k, ok in checks.items() if not ok]
    return "all met" if not missed else "missed: " + ", ".join(missed)


def table(rows: list[dict[str, Any]], targets: bool = False) -> str:
    """Return the markdown table of ``rows`` (one line per run and file; ``targets``: a column of
    ``concept_targets``)."""
    head = ("| model | trait | variant | file | strength | behaviour steered [95%] | random | prompting | unsteered "
            "| relevance (vs unsteered) | fluency (vs unsteered) | combined | loops (vs unsteered) | beats random |"
            + (" targets |" if targets else ""))
    lines = [head, "|" + "---|" * (15 if targets else 14)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['trait']} | {r['variant']} | - | - | no vector: {r['error']} |"
                         + " |" * (9 if targets else 8))
            continue
        for what in ("vector", "profile"):
            c = r.get(what)
            if not c:
                continue
            ci = c["steered_behaviour_ci95"]
            lines.append(
                f"| {r['model']} | {r['trait']} | {r['variant']} | {what} | {c['strength']:g} "
                f"| {100 * c['steered_behaviour_rate']:.0f}% [{100 * ci[0]:.0f}-{100 * ci[1]:.0f}] "
                f"| {100 * c['random_behaviour_rate']:.0f}% | {100 * c['prompting_behaviour_rate']:.0f}% "
                f"| {100 * c['unsteered_behaviour_rate']:.0f}% "
                f"| {c['steered_relevance']:.2f} ({c['unsteered_relevance']:.2f}) "
                f"| {c['steered_fluency']:.2f} ({c['unsteered_fluency']:.2f}) | {c['steered_combined']:.2f} "
                f"| {_share(c, 'steered_loop_share')} ({_share(c, 'unsteered_loop_share')}) "
                f"| {'yes' if c['beats_random'] else 'NO'} |" + (f" {concept_targets(c)} |" if targets else ""))
    return "\n".join(lines)


def _share(c: dict[str, Any], key: str) -> str:
    return f"{100 * c[key]:.0f}%" if key in c else "-"  # rows from before the loop share was reported


def parse_trait(trait: str) -> PreferenceAxis:
    """Return the axis a --traits entry names: a built-in trait, custom:POS/NEG, topic:SUBJECT=W1,W2 or
    style:STYLE=W1,W2 (no '=': the concept's own words, or the judge for a style)."""
    kind, _, spec = trait.partition(":")
    if kind == "custom" and spec:
        pos, neg = spec.split("/")
        return custom_axis(pos, neg)
    if kind in ("topic", "style") and spec:
        what, _, words = spec.partition("=")
        return (topic_axis if kind == "topic" else style_axis)(what, words or None)
    return BUILTIN_AXES[trait]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    # ";" between traits: a topic's keywords are comma-separated.
    ap.add_argument("--traits", default=";".join(TRAITS),
                    help="Axes separated by ';': built-in traits, custom:POS/NEG, topic:SUBJECT=W1,W2, style:STYLE=W1,W2.")
    ap.add_argument("--variants", default="default")
    # steer's own defaults (the suite's were 48 and 64 before issue 32; the older records say so).
    ap.add_argument("--limit", type=int, default=pipeline.STEER_QUERIES, help="Generation queries per trait.")
    ap.add_argument("--response-tokens", type=int, default=GenerationSettings.response_tokens)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--judge", default="auto")
    ap.add_argument("--out", default="runs/suite")
    ap.add_argument("--no-profile", action="store_true", help="Calibrate only the vectors (half the cost).")
    ap.add_argument("--table", action="store_true", help="Only print the table of the runs already made.")
    ap.add_argument("--concept-targets", action="store_true", help="Add the column of issue 31's targets for concepts.")
    args = ap.parse_args()
    root = Path(args.out) / args.model
    root.mkdir(parents=True, exist_ok=True)
    log = root / "suite.jsonl"
    done = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    if args.table:
        print(table(done, args.concept_targets))
        return
    engine = open_engine(args.model, RuntimeSettings(threads=args.threads))
    judges: dict[bool, Any] = {}
    model = ModelId.of(engine, args.model)
    table_variants = variants(engine.n_layer)
    gen = GenerationSettings(temperature=0.7, response_tokens=args.response_tokens, seed=0)
    for trait in args.traits.split(";"):
        axis = parse_trait(trait)
        queries = select_queries(None, args.limit, axis=axis.name)
        # "default" is the recipe steer uses for this axis.
        recipe_of = {name: v["recipe"] or default_recipe(axis, queries_given=True) for name, v in table_variants.items()}
        for variant in args.variants.split(","):
            if any(r["trait"] == axis.name and r["variant"] == variant for r in done):
                continue
            v = {**table_variants[variant], "recipe": recipe_of[variant]}
            folder = root / axis.name / variant
            folder.mkdir(parents=True, exist_ok=True)
            # Share the pairs with an earlier variant of the same recipe: only fitting is paid again.
            if not (folder / "preferences.jsonl").exists():
                for other in table_variants:
                    src = root / axis.name / other / "preferences.jsonl"
                    if other != variant and recipe_of[other] == v["recipe"] and src.exists():
                        shutil.copy(src, folder / "preferences.jsonl")
                        break
            fit = dataclasses.replace(FitSettings(), **v["fit"])
            t0 = time.time()
            print(f"== {args.model} {axis.name} {variant}", file=sys.stderr, flush=True)
            needs = measure_for(axis.measure, axis.positive).needs_judge
            if needs not in judges:
                judges[needs] = open_judge(args.judge, engine, JUDGE_RUNTIME.with_(threads=args.threads), needs=needs)
            try:
                plan = pipeline.SteerPlan(axis, tuple(queries), gen, fit, v["recipe"],
                                          with_profile=v["profile"] and not args.no_profile)
                res = pipeline.run_steer(engine, plan, folder, model, judge=judges[needs],
                                         on_status=lambda line: print(line, file=sys.stderr, flush=True))
                r = row(args.model, axis.name, variant, res)
            except AlignezError as err:
                # A run that cannot fit (e.g. the model never wrote the behaviour) is a result too: record it, go on.
                res, r = None, {"model": args.model, "trait": axis.name, "variant": variant, "error": str(err)}
                print(f"error: {err}", file=sys.stderr, flush=True)
            r["wall_s"] = round(time.time() - t0, 1)
            done.append(r)
            with log.open("a") as f:
                f.write(json.dumps(r) + "\n")
            if res is not None:
                print("\n".join(steer_lines(res.calibration)), file=sys.stderr, flush=True)
    print(table(done, args.concept_targets))


if __name__ == "__main__":
    main()
