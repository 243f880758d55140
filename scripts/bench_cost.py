"""What `alignez steer` costs as models grow: seconds, tokens and peak memory per stage, per model.

    .venv/bin/python scripts/bench_cost.py [--models M,M,...] [--axis french] [--limit 16] [--threads 2]
    .venv/bin/python scripts/bench_cost.py --table runs/cost/*.json     # print saved runs only
    .venv/bin/python scripts/bench_cost.py --capture-cut qwen2.5-coder-0.5b-instruct PAIRS.jsonl [--pairs 16]

Runs the real `alignez steer` once per model (same axis, same query count, a fresh output folder
so nothing is resumed; one process per model, so each peak RSS is that model's own), reads the
stage timings and costs from its report.json (progress.StageClock: tokens the model read and
sampled per stage, peak resident memory at the stage's end), and prints one table per model with
the per-token rates that explain the seconds. Each run is also saved as JSON under --save.

Then a projection for a larger model, stated as a projection: per stage, seconds per token read and
per token sampled are fitted against the model file's size over the measured models (decode on a
CPU streams every weight once per step, so its cost grows about with the bytes of the model), and
extrapolated to --project-gb (default 4.7 GB: a 7-8B model at Q4_K_M). A benchmark, not a test:
the figures depend on the machine and on what else runs on it; the machine is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from alignez_local.align.fit import capture_layers, capture_pairs, default_pool
from alignez_local.align.preferences import load_pairs
from alignez_local.models import resolve_model
from alignez_local.settings import RuntimeSettings, open_engine
from bench_steer import cpu_model  # scripts/ is on the path when a script runs

STAGES = ("screen", "generate", "fit", "export", "calibrate")
DEFAULT_MODELS = "smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct"


def model_bytes(name: str) -> int:
    """Return the size of the model's GGUF file (a bundled name is resolved as steer resolves it)."""
    return resolve_model(name).stat().st_size


def run_one(model: str, axis: str, limit: int, threads: int, extra: list[str]) -> dict:
    """Return one steer run's figures: wall time, stage timings and costs, model size."""
    alignez = str(Path(sys.executable).with_name("alignez"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [alignez, "steer", "-m", model, "--axis", axis, "--limit", str(limit), "--threads", str(threads),
               "-o", str(out), *extra]
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        t0 = time.monotonic()
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        wall = time.monotonic() - t0
        if done.returncode != 0:
            sys.exit(f"steer on {model} failed (exit {done.returncode})")
        rep = json.loads((out / "report.json").read_text())
    return {"model": model, "axis": axis, "limit": limit, "threads": threads, "wall_s": round(wall, 1),
            "model_bytes": model_bytes(model), "timings": rep["timings"], "costs": rep.get("costs", {}),
            "behaviour": rep.get("behaviour", {}), "machine": f"{os.cpu_count()} cores, {cpu_model()}",
            "date": time.strftime("%Y-%m-%d %H:%M")}


def stage_rows(run: dict) -> list[tuple[str, float, int, int, float]]:
    """Return (stage, seconds, tokens read, tokens sampled, peak RSS MiB) per stage of one run.

    Seconds are the stage's CPU seconds when the run recorded them (they do not count the time other
    jobs held the cores, so runs on a shared machine compare), else its wall seconds."""
    rows = []
    for st in STAGES:
        sec = run["timings"].get(f"{st}_s")
        if sec is None:
            continue
        c = run["costs"].get(st, {})
        rows.append((st, float(c.get("cpu_s", sec)), int(c.get("tokens_read", 0)) + int(c.get("judge_tokens_read", 0)),
                     int(c.get("tokens_sampled", 0)), float(c.get("peak_rss_mb", float("nan")))))
    return rows


def print_run(run: dict) -> None:
    print(f"\n{run['model']} ({run['model_bytes'] / 1e6:.0f} MB), axis {run['axis']}, {run['limit']} queries, "
          f"{run['threads']} threads; {run['machine']}; {run['date']}")
    print(f"  {'stage':<10} {'CPU s':>9} {'tok read':>9} {'tok sampled':>11} {'ms/tok read':>12} "
          f"{'ms/tok sampled':>15} {'peak RSS':>10}")
    for st, sec, read, sampled, rss in stage_rows(run):
        # Per-token rates charge the stage's whole time to one kind of token at a time: an upper
        # bound on each, and the honest figure for stages that do only one (fit reads, generate samples).
        r = f"{1000 * sec / read:.2f}" if read else "-"
        s = f"{1000 * sec / sampled:.1f}" if sampled else "-"
        print(f"  {st:<10} {sec:>9.1f} {read:>9} {sampled:>11} {r:>12} {s:>15} {rss:>8.0f} MB")
    print(f"  {'total':<10} {sum(r[1] for r in stage_rows(run)):>9.1f}   (wall {run['wall_s']:.0f} s, "
          f"{run['threads']} llama.cpp threads)")


def projection(runs: list[dict], target_bytes: float) -> list[str]:
    """Return lines projecting each stage's seconds to a model of ``target_bytes``: the stage's
    tokens read and sampled are taken from the largest measured model (same queries, same axis),
    and its seconds per (read + sampled) token fitted linearly against model bytes."""
    if len(runs) < 2:
        return ["(a projection needs at least two measured models)"]
    runs = sorted(runs, key=lambda r: r["model_bytes"])
    size = np.array([r["model_bytes"] for r in runs], dtype=float)
    lines = [f"PROJECTION (not a measurement) for a {target_bytes / 1e9:.1f} GB model on this machine, "
             f"{runs[-1]['limit']} queries, fitted on {len(runs)} models ({', '.join(r['model'] for r in runs)}):"]
    total = 0.0
    for st in STAGES:
        per_tok, ok = [], True
        for r in runs:
            row = {s: (sec, read, sampled) for s, sec, read, sampled, _ in stage_rows(r)}.get(st)
            if row is None or row[1] + row[2] == 0:
                ok = False
                break
            per_tok.append(row[0] / (row[1] + row[2]))
        if not ok:
            continue
        slope, icpt = np.polyfit(size, np.array(per_tok), 1)
        big = {s: (sec, read, sampled) for s, sec, read, sampled, _ in stage_rows(runs[-1])}[st]
        sec = max(slope * target_bytes + icpt, per_tok[-1]) * (big[1] + big[2])
        total += sec
        lines.append(f"  {st:<10} ~{sec / 60:7.1f} min")
    lines.append(f"  {'total':<10} ~{total / 60:7.1f} min")
    return lines


def capture_cut(model: str, prefs: str, n_pairs: int, threads: int, rounds: int = 2) -> None:
    """Print the fit stage's capture with every layer and without the last (fit.capture_layers),
    side by side on one engine and the same pairs, alternating so drift in the machine's load
    hits both alike."""
    pairs = load_pairs(prefs)[:n_pairs]
    engine = open_engine(model, RuntimeSettings(threads=threads))
    every, cut = list(range(engine.n_layer)), capture_layers(engine.n_layer)
    pool = default_pool(pairs)
    times: dict[str, list[float]] = {"every layer": [], "without the last": []}
    for _ in range(rounds):
        for name, layers in (("every layer", every), ("without the last", cut)):
            before = engine.counts.snapshot()
            t0 = time.monotonic()
            capture_pairs(engine, pairs, "l_out", pool=pool, quiet=True, layers=layers)
            times[name].append(time.monotonic() - t0)
            read = engine.counts.since(before).tokens
    print(f"capture of {len(pairs)} pairs ({2 * len(pairs)} texts, {read} tokens, pool {pool}) on {model}, "
          f"{threads} threads, {os.cpu_count()} cores, {cpu_model()}:")
    for name, ts in times.items():
        print(f"  {name:<17} " + ", ".join(f"{t:.1f} s" for t in ts) + f"  (best {min(ts):.1f} s)")
    print(f"  ratio without/with the last layer: {min(times['without the last']) / min(times['every layer']):.2f}")
    engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--axis", default="french")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", default="runs/cost", help="Folder for one JSON per run.")
    ap.add_argument("--project-gb", type=float, default=4.7)
    ap.add_argument("--table", nargs="*", default=None, metavar="JSON", help="Only print these saved runs.")
    ap.add_argument("--capture-cut", nargs=2, default=None, metavar=("MODEL", "PAIRS"),
                    help="Only time the fit's capture with and without the last layer on these pairs.")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("extra", nargs="*", help="More steer flags, after --")
    args = ap.parse_args()
    if args.capture_cut:
        capture_cut(*args.capture_cut, args.pairs, args.threads)
        return
    if args.table is not None:
        runs = [json.loads(Path(p).read_text()) for p in args.table]
    else:
        runs = []
        Path(args.save).mkdir(parents=True, exist_ok=True)
        for m in args.models.split(","):
            run = run_one(m, args.axis, args.limit, args.threads, args.extra)
            Path(args.save, f"{m}-{args.axis}-{args.limit}.json").write_text(json.dumps(run, indent=1))
            runs.append(run)
            print_run(run)
    if args.table is not None:
        for run in runs:
            print_run(run)
    print()
    print("\n".join(projection(runs, args.project_gb * 1e9)))


if __name__ == "__main__":
    main()
